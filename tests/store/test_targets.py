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
