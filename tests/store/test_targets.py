"""store/targets.py: each extra publication target's own state of the outbox rows (target_outbox)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from registration_app.store.models import Outbox
from registration_app.store.targets import due_at_target, record_at_target, target_status
from tests.databases import bare_database


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path) as database:
        yield database


def queue(db, *dns: str) -> list[int]:
    now = datetime.now(timezone.utc)
    with db.transaction() as session:
        rows = [Outbox(user_dn=dn, email=dn.split(",")[0][4:] + "@example.org", reason="issued",
                       created_at=now, next_attempt_at=now) for dn in dns]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def test_each_target_keeps_its_own_state_of_the_outbox_rows_and_a_second_worker_changes_nothing(db):
    first, second = queue(db, "uid=a,ou=people,dc=example,dc=org", "uid=b,ou=people,dc=example,dc=org")
    now = datetime.now(timezone.utc)
    due = due_at_target(db, "book", now, limit=10)
    assert [(r.id, r.attempts) for r in due] == [(first, 0), (second, 0)]  # no state yet: due, in outbox order
    assert due[0].user_dn == "uid=a,ou=people,dc=example,dc=org" and due[0].email == "a@example.org"

    done = dict(outbox_id=first, attempts=0, next_attempt_at=now, last_error=None, done_at=now)
    failed = dict(outbox_id=second, attempts=1, next_attempt_at=now + timedelta(minutes=1),
                  last_error="down", done_at=None)
    record_at_target(db, "book", [done, failed])
    record_at_target(db, "book", [done])  # another worker published the same row: one state, still done
    assert due_at_target(db, "book", now, limit=10) == []  # one done, one backing off
    assert [(r.id, r.attempts) for r in due_at_target(db, "book", now + timedelta(minutes=2), limit=10)] \
        == [(second, 1)]
    assert target_status(db, "book") == {"depth": 1, "failing": 1}
    assert [r.id for r in due_at_target(db, "other", now, limit=1)] == [first]  # another target: its own
    assert target_status(db, "other") == {"depth": 2, "failing": 0}

    record_at_target(db, "book", [dict(failed, attempts=2, last_error=None, done_at=now)])
    assert target_status(db, "book") == {"depth": 0, "failing": 0}


def test_a_drain_reads_the_rows_above_its_mark_and_the_rows_tried_not_the_whole_outbox(db):
    from sqlalchemy import text

    from registration_app.store import targets
    from registration_app.store.targets import advance_at_target, seen_through
    old = queue(db, *(f"uid=old{i},ou=people,dc=example,dc=org" for i in range(5)))
    now = datetime.now(timezone.utc)
    record_at_target(db, "book", [dict(outbox_id=i, attempts=0, next_attempt_at=now, last_error=None, done_at=now)
                                  for i in old])
    assert advance_at_target(db, "book", settled_before=now - timedelta(minutes=5)) == 0  # too young to pass
    assert advance_at_target(db, "book", settled_before=now + timedelta(seconds=1)) == old[-1]
    assert seen_through(db, "book") == old[-1] and seen_through(db, "other") == 0

    late, skipped, last = queue(db, *(f"uid=new{i},ou=people,dc=example,dc=org" for i in range(3)))
    record_at_target(db, "book", [dict(outbox_id=i, attempts=0, next_attempt_at=now, last_error=None, done_at=now)
                                  for i in (late, last)])
    record_at_target(db, "book", [dict(outbox_id=old[0], attempts=3, next_attempt_at=now, last_error="x",
                                       done_at=None)])  # done once, failing again (two workers)
    later = now + timedelta(seconds=1)
    assert [r.id for r in due_at_target(db, "book", later, limit=10)] == [old[0], skipped]
    assert target_status(db, "book") == {"depth": 2, "failing": 1}
    assert advance_at_target(db, "book", settled_before=later + timedelta(seconds=1)) == late  # not past `skipped`
    assert [r.id for r in due_at_target(db, "book", later, limit=1)] == [old[0]]  # in outbox order
    assert [r.id for r in due_at_target(db, "other", later, limit=10)] == [*old, late, skipped, last]

    if db.engine.dialect.name == "sqlite":  # what each read visits: a range of an index, never a scan
        reads = {"SEARCH outbox USING INTEGER PRIMARY KEY (rowid>?)": targets._UNSEEN.params(target="book", after=late),
                 "SEARCH target_outbox USING INDEX ix_target_outbox_due": targets._TRIED.params(target="book")}
        with db.engine.connect() as conn:
            for visit, statement in reads.items():
                sql = str(statement.compile(db.engine, compile_kwargs={"literal_binds": True}))
                plan = " | ".join(row[-1] for row in conn.execute(text("EXPLAIN QUERY PLAN " + sql)))
                assert visit in plan and "SCAN" not in plan, plan
