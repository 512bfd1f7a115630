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

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from .db import connection_of
from .models import AuditEvent, AuditHead

GENESIS = "0" * 64

_HEADS, _EVENTS = AuditHead.__table__, AuditEvent.__table__
_SELECT_HEAD = select(_HEADS.c.last_id, _HEADS.c.last_hash).where(_HEADS.c.id == 1).with_for_update()
_UPDATE_HEAD = update(_HEADS).where(_HEADS.c.id == 1)
_INSERT_EVENT = insert(_EVENTS)
# Several rows: one executemany, then their ids read back. (INSERT ... RETURNING with
# sort_by_parameter_order runs one statement per row on SQLite, which cannot promise the order.)
_APPENDED = select(_EVENTS.c.id, _EVENTS.c.hash).where(_EVENTS.c.id > bindparam("last_id")).order_by(_EVENTS.c.id)


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
    ids, rows = _append(connection_of(session), [{"event": event, "outcome": outcome, "actor": actor,
                                                  "subject": subject, "detail": detail}],
                        now or datetime.now(timezone.utc))
    return AuditEvent(id=ids[0], **rows[0])


def append_many(session: Session | Connection, events: list[dict], now: datetime) -> list[int]:
    """Append rows to the chain: lock the head, chain each row to the previous hash, move the head;
    returns the new rows' ids.

    A bulk run of 200 certificates pays one head lock and one executemany instead of 200 INSERTs.
    Rows must get ascending ids in list order (the head lock keeps other writers out, and the hashes
    read back prove the order); anything else raises and rolls back.
    """
    if not events:
        return []
    # Core statements on the session's connection, not the ORM's unit of work: this runs in nearly
    # every write transaction, and a flush cost more CPU than the SQL it sends.
    return _append(connection_of(session), events, now)[0]


def _text(value: str) -> str:
    """A text column's value: at most 512 characters, NUL shown as U+FFFD. PostgreSQL refuses NUL in
    text, and a denial must be recorded whatever the client sent (an email with \\0 in it, say)."""
    return value[:512].replace("\0", "\ufffd")


def _insert_genesis_head(conn: Connection) -> None:
    """The head row, unless a concurrent first append made it: ON CONFLICT DO NOTHING. (A SELECT ... FOR
    UPDATE of a row that does not exist locks nothing, so on PostgreSQL two first appends would both
    insert it, and the loser's unique violation would fail its whole transaction.)"""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        conn.execute(insert(_HEADS), {"id": 1, "last_id": 0, "last_hash": GENESIS})
        return
    conn.execute(dialect_insert(_HEADS).on_conflict_do_nothing(index_elements=["id"]),
                 {"id": 1, "last_id": 0, "last_hash": GENESIS})


def _append(conn: Connection, events: list[dict], now: datetime) -> tuple[list[int], list[dict]]:
    """(ids, rows as inserted) of `append_many`."""
    head = conn.execute(_SELECT_HEAD).first()
    if head is None:
        _insert_genesis_head(conn)  # waits for a concurrent first append, if any, to commit
        head = conn.execute(_SELECT_HEAD).first()  # ours, or the winner's row (with its rows): now locked
    last_id, prev = head.last_id or 0, head.last_hash
    rows = []
    for e in events:
        detail = json.loads(json.dumps(e.get("detail") or {}, default=str))
        actor, subject = _text(e["actor"]), _text(e["subject"])
        digest = _digest(prev, now, e["event"], e["outcome"], actor, subject, detail)
        rows.append(dict(at=now, event=e["event"], outcome=e["outcome"], actor=actor, subject=subject,
                         detail=detail, prev_hash=prev, hash=digest))
        prev = digest
    if len(rows) == 1:
        ids = [conn.execute(_INSERT_EVENT, rows[0]).inserted_primary_key[0]]
        in_order = ids[0] > last_id
    else:
        conn.execute(_INSERT_EVENT, rows)
        appended = conn.execute(_APPENDED, {"last_id": last_id}).all()
        ids = [i for i, _ in appended]
        in_order = [h for _, h in appended] == [r["hash"] for r in rows]
    if not in_order:
        raise RuntimeError("audit rows were not inserted in chain order")
    conn.execute(_UPDATE_HEAD, {"last_id": ids[-1], "last_hash": prev})
    return ids, rows


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
