"""Keyed hash chain: each row's hash is an HMAC-SHA256, under the server's audit key (keys.py), of its
content and the previous row's hash. Someone who can write the database but has not the key cannot
rewrite the log consistently: `verify` recomputes every HMAC.

Appends lock the single `audit_head` row (BEGIN IMMEDIATE on SQLite, SELECT ... FOR UPDATE on
PostgreSQL) so the chain stays linear when several workers write at once. Deleting or changing any
row breaks `verify`; the tail cut off with the head, or the whole table emptied, is shown by the
checkpoint outside the database (anchor.py), which every committed append moves forward.

The key (and the anchor) come with the connection: `Database` puts them in its engines' execution
options, so every append of that database uses them whoever calls it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import bindparam, insert, inspect, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from ..core.errors import ConfigError
from .anchor import AuditAnchor, Checkpoint
from .db import connection_of, insert_if_absent
from .prepared import Prepared
from .keys import StoreKeys
from .models import AuditEvent, AuditHead

GENESIS = "0" * 64

_HEADS, _EVENTS = AuditHead.__table__, AuditEvent.__table__
_SELECT_HEAD = Prepared(select(_HEADS.c.last_id, _HEADS.c.last_hash, _HEADS.c.rows, _HEADS.c.keyed).where(
    _HEADS.c.id == 1).with_for_update())
_UPDATE_HEAD = Prepared(update(_HEADS).where(_HEADS.c.id == 1).values(
    last_id=bindparam("new_last_id"), last_hash=bindparam("new_last_hash"), rows=bindparam("new_rows")))
_INSERT_EVENT = Prepared(insert(_EVENTS))
# PostgreSQL: ids come from the table's sequence (a rolled-back append leaves a gap), so the rows
# inserted in one executemany are read back. (INSERT ... RETURNING with sort_by_parameter_order runs
# one statement per row.) SQLite hands out max(id) + 1, and the writer lock keeps every other appender
# out until the commit: there the ids are given, last_id + 1 onwards, and nothing is read back.
_APPENDED = Prepared(select(_EVENTS.c.id, _EVENTS.c.hash).where(_EVENTS.c.id > bindparam("last_id")).order_by(
    _EVENTS.c.id))


@dataclass(frozen=True)
class PreparedEvent:
    """An audit row's content, normalised and serialised ahead (`prepare`, before the writer lock):
    the append inside the transaction only links it to the chain (previous hash, its own HMAC)."""

    row: dict  # at, event, outcome, actor, subject, detail: as the row is stored
    tail: bytes  # the keyed body after the previous hash (see `_linked`)


def prepare(events: list[dict], now: datetime) -> list[PreparedEvent]:
    """Each event as `append_many` will store it at `now`; everything but the chain link is done here."""
    prepared = []
    for e in events:
        detail = json.loads(json.dumps(e.get("detail") or {}, default=str))
        actor, subject = _text(e["actor"]), _text(e["subject"])
        # _body([prev, ...]) is '["' + prev + '",' followed by this: the rest never depends on prev
        tail = _body(GENESIS, now, e["event"], e["outcome"], actor, subject, detail)[len(GENESIS) + 4:]
        prepared.append(PreparedEvent(dict(at=now, event=e["event"], outcome=e["outcome"], actor=actor,
                                           subject=subject, detail=detail), tail))
    return prepared


def _linked(key: bytes, prev_hash: str, event: PreparedEvent) -> str:
    """The same HMAC as keyed_digest(key, prev_hash, ...) of the event's content."""
    return hmac.new(key, b'["' + prev_hash.encode("ascii") + b'",' + event.tail, hashlib.sha256).hexdigest()


def _body(prev_hash: str, at: datetime, event: str, outcome: str, actor: str, subject: str,
          detail: dict) -> bytes:
    return json.dumps(
        [prev_hash, at.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds"),
         event, outcome, actor, subject, detail],
        sort_keys=True, separators=(",", ":"), default=str,
    ).encode()


def keyed_digest(key: bytes, prev_hash: str, at: datetime, event: str, outcome: str, actor: str,
                 subject: str, detail: dict) -> str:
    return hmac.new(key, _body(prev_hash, at, event, outcome, actor, subject, detail), hashlib.sha256).hexdigest()


def unkeyed_digest(prev_hash: str, at: datetime, event: str, outcome: str, actor: str, subject: str,
                   detail: dict) -> str:
    """The plain SHA-256 chain of databases before revision 0005 (secrets.py re-chains them)."""
    return hashlib.sha256(_body(prev_hash, at, event, outcome, actor, subject, detail)).hexdigest()


def keys_of(conn: Connection) -> tuple[StoreKeys, AuditAnchor | None]:
    options = conn.get_execution_options()
    return options.get("autoenroll_keys") or StoreKeys(), options.get("autoenroll_anchor")


UNKEYED_CHAIN = ("the audit log predates its key (schema 0005): run `autoenroll init` once to move the "
                 "server's secrets out of the database and re-chain the log under the audit key")


def append(session: Session, *, event: str, outcome: str, actor: str, subject: str,
           detail: dict | None = None, now: datetime | None = None) -> AuditEvent:
    ids, rows = _append(connection_of(session), [{"event": event, "outcome": outcome, "actor": actor,
                                                  "subject": subject, "detail": detail}],
                        now or datetime.now(timezone.utc))
    return AuditEvent(id=ids[0], **rows[0])


def append_many(session: Session | Connection, events: Sequence[dict | PreparedEvent], now: datetime) -> list[int]:
    """Append rows to the chain: lock the head, chain each row to the previous hash, move the head;
    returns the new rows' ids.

    A bulk run of 200 certificates pays one head lock and one executemany instead of 200 INSERTs.
    Rows must get ascending ids in list order (the head lock keeps other writers out, and the hashes
    read back prove the order); anything else raises and rolls back. Events already `prepare`d (before
    the writer lock) keep their own time; the others are stored at `now`.
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


def _append(conn: Connection, events: Sequence[dict | PreparedEvent], now: datetime) -> tuple[list[int], list[dict]]:
    """(ids, rows as inserted) of `append_many`."""
    keys, anchor = keys_of(conn)
    key = keys.need("audit")
    prepared = [e if isinstance(e, PreparedEvent) else prepare([e], now)[0] for e in events]
    heads = _SELECT_HEAD.rows(conn)
    if not heads:
        # waits for a concurrent first append, if any, to commit
        insert_if_absent(conn, _HEADS, {"id": 1, "last_id": 0, "last_hash": GENESIS, "rows": 0, "keyed": 1})
        heads = _SELECT_HEAD.rows(conn)  # ours, or the winner's row (with its rows): now locked
    head = heads[0]
    if not head.keyed:
        raise ConfigError(UNKEYED_CHAIN)
    last_id, prev = head.last_id or 0, head.last_hash
    before = prev
    rows = []
    for event in prepared:
        digest = _linked(key, prev, event)
        rows.append(dict(event.row, prev_hash=prev, hash=digest))
        prev = digest
    if conn.dialect.name == "sqlite":  # ids given (see _APPENDED): a taken one fails the INSERT
        ids = list(range(last_id + 1, last_id + 1 + len(rows)))
        _INSERT_EVENT.run(conn, [dict(row, id=row_id) for row, row_id in zip(rows, ids)])
    else:
        _INSERT_EVENT.run(conn, rows)
        appended = _APPENDED.rows(conn, {"last_id": last_id})
        ids = [i for i, _ in appended]
        if [h for _, h in appended] != [r["hash"] for r in rows]:
            raise RuntimeError("audit rows were not inserted in chain order")
    count = (head.rows or 0) + len(rows)
    _UPDATE_HEAD.run(conn, {"new_last_id": ids[-1], "new_last_hash": prev, "new_rows": count})
    if anchor is not None:
        anchor.appended(before, Checkpoint(count, ids[-1], prev))
    return ids, rows


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    rows: int
    problem: str | None = None
    checkpoint: Checkpoint | None = None  # what the chain was checked against, if anything


def verify(session: Session | Connection, keys: StoreKeys | None = None,
           checkpoint: Checkpoint | None = None) -> AuditReport:
    """Walk the chain, recompute every HMAC, and compare its end with the head row and with the
    checkpoint kept outside the database (the chain may have grown past it, never shrunk). `keys`
    default to those of the session's Database."""
    conn = connection_of(session)
    keys = keys or keys_of(conn)[0]
    tables = inspect(conn)
    missing = [t for t in ("audit", "audit_head") if not tables.has_table(t)]
    if missing:
        return AuditReport(False, 0, f"the table {missing[0]} is missing from the database (dropped?)", checkpoint)
    key = keys.need("audit")
    head = conn.execute(select(_HEADS).where(_HEADS.c.id == 1)).first()
    if head is not None and not head.keyed:
        return AuditReport(False, 0, UNKEYED_CHAIN, checkpoint)
    rows = conn.execution_options(yield_per=1000).execute(select(_EVENTS).order_by(_EVENTS.c.id))
    try:  # a server-side cursor on PostgreSQL: closed however the walk ends
        report = _walk(rows, key, checkpoint)
    finally:
        rows.close()
    if not report.ok:
        return report
    count, last_id, prev = report.rows, report.last_id, report.last_hash
    if head is None:
        if count:
            return AuditReport(False, count, "the head row is missing (deleted)", checkpoint)
    elif head.last_id != last_id or head.last_hash != prev or head.rows != count:
        return AuditReport(False, count, f"the log ends at row {last_id} but the head says {head.last_id} (rows deleted at the end)", checkpoint)
    return AuditReport(True, count, None, checkpoint)


@dataclass(frozen=True)
class _Walked:
    ok: bool
    rows: int
    problem: str | None = None
    checkpoint: Checkpoint | None = None
    last_id: int = 0
    last_hash: str = GENESIS


def _walk(rows, key: bytes, checkpoint: Checkpoint | None):
    prev, count, last_id = GENESIS, 0, 0
    anchored = checkpoint is None or checkpoint.rows == 0
    for row in rows:
        if row.prev_hash != prev:
            return AuditReport(False, count, f"row {row.id}: previous hash does not match (a row before it was changed or deleted)", checkpoint)
        if keyed_digest(key, row.prev_hash, row.at, row.event, row.outcome, row.actor, row.subject,
                        row.detail) != row.hash:
            return AuditReport(False, count, f"row {row.id}: content does not match its keyed hash (changed, "
                                             "or written without the audit key)", checkpoint)
        prev, last_id = row.hash, row.id
        count += 1
        if checkpoint is not None and row.id == checkpoint.last_id:
            if row.hash != checkpoint.last_hash or count != checkpoint.rows:
                return AuditReport(False, count, f"row {row.id} is not the row of the checkpoint outside the "
                                                 "database (the log was rewritten)", checkpoint)
            anchored = True
    if not anchored:
        return AuditReport(False, count, f"the log ends at row {last_id} ({count} rows) but the checkpoint outside "
                                         f"the database says row {checkpoint.last_id} ({checkpoint.rows} rows): "
                                         "rows were deleted", checkpoint)
    return _Walked(True, count, None, checkpoint, last_id, prev)
