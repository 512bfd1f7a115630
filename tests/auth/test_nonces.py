"""auth/nonces.py, the one owner of nonces, on a real database: a nonce is used once whichever way it
is used (consumed at once, or checked and spent in the acting transaction), a checked nonce spent by
another request meanwhile refuses the second, and a refusal's spend changes nothing already spent."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from registration_app.auth import nonces
from registration_app.core.errors import BadNonce
from tests.databases import bare_database

TTL = timedelta(minutes=5)


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path) as database:
        yield database


def test_a_consumed_nonce_is_refused_the_second_time(db):
    value = nonces.issue(db, TTL)
    assert nonces.consume(db, value) is True
    assert nonces.consume(db, value) is False
    assert nonces.check(db, value) is None


def test_a_checked_nonce_is_used_only_when_spent_and_only_once(db):
    value = nonces.issue(db, TTL)
    first, replay = nonces.check(db, value), nonces.check(db, value)  # both looked before either acted
    assert first is not None and replay is not None and first.value == replay.value
    db.run(lambda conn: nonces.spend(conn, first), core=True)
    with pytest.raises(BadNonce, match="used by another request"):
        db.run(lambda conn: nonces.spend(conn, replay), core=True)
    assert nonces.check(db, value) is None and nonces.consume(db, value) is False


def test_a_refusal_spends_an_unused_nonce_and_leaves_a_spent_one_alone(db):
    unused = nonces.check(db, nonces.issue(db, TTL))
    assert unused is not None
    db.run(lambda conn: nonces.spend_if_unused(conn, unused), core=True)
    assert nonces.check(db, unused.value) is None
    db.run(lambda conn: nonces.spend_if_unused(conn, unused), core=True)  # no error: already used


def test_a_nonce_not_ours_or_expired_is_refused(db):
    assert nonces.check(db, "A" * 48) is None
    issued_long_ago = nonces.issue(db, TTL, now=datetime.now(timezone.utc) - 2 * TTL)
    assert nonces.check(db, issued_long_ago) is None and nonces.consume(db, issued_long_ago) is False
