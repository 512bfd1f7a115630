import secrets
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from bench.postgres import database_url_for
from registration_app.core.codes import parse_code
from registration_app.core.errors import BadEnrollmentCode
from registration_app.store import audit
from registration_app.store.db import Database, migrate
from registration_app.store.keys import StoreKeys
from registration_app.store.models import AuditEvent
from registration_app.store.repos import (consume_nonce, create_enrollment_code, enrollment_code,
                                          enrollment_code_key, issue_nonce, use_enrollment_code)


def server_keys(folder) -> StoreKeys:
    """The keys `autoenroll init` would write into a data folder, made here for a bare Database."""
    return StoreKeys(nonce=secrets.token_bytes(32), codes=secrets.token_bytes(32), audit=secrets.token_bytes(32),
                     checkpoint=folder / "audit.checkpoint")


@pytest.fixture
def db(tmp_path):
    url = database_url_for() or f"sqlite:///{tmp_path / 't.db'}"
    migrate(url)
    database = Database(url, keys=server_keys(tmp_path))
    yield database
    database.dispose()


def verify(db):
    with db.read_connection() as conn:
        return audit.verify(conn, db.keys, db.anchor.read())


def test_nonces_are_single_use_and_expire(db):
    nonce = issue_nonce(db, timedelta(minutes=5))
    assert consume_nonce(db, nonce) and not consume_nonce(db, nonce)
    old = issue_nonce(db, timedelta(seconds=1), now=datetime.now(timezone.utc) - timedelta(minutes=1))
    assert not consume_nonce(db, old)
    assert not consume_nonce(db, "x" * 100) and not consume_nonce(db, "")


def test_enrollment_codes_are_stored_sealed_and_used_once(db):
    code_id, printed = create_enrollment_code(db, "a@example.org", timedelta(hours=1), "op")
    row = enrollment_code(db, code_id)
    _, mac_key = parse_code(printed)
    assert printed.split("-", 1)[1].encode() not in row.mac_key and mac_key not in row.mac_key
    assert enrollment_code_key(db, code_id) == ("a@example.org", mac_key)
    now = datetime.now(timezone.utc)
    with db.transaction() as s:
        assert use_enrollment_code(s, code_id, now)
    with db.transaction() as s:
        assert not use_enrollment_code(s, code_id, now)
    assert enrollment_code(db, code_id) is None
    with pytest.raises(BadEnrollmentCode):
        parse_code("not-a-code")


def test_audit_chain_detects_changes_and_deletions(db):
    for i in range(5):
        db.run(lambda s, i=i: audit.append(s, event="e", outcome="done", actor="a", subject=str(i), detail={"i": i}))
    assert verify(db).ok and verify(db).rows == 5
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(subject="forged"))
    report = verify(db)
    assert not report.ok and "row 3" in report.problem
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(subject="2"))
    assert verify(db).ok
    with db.transaction() as s:
        s.delete(s.get(AuditEvent, 5))
    report = verify(db)
    assert not report.ok and "deleted" in report.problem


def test_schema_head_constant_is_alembics_head_and_a_current_database_skips_alembic(db, tmp_path):
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from registration_app.store.db import MIGRATIONS, SCHEMA_HEAD, schema_is_current
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert ScriptDirectory.from_config(config).get_current_head() == SCHEMA_HEAD
    assert schema_is_current(db.url)
    assert not schema_is_current(f"sqlite:///{tmp_path / 'empty.db'}")
    from alembic import command
    config.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    db.dispose()  # no connection of ours in the way of the DDL
    command.downgrade(config, "0002")  # an older database is migrated, not skipped
    assert not schema_is_current(db.url)
    migrate(db.url)
    assert schema_is_current(db.url)


def test_query_sees_every_commit_made_after_its_first_use(db):
    """`Database.query` keeps one autocommit connection per thread: it must never pin an old snapshot."""
    from sqlalchemy import insert, select

    from registration_app.store.models import SyncState
    table = SyncState.__table__
    stmt = select(table.c.value).where(table.c.name == "k")
    assert db.query(stmt) == []
    other = Database(db.url)  # another process's connection, in effect
    try:
        other.run(lambda conn: conn.execute(insert(table), {"name": "k", "value": "1"}), core=True)
        assert [r.value for r in db.query(stmt)] == ["1"]
        other.run(lambda conn: conn.execute(update(table).values(value="2")), core=True)
        assert [r.value for r in db.query(stmt)] == ["2"]
    finally:
        other.dispose()


def test_thread_writer_survives_a_failed_transaction(db):
    """The thread's own write connection rolls back a failed unit of work and stays usable."""
    from sqlalchemy import insert, select

    from registration_app.store.models import SyncState
    table = SyncState.__table__
    db.run(lambda conn: conn.execute(insert(table), {"name": "a", "value": "1"}), core=True)
    with pytest.raises(Exception):
        db.run(lambda conn: conn.execute(insert(table), {"name": "a", "value": "dup"}), core=True)
    with pytest.raises(RuntimeError):
        with db.write() as conn:
            conn.execute(insert(table), {"name": "b", "value": "1"})
            raise RuntimeError("the unit of work fails")
    db.run(lambda conn: conn.execute(insert(table), {"name": "c", "value": "1"}), core=True)
    assert {r.name: r.value for r in db.query(select(table.c.name, table.c.value))} == {"a": "1", "c": "1"}


def test_first_appends_racing_on_a_fresh_database_all_commit_in_one_chain(db):
    """No head row yet: concurrent first appends must not collide on creating it (on PostgreSQL a
    SELECT ... FOR UPDATE of a missing row locks nothing)."""
    import threading

    racers = 8
    barrier = threading.Barrier(racers)
    errors: list[BaseException] = []

    def first_append(i: int) -> None:
        barrier.wait()
        try:
            db.run(lambda s: audit.append(s, event="test.race", outcome="done", actor="t", subject=str(i)))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_append, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    report = verify(db)
    assert report.ok and report.rows == racers and report.checkpoint.rows == racers, report


def test_only_the_renewal_key_is_a_lost_race(db):
    """A second issuance after the same predecessor is a 409 for the loser; any other integrity error
    (here a serial used twice) is a fault, not a race the client lost."""
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    from registration_app.authorities.ca import lost_renewal_race
    from registration_app.store.models import Certificate

    now = datetime.now(timezone.utc)

    def row(serial: str, renewal_key: str) -> dict:
        return dict(serial=serial, email="r@example.org", user_dn="uid=r", profile="p", usage="encryption",
                    status="valid", der=b"0", not_before=now, not_after=now, issued_at=now, key_source="server",
                    replaces=None, renewal_key=renewal_key)

    def add(values: dict) -> None:
        db.run(lambda conn: conn.execute(insert(Certificate.__table__), values), core=True)

    add(row("a1", "r@example.org|p|after:none"))
    with pytest.raises(IntegrityError) as renewal:
        add(row("a2", "r@example.org|p|after:none"))
    with pytest.raises(IntegrityError) as serial:
        add(row("a1", "r@example.org|p|after:a1"))
    assert lost_renewal_race(renewal.value)
    assert not lost_renewal_race(serial.value)
