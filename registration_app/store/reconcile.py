"""What a reconcile pass (directory_sync/reconcile.py) reads of our records and writes back: every
certificate row (or those of some DNs or entries), who changed since a time, and the DNs rows move to."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import or_, select, update

from .db import Database
from .models import Certificate, Outbox

_COLUMNS = (Certificate.serial, Certificate.user_dn, Certificate.email, Certificate.profile,
            Certificate.usage, Certificate.status, Certificate.der, Certificate.not_before,
            Certificate.not_after, Certificate.issued_at, Certificate.entry_id)


def certificate_rows(session, *, user_dns: Iterable[str] | None = None,
                     entry_ids: Iterable[str] | None = None) -> list[tuple]:
    """(serial, user_dn, email, profile, usage, status, der, not_before, not_after, issued_at, entry_id)
    of every certificate, or of those at `user_dns` or of `entry_ids` (500 keys per statement)."""
    if user_dns is None and entry_ids is None:
        return list(session.execute(select(*_COLUMNS)))
    out = []
    for column, keys in ((Certificate.user_dn, list(user_dns or ())), (Certificate.entry_id, list(entry_ids or ()))):
        for start in range(0, len(keys), 500):
            out.extend(session.execute(select(*_COLUMNS).where(column.in_(keys[start:start + 500]))))
    return out


def dns_changed_since(session, since: datetime, now: datetime) -> set[str]:
    """DNs of users whose certificates were issued or revoked since `since`, or expired in between."""
    return {dn for (dn,) in session.execute(select(Certificate.user_dn).where(or_(
        Certificate.issued_at >= since, Certificate.revoked_at >= since,
        Certificate.not_after.between(since, now))))}


def current_holders(db: Database, profile: str, now: datetime) -> list[str]:
    """DNs of the users holding a current certificate of `profile`."""
    with db.read() as session:
        return [dn for (dn,) in session.execute(select(Certificate.user_dn).distinct().where(
            Certificate.profile == profile, Certificate.status == "valid", Certificate.not_after > now))]


def open_revocation_rows(db: Database, serials: list[str]) -> dict[str, list[int]]:
    """serial → the ids of the open outbox rows its revocation queued."""
    out: dict[str, list[int]] = {}
    with db.read() as session:
        for start in range(0, len(serials), 500):
            for row_id, serial in session.execute(select(Outbox.id, Outbox.serial).where(
                    Outbox.serial.in_(serials[start:start + 500]), Outbox.reason == "revoked",
                    Outbox.done_at.is_(None))):
                out.setdefault(serial, []).append(row_id)
    return out


def move_rows(session, serials: list[str], user_dn: str, entry_id: str | None) -> None:
    """In the caller's transaction: these rows are at `user_dn`, of entry `entry_id`."""
    for start in range(0, len(serials), 500):
        session.execute(update(Certificate).where(Certificate.serial.in_(serials[start:start + 500]))
                        .values(user_dn=user_dn, entry_id=entry_id))
