"""The KRA's records and recovery's: escrowed keys, recovery requests and their approvals."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Table, func, insert, select, update

from .db import Database
from .prepared import Prepared
from .models import Certificate, Escrow, RecoveryApproval, RecoveryRequest

_ESCROWS = cast(Table, Escrow.__table__)  # a mapped class's __table__ is a Table
_INSERT_ESCROW = Prepared(insert(_ESCROWS).returning(_ESCROWS.c.id))


# The states of an escrow row (models.Escrow.state): only a confirmed escrow is ever recovered.
PENDING, CONFIRMED, VOID = "pending", "confirmed", "void"


def insert_escrow(conn, *, serial: str, email: str, profile: str, blob: bytes, now: datetime,
                  state: str = CONFIRMED) -> int:
    """INSERT a sealed key in the caller's transaction; returns its escrow id."""
    (row,) = _INSERT_ESCROW.rows(conn, dict(serial=serial, email=email, profile=profile, blob=blob,
                                            created_at=now, state=state))
    return row.id


def escrow_of(db: Database, serial: str) -> Escrow | None:
    """The escrow row of certificate `serial` (detached: read its columns freely)."""
    with db.read() as session:
        return session.execute(select(Escrow).where(Escrow.serial == serial)).scalar_one_or_none()


def escrow_in(conn, serial: str):
    """(id, email, profile, state) of the escrow of `serial` in the caller's transaction, or None."""
    return conn.execute(select(Escrow.id, Escrow.email, Escrow.profile, Escrow.state).where(
        Escrow.serial == serial)).first()


def settle_pending(conn, serial: str, state: str, *, was: str = PENDING) -> bool:
    """Move an escrow from `was` (pending) to `state` (confirmed or void) in the caller's transaction:
    False if it was not in `was` (settled meanwhile by another worker, the sweep or the key authority)."""
    return conn.execute(update(Escrow).where(Escrow.serial == serial, Escrow.state == was).values(
        state=state)).rowcount == 1


def certificate_recorded(conn, serial: str) -> bool:
    """Whether the CA has recorded a certificate with this serial (the database all roles share)."""
    return conn.execute(select(Certificate.serial).where(Certificate.serial == serial)).first() is not None


def pending_serials(db: Database, *, limit: int = 500) -> list[tuple[str, datetime]]:
    """(serial, created_at) of pending escrows, oldest first: what the KRA's sweep settles."""
    with db.read() as session:
        return [(serial, created) for serial, created in session.execute(
            select(Escrow.serial, Escrow.created_at).where(Escrow.state == PENDING)
            .order_by(Escrow.created_at).limit(limit))]


def released_request(db: Database, request_id: str) -> tuple[RecoveryRequest | None, list[tuple[str, bytes]]]:
    """A recovery request and its approvals ((officer, evidence) pairs), read in one snapshot."""
    with db.read() as session:
        request = session.get(RecoveryRequest, request_id)
        approvals = [(officer, evidence) for officer, evidence in session.execute(
            select(RecoveryApproval.officer, RecoveryApproval.evidence).where(
                RecoveryApproval.request_id == request_id)).all()]
    return request, approvals


# -- self and officer recovery (ra/recovery.py) -------------------------------------------------------
def own_certificates(db: Database, email: str, user_dn: str, usage: str | None = None) -> list[tuple]:
    """(certificate, escrow id or None) of the user's certificates at `user_dn`, oldest first."""
    with db.read() as session:
        # a pending escrow of a recorded certificate counts: the KRA confirms it before it recovers it
        query = select(Certificate, Escrow.id).outerjoin(Escrow, (Escrow.serial == Certificate.serial) & (
            Escrow.state != VOID)).where(
            func.lower(Certificate.email) == email.lower(), Certificate.user_dn == user_dn)
        if usage:
            query = query.where(Certificate.usage == usage)
        return list(session.execute(query.order_by(Certificate.issued_at)).all())


def escrowed_serials(db: Database, email: str) -> set[str]:
    with db.read() as session:
        return {s for (s,) in session.execute(select(Escrow.serial).where(
            func.lower(Escrow.email) == email.lower(), Escrow.state != VOID))}


def approvals_of(session, request_id: str) -> list[tuple[str, bytes | None]]:
    """(officer, evidence) of a request's approvals, in the order they were given."""
    return [(o, e) for o, e in session.execute(select(RecoveryApproval.officer, RecoveryApproval.evidence).where(
        RecoveryApproval.request_id == request_id).order_by(RecoveryApproval.id))]


def approval_of(session, request_id: str, officer: str) -> RecoveryApproval | None:
    return session.execute(select(RecoveryApproval).where(
        RecoveryApproval.request_id == request_id, RecoveryApproval.officer == officer)).scalars().first()


def approval_evidence(db: Database, request_id: str, officer: str) -> bytes | None:
    """The signed request of `officer`'s approval of `request_id`, or None if they gave none."""
    with db.read() as session:
        row = approval_of(session, request_id, officer)
        return row.evidence if row is not None else None


def approval_count(session, request_id: str) -> int:
    session.flush()
    return session.execute(select(func.count()).where(RecoveryApproval.request_id == request_id)).scalar_one()


def claim_release(session, request_id: str, now: datetime) -> bool:
    """Release an approved, unexpired request, once: False if another release (or expiry) came first."""
    return session.execute(update(RecoveryRequest).where(
        RecoveryRequest.id == request_id, RecoveryRequest.status == "approved",
        RecoveryRequest.expires_at > now).values(status="released", released_at=now)).rowcount == 1


def certificates_by_serials(db: Database, serials: list[str]) -> dict[str, Certificate]:
    with db.read() as session:
        return {c.serial: c for c in session.execute(select(Certificate).where(Certificate.serial.in_(serials))).scalars()}


def recovery_request_ids(db: Database) -> list[str]:
    with db.read() as session:
        return [i for (i,) in session.execute(select(RecoveryRequest.id).order_by(RecoveryRequest.created_at))]


def add_recovery_request(session, **columns) -> None:
    """A new recovery request in the caller's transaction (columns of RecoveryRequest)."""
    session.add(RecoveryRequest(**columns))


def recovery_request_in(session, request_id: str) -> RecoveryRequest | None:
    """The request, attached to the caller's transaction (its status may be changed there)."""
    return session.get(RecoveryRequest, request_id)


def add_approval(session, *, request_id: str, officer: str, at: datetime, evidence: bytes) -> None:
    session.add(RecoveryApproval(request_id=request_id, officer=officer, at=at, evidence=evidence))
