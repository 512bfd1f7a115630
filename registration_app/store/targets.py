"""Each extra publication target's own state of the outbox rows (table `target_outbox`, drained by
directory_sync/targets.py): an outbox row with no state row for a target is due there.

A drain reads only what is due (migration 0010): the target's rows tried and not done, through
ix_target_outbox_due, and the outbox rows above the target's `seen_through` (target_progress) that it
has no state of, by the outbox's primary key. `seen_through` moves up past rows that have a state at the
target, but never past a row younger than `settled_before`: on PostgreSQL a row with a lower id may
commit after one with a higher id, and would be skipped if the mark passed it before it was visible."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, bindparam, func, literal, select

from .db import Database
from .models import Outbox, TargetOutbox, TargetProgress
from .repos import _upsert_for

_OUTBOX = Outbox.__table__
_STATE = TargetOutbox.__table__
_PROGRESS = TargetProgress.__table__
# The outbox rows with the state of each at the target named by the parameter (none yet: NULLs).
_JOINED = _OUTBOX.outerjoin(_STATE, and_(_STATE.c.outbox_id == _OUTBOX.c.id, _STATE.c.target == bindparam("target")))
_UPDATED = ("attempts", "next_attempt_at", "last_error", "done_at")
_ROW = (_OUTBOX.c.id, _OUTBOX.c.user_dn, _OUTBOX.c.email, _OUTBOX.c.reason, _OUTBOX.c.serial)
_SEEN_THROUGH = select(_PROGRESS.c.seen_through).where(_PROGRESS.c.target == bindparam("target"))
# Rows above the mark the target has no state of: due there (an index range of the outbox's key).
_UNSEEN = select(*_ROW, literal(0).label("attempts")).select_from(_JOINED).where(
    _OUTBOX.c.id > bindparam("after"), _STATE.c.outbox_id.is_(None)).order_by(_OUTBOX.c.id)
# Rows the target tried and has not done (ix_target_outbox_due), due again once their back-off ends.
_TRIED = select(*_ROW, _STATE.c.attempts).select_from(_STATE.join(_OUTBOX, _OUTBOX.c.id == _STATE.c.outbox_id)).where(
    _STATE.c.target == bindparam("target"), _STATE.c.done_at.is_(None))
_FIRST_UNSEEN = select(func.min(_OUTBOX.c.id)).select_from(_JOINED).where(
    _OUTBOX.c.id > bindparam("after"), _STATE.c.outbox_id.is_(None))
_LAST_SETTLED = select(func.max(_OUTBOX.c.id)).where(
    _OUTBOX.c.id > bindparam("after"), _OUTBOX.c.created_at <= bindparam("settled_before"))


def seen_through(db: Database, target: str) -> int:
    """The outbox id up to which every row has a state at `target` (0: none recorded yet)."""
    found = db.query(_SEEN_THROUGH, {"target": target})
    return found[0][0] if found else 0


def due_at_target(db: Database, target: str, now: datetime, limit: int) -> list:
    """(id, user_dn, email, reason, serial, attempts) of the rows due at `target` now, in outbox order:
    not done there, and not backing off there (attempts 0 where the target has no state of the row)."""
    after = seen_through(db, target)
    tried = db.query(_TRIED.where(_STATE.c.next_attempt_at <= bindparam("now")).order_by(_STATE.c.outbox_id)
                     .limit(limit), {"target": target, "now": now})
    unseen = db.query(_UNSEEN.limit(limit), {"target": target, "after": after})
    rows = {row.id: row for row in [*unseen, *tried]}  # a row recorded between the two reads: its state
    return [rows[i] for i in sorted(rows)][:limit]


def advance_at_target(db: Database, target: str, settled_before: datetime) -> int:
    """Move `target`'s mark up to the last outbox row such that every row up to it has a state there
    and it was created before `settled_before`; returns the mark. Reads only the rows above the mark."""
    after = seen_through(db, target)
    first_unseen = db.query(_FIRST_UNSEEN, {"target": target, "after": after})[0][0]
    settled = db.query(_LAST_SETTLED, {"after": after, "settled_before": settled_before})[0][0]
    if settled is None:
        return after
    mark = settled if first_unseen is None else min(settled, first_unseen - 1)
    if mark <= after:
        return after
    dialect_insert = _upsert_for(db)

    def work(conn):
        statement = dialect_insert(_PROGRESS).values(target=target, seen_through=mark)
        conn.execute(statement.on_conflict_do_update(
            index_elements=["target"], set_={"seen_through": func.max(_PROGRESS.c.seen_through, mark)}
            if db.engine.dialect.name == "sqlite" else
            {"seen_through": func.greatest(_PROGRESS.c.seen_through, mark)}))
    db.run(work, core=True)
    return mark


def record_at_target(db: Database, target: str, states: list[dict]) -> None:
    """The target's state of some rows, in one transaction: each of `states` gives outbox_id, attempts,
    next_attempt_at, last_error and done_at. INSERT, or UPDATE the state of the same (target, outbox_id):
    two workers may publish the same row."""
    dialect_insert = _upsert_for(db)

    def work(conn):
        for values in states:
            statement = dialect_insert(_STATE).values(target=target, **values)
            conn.execute(statement.on_conflict_do_update(
                index_elements=["target", "outbox_id"], set_={k: statement.excluded[k] for k in _UPDATED}))
    db.run(work, core=True)


def target_status(db: Database, target: str) -> dict:
    """Rows not yet done at `target`, and how many of them failed at least once there."""
    after = seen_through(db, target)
    failing = db.query(select(func.count()).select_from(_TRIED.subquery()), {"target": target})[0][0]
    unseen = db.query(select(func.count()).select_from(_UNSEEN.subquery()), {"target": target, "after": after})[0][0]
    return {"depth": failing + unseen, "failing": failing}
