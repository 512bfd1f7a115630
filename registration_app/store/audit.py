"""Hash-chained audit log: each row's hash covers its content and the previous row's hash.

Appends lock the single `audit_head` row (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE on
PostgreSQL) so the chain stays linear when several workers write at once. Deleting or changing any
row, or truncating the tail, breaks `verify` (the head remembers the last id and hash).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select
from sqlalchemy.orm import Session

from .models import AuditEvent, AuditHead

GENESIS = "0" * 64


def _digest(prev_hash: str, at: datetime, event: str, outcome: str, actor: str, subject: str,
            detail: dict) -> str:
    body = json.dumps(
        [prev_hash, at.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds"),
         event, outcome, actor, subject, detail],
        sort_keys=True, separators=(",", ":"), default=str,
    )
    return hashlib.sha256(body.encode()).hexdigest()


def append(session: Session, *, event: str, outcome: str, actor: str, subject: str,
           detail: dict | None = None, now: datetime | None = None) -> AuditEvent:
    now = now or datetime.now(timezone.utc)
    detail = json.loads(json.dumps(detail or {}, default=str))
    head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one_or_none()
    if head is None:
        head = AuditHead(id=1, last_id=0, last_hash=GENESIS)
        session.add(head)
    digest = _digest(head.last_hash, now, event, outcome, actor, subject, detail)
    row = AuditEvent(at=now, event=event, outcome=outcome, actor=actor[:512], subject=subject[:512],
                     detail=detail, prev_hash=head.last_hash, hash=digest)
    session.add(row)
    session.flush()
    head.last_id, head.last_hash = row.id, digest
    return row


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    rows: int
    problem: str | None = None


def verify(session: Session) -> AuditReport:
    prev = GENESIS
    count = 0
    last_id = 0
    for row in session.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().yield_per(1000):
        if row.prev_hash != prev:
            return AuditReport(False, count, f"row {row.id}: previous hash does not match (a row before it was changed or deleted)")
        if _digest(row.prev_hash, row.at, row.event, row.outcome, row.actor, row.subject, row.detail) != row.hash:
            return AuditReport(False, count, f"row {row.id}: content does not match its hash (changed)")
        prev, last_id = row.hash, row.id
        count += 1
    head = session.get(AuditHead, 1)
    if head is not None and (head.last_id != last_id or head.last_hash != prev):
        return AuditReport(False, count, f"the log ends at row {last_id} but the head says {head.last_id} (rows deleted at the end)")
    return AuditReport(True, count)
