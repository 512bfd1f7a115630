"""Group commit (store/group_commit.py) on a real database, SQLite or the run's PostgreSQL: units that
wait while another transaction holds the writer lock share one COMMIT, each in its own savepoint."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta

import pytest
from sqlalchemy import event, select

from registration_app.auth import nonces
from registration_app.core.errors import BadNonce
from registration_app.store import audit
from registration_app.store.models import AuditEvent, Nonce
from registration_app.store.repos import issue_nonce, parse_nonce
from tests.databases import bare_database


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path, group_commit=True) as database:
        yield database


def _commits(db) -> list[int]:
    """A counter of the COMMITs the database's connections send."""
    counter = [0]
    engines = [db.engine] + ([db._thread_engine] if db._thread_engine is not None else [])
    for engine in engines:
        event.listen(engine, "commit", lambda conn: counter.__setitem__(0, counter[0] + 1))
    return counter


def _eventually(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the units never queued")
        time.sleep(0.005)


def _token(db):
    return parse_nonce(db, issue_nonce(db, timedelta(minutes=5)))


def _used(db, token) -> bool:
    return bool(db.query(select(Nonce.__table__.c.value).where(Nonce.__table__.c.value == token.value)))


def _audited(db) -> list[str]:
    return [row.subject for row in db.query(select(AuditEvent.__table__.c.subject).order_by(AuditEvent.__table__.c.id))]


def _verify(db):
    with db.read_connection() as conn:
        return audit.verify(conn, db.keys, db.anchor.read())


class _Queue:
    """Units run by threads while a first unit holds the group's transaction open, so that the
    others wait and form the next group together."""

    def __init__(self, db):
        self.db = db
        self.release = threading.Event()
        self.results: dict[str, object] = {}
        self.threads: list[threading.Thread] = []

    def start(self, name: str, work) -> None:
        def call():
            try:
                self.results[name] = ("returned", self.db.run(work, core=True))
            except BaseException as exc:
                self.results[name] = ("raised", exc)

        thread = threading.Thread(target=call, name=f"unit-{name}")
        thread.start()
        self.threads.append(thread)

    def hold_then(self, units: list[tuple[str, object]]) -> None:
        """A first unit that holds the lock until every unit of `units` waits, then lets them go."""
        started = threading.Event()

        def holding(conn):
            audit.append_many(conn, [dict(event="test.unit", outcome="done", actor="t", subject="first")],
                              _now())
            started.set()
            self.release.wait(30)
            return "first"

        self.start("first", holding)
        assert started.wait(30)
        for name, work in units:
            self.start(name, work)
        _eventually(lambda: len(self.db._group._pending) == len(units))
        self.release.set()
        for thread in self.threads:
            thread.join(60)


def _now():
    from datetime import datetime, timezone
    return datetime.now(timezone.utc)


def _unit(token, subject, *, fail: bool = False):
    def work(conn):
        nonces.spend(conn, token, savepoint=False)
        audit.append_many(conn, [dict(event="test.unit", outcome="done", actor="t", subject=subject)], _now())
        if fail:
            raise ValueError(f"{subject} fails after writing")
        return subject
    return work


def test_waiting_units_share_one_commit_and_a_failing_unit_takes_only_its_own_writes(db):
    commits = _commits(db)
    tokens = [_token(db) for _ in range(3)]
    queue = _Queue(db)
    queue.hold_then([("b", _unit(tokens[0], "b")), ("c", _unit(tokens[1], "c", fail=True)),
                     ("d", _unit(tokens[2], "d"))])

    assert queue.results["first"] == ("returned", "first")
    assert queue.results["b"] == ("returned", "b") and queue.results["d"] == ("returned", "d")
    outcome, error = queue.results["c"]
    assert outcome == "raised" and isinstance(error, ValueError) and "c fails" in str(error)
    assert commits[0] == 2  # the first unit's transaction, then b, c and d in one
    assert [_used(db, t) for t in tokens] == [True, False, True]  # c's nonce went back with its savepoint
    assert _audited(db) == ["first", "b", "d"]
    report = _verify(db)  # one chain, and the checkpoint outside the database names d's row, not c's
    assert report.ok, report.problem
    assert report.rows == 3 and db.anchor.read().rows == 3


def test_a_unit_alone_that_fails_writes_nothing_and_the_next_one_alone_commits(db):
    """A group of one unit runs without a savepoint: its failure rolls the transaction back whole."""
    failing, passing = _token(db), _token(db)
    with pytest.raises(ValueError, match="alone fails"):
        db.run(_unit(failing, "alone", fail=True), core=True)
    assert db.run(_unit(passing, "next"), core=True) == "next"
    assert [_used(db, failing), _used(db, passing)] == [False, True]
    assert _audited(db) == ["next"]
    report = _verify(db)  # the checkpoint outside the database forgot the failed unit's row
    assert report.ok, report.problem
    assert report.rows == 1 and db.anchor.read().rows == 1


def test_a_nonce_replayed_within_one_group_issues_nothing(db):
    token = _token(db)
    queue = _Queue(db)
    queue.hold_then([("original", _unit(token, "original")), ("replay", _unit(token, "replay"))])

    assert queue.results["original"] == ("returned", "original")
    outcome, error = queue.results["replay"]
    assert outcome == "raised" and isinstance(error, BadNonce)
    assert _audited(db) == ["first", "original"]
    assert _verify(db).ok


_CRASHING_PROCESS = textwrap.dedent("""
    import os, secrets, sys, threading, time
    from datetime import timedelta
    from registration_app.store.db import Database
    from registration_app.store.keys import StoreKeys
    from registration_app.store.repos import issue_nonce, parse_nonce, record_nonce

    db = Database(sys.argv[1], keys=StoreKeys(nonce=secrets.token_bytes(32)), group_commit=True)
    tokens = [parse_nonce(db, issue_nonce(db, timedelta(minutes=5))) for _ in range(3)]
    print(" ".join(t.value for t in tokens), flush=True)
    release = threading.Event()

    started = threading.Event()
    answered_0 = threading.Event()

    def unit(i):
        def work(conn):
            record_nonce(conn, tokens[i])
            if i == 0:
                started.set()
                release.wait(30)
            if i == 2:
                answered_0.wait(30)  # unit 0's thread hands on the lead before it prints its answer
                os._exit(3)  # the process dies with unit 1 run, in its savepoint, and nothing committed
        db.run(work, core=True)
        print(f"answered {i}", flush=True)
        if i == 0:
            answered_0.set()

    def until(condition):
        while not condition():
            time.sleep(0.005)

    threads = [threading.Thread(target=unit, args=(0,))]
    threads[0].start()
    started.wait(30)
    for i in (1, 2):
        threads.append(threading.Thread(target=unit, args=(i,)))
        threads[-1].start()
    until(lambda: len(db._group._pending) == 2)
    release.set()
    for thread in threads:
        thread.join()
""")


def test_a_process_that_dies_before_its_group_commits_answers_none_of_the_group(db, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_PROCESS)
    done = subprocess.run([sys.executable, str(script), db.url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    first, *answers = done.stdout.splitlines()
    assert answers == ["answered 0"]  # the first group committed and was answered; 1 and 2 never were
    values = first.split()
    used = {row.value for row in db.query(select(Nonce.__table__.c.value))}
    assert [v in used for v in values] == [True, False, False]  # unit 1's write died with the process
