"""The queries of batch issuance and bulk provisioning: a few statements per batch, not one per row."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, bindparam, insert, select
from sqlalchemy.engine import Connection, Row

from .db import Database
from .models import Certificate, Escrow

_ESCROW = cast(Table, Escrow.__table__)
_CERTIFICATES = cast(Table, Certificate.__table__)
_INSERT_ESCROWS = insert(_ESCROW)  # executemany; the ids are read back by (unique) serial
_ESCROW_IDS = select(_ESCROW.c.serial, _ESCROW.c.id).where(_ESCROW.c.serial.in_(bindparam("serials", expanding=True)))
# What directory_sync/plan.py wanted_values reads of a certificate row.
_PLANNED_COLUMNS = [_CERTIFICATES.c[name] for name in ("user_dn", "der", "status", "profile", "usage", "not_after",
                                                       "issued_at")]


def insert_escrows(conn: Connection, rows: Sequence[dict]) -> list[int]:
    """INSERT escrow rows (serial, email, profile, blob, created_at) in the caller's transaction;
    returns their ids in the order of `rows`."""
    conn.execute(_INSERT_ESCROWS, list(rows))
    by_serial = dict(conn.execute(_ESCROW_IDS, {"serials": [r["serial"] for r in rows]}).all())
    return [by_serial[r["serial"]] for r in rows]


def certificate_rows_of(db: Database, dns: Sequence[str]) -> dict[str, list[Row]]:
    """The certificate rows of these entries, by user DN: plain rows, what the publication planner reads."""
    rows: dict[str, list[Row]] = {}
    with db.read_connection() as conn:
        for start in range(0, len(dns), 500):
            for cert in conn.execute(select(*_PLANNED_COLUMNS).where(
                    _CERTIFICATES.c.user_dn.in_(dns[start:start + 500]))):
                rows.setdefault(cert.user_dn, []).append(cert)
    return rows


def issued_of_profiles(db: Database, profiles: Iterable[str], now: datetime) -> Iterable[tuple[str, str, str, bool, datetime]]:
    """(lowercased email, serial, profile, current, issued_at) of every certificate of these profiles;
    current: valid and not expired at `now`."""
    with db.read_connection() as conn:
        return [(email.lower(), serial, profile, status == "valid" and not_after > now, issued_at)
                for email, serial, profile, status, not_after, issued_at in conn.execute(
                    select(Certificate.email, Certificate.serial, Certificate.profile, Certificate.status,
                           Certificate.not_after, Certificate.issued_at).where(
                        Certificate.profile.in_(list(profiles))))]
