"""The KRA's records: escrowed keys and what a recovery needs to read of its request."""

from __future__ import annotations

from datetime import datetime
from typing import cast

from sqlalchemy import Table, insert, select

from .db import Database
from .models import Escrow, RecoveryApproval, RecoveryRequest

_INSERT_ESCROW = insert(cast(Table, Escrow.__table__))  # a mapped class's __table__ is a Table


def insert_escrow(conn, *, serial: str, email: str, profile: str, blob: bytes, now: datetime) -> int:
    """INSERT a sealed key in the caller's transaction; returns its escrow id."""
    return conn.execute(_INSERT_ESCROW, dict(serial=serial, email=email, profile=profile, blob=blob,
                                             created_at=now)).inserted_primary_key[0]


def escrow_of(db: Database, serial: str) -> Escrow | None:
    """The escrow row of certificate `serial` (detached: read its columns freely)."""
    with db.read() as session:
        return session.execute(select(Escrow).where(Escrow.serial == serial)).scalar_one_or_none()


def released_request(db: Database, request_id: str) -> tuple[RecoveryRequest | None, list[tuple[str, bytes]]]:
    """A recovery request and its approvals ((officer, evidence) pairs), read in one snapshot."""
    with db.read() as session:
        request = session.get(RecoveryRequest, request_id)
        approvals = [(officer, evidence) for officer, evidence in session.execute(
            select(RecoveryApproval.officer, RecoveryApproval.evidence).where(
                RecoveryApproval.request_id == request_id)).all()]
    return request, approvals
