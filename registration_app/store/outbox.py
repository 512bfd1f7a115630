"""The outbox: publication rows queued in the transaction of each change, drained by the publisher
(directory_sync/publisher.py) until LDAP accepts them; and the certificate rows a publication plans from."""

from __future__ import annotations

import functools
from datetime import datetime, timedelta, timezone

from sqlalchemy import bindparam, or_, select, update

from .db import Database
from .prepared import Prepared
from .models import Certificate, CrlState, Outbox

_OUTBOX = Outbox.__table__
_CERTIFICATES = Certificate.__table__
# What wanted_values reads of a user's rows (the columns of repos.certificates_of), for one user or many.
_ROW_COLUMNS = [_CERTIFICATES.c[name] for name in ("der", "status", "profile", "usage", "not_after", "issued_at")]
_ROWS_OF = Prepared(select(*_ROW_COLUMNS).where(_CERTIFICATES.c.user_dn == bindparam("dn")))
_ROWS_OF_MANY = select(_CERTIFICATES.c.user_dn, *_ROW_COLUMNS).where(
    _CERTIFICATES.c.user_dn.in_(bindparam("dns", expanding=True)))


def planned_rows_of(db: Database, user_dn: str) -> list:
    """The user's certificate rows as committed now (one statement, its own snapshot)."""
    return db.query(_ROWS_OF, {"dn": user_dn})


def planned_rows_of_many(db: Database, dns: list[str]) -> dict[str, list]:
    """`planned_rows_of` for several users in one statement, by DN (users without rows are absent)."""
    rows: dict[str, list] = {}
    for row in db.query(_ROWS_OF_MANY, {"dns": dns}):
        rows.setdefault(row.user_dn, []).append(row)
    return rows


def crl_der(db: Database) -> bytes | None:
    with db.read() as session:
        state = session.get(CrlState, 1)
        return state.der if state is not None else None


def pending(db: Database, user_dn: str) -> bool:
    """Whether publication rows of this user still wait."""
    with db.read() as session:
        return session.execute(select(Outbox.id).where(
            Outbox.user_dn == user_dn, Outbox.done_at.is_(None)).limit(1)).first() is not None


def open_rows_with_certificates(db: Database, user_dn: str, certificates_of) -> tuple[list, list]:
    """(the user's open outbox rows, the user's certificate rows), in one snapshot; no rows: ([], [])."""
    with db.read() as session:
        rows = session.execute(select(Outbox.id, Outbox.email, Outbox.reason, Outbox.serial).where(
            Outbox.user_dn == user_dn, Outbox.done_at.is_(None))).all()
        if not rows:
            return [], []
        return rows, certificates_of(session, user_dn)


def _due(now: datetime, user_dn: str | None):
    """The conditions of a row `claim` may take."""
    due = [_OUTBOX.c.done_at.is_(None), _OUTBOX.c.next_attempt_at <= now,
           or_(_OUTBOX.c.claimed_until.is_(None), _OUTBOX.c.claimed_until < now)]
    return due if user_dn is None else [*due, _OUTBOX.c.user_dn == user_dn]


def claim(db: Database, now: datetime, user_dn: str | None, limit: int, hold: timedelta) -> list[Outbox]:
    """Due rows (only this user's when given), each claimed for `hold` by this worker: a row another
    worker claimed meanwhile is left to it.

    A read first: the write transaction (the file's writer lock, on SQLite) only when a row is due.
    Every worker's outbox thread asks every few seconds, nearly always for nothing, and took the lock
    each time, in the enrollments' way."""
    if not db.query(select(_OUTBOX.c.id).where(*_due(now, user_dn)).limit(1)):
        return []

    def work(session):
        query = select(Outbox).where(*_due(now, user_dn)).order_by(Outbox.id).limit(limit)
        rows = list(session.execute(query).scalars())
        claimed = []
        for row in rows:
            result = session.execute(update(Outbox).where(
                Outbox.id == row.id,
                or_(Outbox.claimed_until.is_(None), Outbox.claimed_until < now),
            ).values(claimed_until=now + hold))
            if result.rowcount == 1:
                claimed.append(row)
        return claimed
    return db.run(work)


def due_now(db: Database, ids: list[int], note: str) -> None:
    """Rows held back for an inline attempt, due for the worker now."""
    db.run(lambda conn: conn.execute(update(_OUTBOX).where(
        _OUTBOX.c.id.in_(ids), _OUTBOX.c.done_at.is_(None)).values(
        next_attempt_at=datetime.now(timezone.utc), last_error=note[:500])), core=True)


def mark_done(db: Database, ids: list[int], note: str | None = None) -> None:
    """Mark rows done in one transaction, 500 ids per statement (no audit rows: see mark_published)."""
    def work(conn):
        now = datetime.now(timezone.utc)
        for start in range(0, len(ids), 500):
            conn.execute(update(_OUTBOX).where(_OUTBOX.c.id.in_(ids[start:start + 500])).values(
                done_at=now, claimed_until=None, last_error=note))

    db.run(work, core=True)


def retry_later(db: Database, retries: list[tuple[int, int, datetime]], note: str) -> None:
    """(row id, attempts, next attempt) for each row LDAP refused, in one transaction."""
    def work(session):
        for row_id, attempts, next_attempt_at in retries:
            session.execute(update(Outbox).where(Outbox.id == row_id).values(
                attempts=attempts, next_attempt_at=next_attempt_at, claimed_until=None, last_error=note[:500]))
    db.run(work)



_MARK_AT_ONCE = 32  # ids per statement: one prepared statement per count up to this (a prepared one takes no list)


@functools.lru_cache(maxsize=_MARK_AT_ONCE)
def _mark_done(count: int) -> Prepared:
    """UPDATE ... RETURNING of `count` ids (i0, i1, ...) not done yet."""
    return Prepared(update(_OUTBOX).where(
        _OUTBOX.c.done_at.is_(None), _OUTBOX.c.id.in_([bindparam(f"i{k}") for k in range(count)])).values(
        done_at=bindparam("done_at"), claimed_until=None, last_error=None).returning(_OUTBOX.c.id))


def mark_published(conn, batch: list[tuple[str, list]]) -> list[dict]:
    """In the caller's transaction: the rows of each (target, rows) not yet done become done.
    Returns one directory.published audit event per target with rows marked, for the caller to
    append (with its own events, in one chain step)."""
    ids = [r.id for _target, rows in batch for r in rows]
    now = datetime.now(timezone.utc)
    open_ids = set()  # the rows this transaction marked (UPDATE ... RETURNING: one statement)
    for start in range(0, len(ids), _MARK_AT_ONCE):
        chunk = ids[start:start + _MARK_AT_ONCE]
        open_ids.update(row.id for row in _mark_done(len(chunk)).rows(
            conn, {"done_at": now, **{f"i{k}": row_id for k, row_id in enumerate(chunk)}}))
    if not open_ids:
        return []
    events = []
    for target, rows in batch:
        marked = [r for r in rows if r.id in open_ids]
        if marked:
            events.append(dict(event="directory.published", outcome="done", actor="outbox",
                               subject="(CA entry)" if target == "\0crl" else marked[0].email,
                               detail={"dn": None if target == "\0crl" else target,
                                       "reasons": sorted({r.reason for r in marked}),
                                       "serials": [r.serial for r in marked if r.serial]}))
    return events
