"""Each extra publication target's own state of the outbox rows (table `target_outbox`, drained by
directory_sync/targets.py): an outbox row with no state row for a target is due there."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, bindparam, func, or_, select

from .db import Database
from .models import Outbox, TargetOutbox
from .repos import _upsert_for

_OUTBOX = Outbox.__table__
_STATE = TargetOutbox.__table__
# Every outbox row, with the state of it at the target named by the parameter (none yet: NULLs).
_JOINED = _OUTBOX.outerjoin(_STATE, and_(_STATE.c.outbox_id == _OUTBOX.c.id, _STATE.c.target == bindparam("target")))
_UPDATED = ("attempts", "next_attempt_at", "last_error", "done_at")


def due_at_target(db: Database, target: str, now: datetime, limit: int) -> list:
    """(id, user_dn, email, reason, serial, attempts) of the rows due at `target` now, in outbox order:
    not done there, and not backing off there (attempts 0 where the target has no state of the row)."""
    due = select(_OUTBOX.c.id, _OUTBOX.c.user_dn, _OUTBOX.c.email, _OUTBOX.c.reason, _OUTBOX.c.serial,
                 func.coalesce(_STATE.c.attempts, 0).label("attempts")).select_from(_JOINED).where(
        _STATE.c.done_at.is_(None), or_(_STATE.c.next_attempt_at.is_(None), _STATE.c.next_attempt_at <= now),
    ).order_by(_OUTBOX.c.id).limit(limit)
    return db.query(due, {"target": target})


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
    pending = select(func.count(), func.count(_STATE.c.attempts)).select_from(_JOINED).where(
        _STATE.c.done_at.is_(None))
    depth, failing = db.query(pending, {"target": target})[0]
    return {"depth": depth, "failing": failing}
