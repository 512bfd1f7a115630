"""The CA's records: certificates, their outbox rows, revocations and the CRL's state.

The statements are Core on the caller's transaction connection (no unit-of-work flush): an
enrollment's one transaction runs them (authorities/ca.py `LocalCA.record_issued_many`)."""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple, cast

from sqlalchemy import String, Table, bindparam, case, func, insert, select, update

from .db import Database, connection_of, insert_if_absent
from .prepared import Prepared
from .models import Certificate, CrlState, Outbox

# A mapped class's __table__ is a Table; SQLAlchemy types it as any FromClause.
_CERTIFICATES = cast(Table, Certificate.__table__)
_SUPERSEDE = Prepared(update(_CERTIFICATES).where(
    _CERTIFICATES.c.serial == bindparam("old"), _CERTIFICATES.c.status == "valid").values(
    status="superseded", superseded_by=bindparam("new")))
# The row's encryption slot (models.Certificate.encryption_slot): its profile's ("slot", None outside the
# rule), except that a renewal of its own profile keeps its predecessor's, NULL too: a user holding two
# current encryption certificates from before migration 0009 keeps renewing each ('' marks NULL kept).
_PREDECESSOR = _CERTIFICATES.alias("predecessor")
_SLOT = bindparam("slot", type_=String)
_KEPT_SLOT = select(case((_PREDECESSOR.c.profile == bindparam("slot_profile", type_=String),
                          func.coalesce(_PREDECESSOR.c.encryption_slot, "")), else_=_SLOT)).where(
    _PREDECESSOR.c.serial == bindparam("slot_after", type_=String)).scalar_subquery()
_INSERT_CERTIFICATE = Prepared(insert(_CERTIFICATES).values(
    encryption_slot=func.nullif(func.coalesce(_KEPT_SLOT, _SLOT), "")))
_OUTBOX = cast(Table, Outbox.__table__)
_INSERT_OUTBOX_RETURNING = Prepared(insert(_OUTBOX).returning(_OUTBOX.c.id))
# Many rows: one executemany, then their ids read back by serial (INSERT ... RETURNING with
# sort_by_parameter_order runs one statement per row on SQLite, which cannot promise the order).
_INSERT_OUTBOX = insert(_OUTBOX)
_LAST_OUTBOX_ID = select(func.max(_OUTBOX.c.id))
_OUTBOX_IDS = select(_OUTBOX.c.serial, _OUTBOX.c.id).where(
    _OUTBOX.c.id > bindparam("after"), _OUTBOX.c.serial.in_(bindparam("serials", expanding=True)))
_REVOKED = select(_CERTIFICATES.c.serial, _CERTIFICATES.c.revoked_at, _CERTIFICATES.c.revocation_reason).where(
    _CERTIFICATES.c.status == "revoked")


class IssuedOutbox(NamedTuple):
    """An outbox row as `insert_issued` wrote it (its columns and id), for the request path's inline
    publication: a plain row, as the publisher's other rows are (building an ORM instance per
    issuance cost more than the INSERT: PERFORMANCE.md)."""

    id: int
    user_dn: str
    email: str
    serial: str | None
    reason: str
    created_at: datetime
    attempts: int
    next_attempt_at: datetime


def insert_issued(session, certificates: list[dict], outbox: list[dict], supersede: list[dict]) -> list[int]:
    """In the caller's transaction (a Session or a Core Connection): the predecessors in `supersede`
    ({"old", "new"} serials) become superseded, the certificate rows and their outbox rows are
    inserted; returns the outbox ids, in the order of `outbox`. A second issuance after the same
    predecessor breaks the renewal key at the certificates' INSERT, a second current encryption certificate
    of one address the one-current-encryption index (DuplicateRecord, from the store)."""
    conn = connection_of(session)
    if supersede:  # one UPDATE each, not a read then a write
        _SUPERSEDE.run(conn, supersede)
    _INSERT_CERTIFICATE.run(conn, [
        {**{k: v for k, v in c.items() if k != "encryption_slot"}, "slot": c.get("encryption_slot"),
         "slot_profile": c["profile"], "slot_after": c["replaces"]} for c in certificates])
    if len(outbox) == 1:
        return [row.id for row in _INSERT_OUTBOX_RETURNING.rows(conn, outbox[0])]
    # the serials are new: the rows after the last id with these serials are these rows
    after = conn.execute(_LAST_OUTBOX_ID).scalar() or 0
    conn.execute(_INSERT_OUTBOX, outbox)
    by_serial = dict(conn.execute(_OUTBOX_IDS, {"after": after, "serials": [r["serial"] for r in outbox]}).all())
    return [by_serial[r["serial"]] for r in outbox]


def revoked_entries(session) -> list:
    """(serial, revoked_at, reason) of every revoked certificate, for the next CRL."""
    return list(connection_of(session).execute(_REVOKED).all())


def mark_revoked(session, serials: list[str], reason: str, now: datetime) -> tuple[list[str], list[Certificate]]:
    """In the caller's transaction (a Session): (the serials we never issued, the rows revoked now, each
    with its outbox row queued). Rows revoked already are left as they are."""
    unknown, changed = [], []
    for serial in serials:
        cert = session.get(Certificate, serial.lower())
        if cert is None:
            unknown.append(serial)
            continue
        if cert.status == "revoked":
            continue
        cert.status, cert.revoked_at, cert.revocation_reason = "revoked", now, reason
        session.add(Outbox(user_dn=cert.user_dn, email=cert.email, serial=cert.serial,
                           reason="revoked", created_at=now, next_attempt_at=now))
        changed.append(cert)
    return unknown, changed


def crl_state(db: Database) -> CrlState | None:
    """The CRL the CA last built (number, DER, this and next update), or None before the first."""
    with db.read() as session:
        return session.get(CrlState, 1)


def locked_crl_state(session, *, create: bool = False) -> CrlState | None:
    """The CRL's state row, locked for the caller's transaction (several workers build one CRL, not one
    each); with `create`, made (number 0) if there is none yet (a concurrent first builder's row is
    waited for, not duplicated)."""
    state = session.get(CrlState, 1, with_for_update=True)
    if state is None and create:
        insert_if_absent(connection_of(session), CrlState.__table__, {"id": 1, "number": 0})
        state = session.get(CrlState, 1, with_for_update=True, populate_existing=True)
    return state


def queue_crl_publication(session, now: datetime) -> None:
    """The outbox row that takes the new CRL to the CA entry."""
    session.add(Outbox(user_dn="", email="", serial=None, reason="crl", created_at=now, next_attempt_at=now))
