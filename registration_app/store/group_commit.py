"""Group commit: the units of work that this process's threads hand to `Database.run(core=True)` while
another transaction holds the writer lock are committed together, in ONE transaction and one fsync,
each in a SAVEPOINT of its own.

Why: on SQLite every write transaction queues on one lock, which it holds until its COMMIT's fsync has
returned (PERFORMANCE.md, "The transaction"); under load the fsync is most of that time. So while one
transaction commits, the next ones gather, and whichever thread leads next runs them all in one.

What stays true:
- one unit is still one all-or-nothing unit: its SAVEPOINT is released when its work returns and rolled
  back when it raises, so a failing unit takes only its own writes with it and raises its own error;
  the others of the group commit (a group of one unit has no savepoint: its failure rolls the
  transaction back);
- nobody is answered before the commit that holds their unit: each caller returns (or raises) only
  after the group's COMMIT returned; if the COMMIT fails, every unit of the group gets that error, and a
  process that dies before it answers nobody;
- the units run one after the other on one connection, in the order they arrived, so each sees the
  writes of those before it as if they had committed first: a nonce used by an earlier unit refuses
  a later one, and the audit rows stay one chain (each append reads the head the previous one moved);
  the checkpoint outside the database moves to the last unit that committed rows (anchor.py);
- synchronous=FULL as before: the group's COMMIT is as durable as each of its units' would have been.

The thread that finds no group running leads: it takes the writer lock (waiting there is where the
others gather), runs every unit waiting by then (at most MAX_UNITS), commits, answers them, and hands the
lead to the first unit that arrived meanwhile. A unit whose work itself writes through `Database.run`
(a transaction inside another) runs that inner transaction on its own, as without group commit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import OperationalError

from .prepared import Prepared

if TYPE_CHECKING:
    from .db import Database

MAX_UNITS = 64
_SAVEPOINT = "autoenroll_unit"


class _Unit:
    __slots__ = ("work", "done", "lead", "result", "error")

    def __init__(self, work: Callable[[Any], Any]) -> None:
        self.work = work
        self.done = threading.Event()
        self.lead = False  # woken to lead the next group, not answered
        self.result: Any = None
        self.error: BaseException | None = None


class GroupCommit:
    def __init__(self, db: Database) -> None:
        self._db = db
        self._lock = threading.Lock()
        self._pending: list[_Unit] = []
        self._leading = False
        self._local = threading.local()

    def run(self, work: Callable[[Any], Any], attempts: int) -> Any:
        writers = self._db._writers
        if getattr(self._local, "leading", False) or (writers is not None and writers.held_here()):
            # a transaction inside another one of this thread (a unit's work writing again): on its own,
            # as without group commit; queueing behind a leader who waits for our lock would never end
            return self._db._run(work, attempts, self._db._write)
        unit = _Unit(work)
        with self._lock:
            self._pending.append(unit)
            lead = not self._leading
            self._leading = True
        if not lead:
            unit.done.wait()
            lead = unit.lead
            if lead:  # the previous leader handed over: our unit is still waiting, in the next group
                unit.lead = False
                unit.done.clear()
        if lead:
            self._lead(attempts)
        if unit.error is not None:
            raise unit.error
        return unit.result

    def _lead(self, attempts: int) -> None:
        self._local.leading = True
        try:
            self._commit_group(attempts)
        finally:
            self._local.leading = False
            with self._lock:
                if self._pending:
                    successor = self._pending[0]
                    successor.lead = True
                    successor.done.set()
                else:
                    self._leading = False

    def _commit_group(self, attempts: int) -> None:
        group: list[_Unit] = []
        try:
            self._db._run(lambda conn: self._run_units(conn, group), attempts, self._db._write)
        except BaseException as exc:  # BEGIN never succeeded, or the COMMIT failed: nothing of the group stands
            for unit in group:
                if unit.error is None:
                    unit.error, unit.result = exc, None
            if not group:  # the leader's own unit never ran: it gets the error
                with self._lock:
                    mine, self._pending[:] = self._pending[:1], self._pending[1:]
                for unit in mine:
                    unit.error = exc
                    group.append(unit)
        finally:
            for unit in group:
                unit.done.set()

    def _run_units(self, conn, group: list[_Unit]) -> None:
        """Inside the group's transaction (writer lock held, BEGIN done): take the units waiting now and
        run each in its savepoint. Called again with the same units when the database was busy (the
        transaction rolled back: their results are void)."""
        if not group:
            with self._lock:
                group.extend(self._pending[:MAX_UNITS])
                del self._pending[:MAX_UNITS]
        anchor = self._db.anchor
        if len(group) == 1:  # alone: its transaction is its savepoint (a failure rolls it all back)
            self._run_alone(conn, group[0], anchor)
            return
        for unit in group:
            unit.result, unit.error = None, None
            mark = anchor.mark() if anchor is not None else None
            Prepared.sql(conn, f"SAVEPOINT {_SAVEPOINT}")
            try:
                unit.result = unit.work(conn)
            except BaseException as exc:
                unit.error = exc
                Prepared.sql(conn, f"ROLLBACK TO SAVEPOINT {_SAVEPOINT}")
                Prepared.sql(conn, f"RELEASE SAVEPOINT {_SAVEPOINT}")
                if anchor is not None:
                    anchor.restore(mark)
                if isinstance(exc, OperationalError) and _busy(exc):
                    raise  # the lock was lost: the group is retried (Database._run), nothing has committed
                continue
            Prepared.sql(conn, f"RELEASE SAVEPOINT {_SAVEPOINT}")

    @staticmethod
    def _run_alone(conn, unit: _Unit, anchor) -> None:
        """A group of one unit needs no SAVEPOINT and RELEASE: when its work raises, the error leaves the
        transaction, which rolls back whole (nothing else is in it), and the unit gets its own error;
        a busy database retries the group as above."""
        unit.result, unit.error = None, None
        mark = anchor.mark() if anchor is not None else None
        try:
            unit.result = unit.work(conn)
        except BaseException as exc:
            unit.error = exc
            if anchor is not None:
                anchor.restore(mark)
            raise


def _busy(exc: OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)
