from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import delete, event, select, text, update

from bench.postgres import database_url_for
from registration_app.core.codes import parse_code
from registration_app.core.errors import BadEnrollmentCode, ConfigError
from registration_app.store import audit
from registration_app.store.db import Database, migrate
from registration_app.store.models import AuditEvent, AuditHead
from registration_app.store.repos import (consume_nonce, create_enrollment_code, enrollment_code,
                                          enrollment_code_key, issue_nonce, use_enrollment_code)
from tests.databases import bare_database, server_keys


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path) as database:
        yield database


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


def test_audit_verify_reads_the_head_and_the_rows_as_of_one_moment(db):
    """The server appends while an operator verifies: a row committed after the walk read the head
    must not show as rows running past the head ("rows deleted at the end"), as it did on
    PostgreSQL's READ COMMITTED before verify ran in `Database.snapshot()`."""
    def append(subject):
        db.run(lambda s: audit.append(s, event="e", outcome="done", actor="a", subject=subject))

    for i in range(3):
        append(str(i))
    appended = []
    with db.snapshot() as conn:
        def between(_conn, _cursor, statement, *_rest):
            if "audit_head" in statement and not appended:
                appended.append(True)
                append("meanwhile")  # committed on another connection, the walk not yet started

        event.listen(conn, "after_cursor_execute", between)
        report = audit.verify(conn, db.keys, db.anchor.read())
    assert appended and report.ok and report.rows == 3, report.problem
    assert verify(db).ok and verify(db).rows == 4


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


def test_first_crl_builders_racing_on_a_fresh_database_make_one_state_row(db):
    """No CRL state yet: concurrent first builders (the publisher's and a worker's) must not collide on
    creating it. Each takes the row in turn and bumps the number once; none fails on a duplicate key."""
    import threading

    from registration_app.store.issuance import crl_state, locked_crl_state

    racers = 8
    barrier = threading.Barrier(racers)
    errors: list[BaseException] = []

    def bump(session) -> None:
        state = locked_crl_state(session, create=True)
        state.number += 1

    def first_build() -> None:
        barrier.wait()
        try:
            db.run(bump)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=first_build) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert crl_state(db).number == racers


def test_only_the_renewal_key_is_a_lost_race(db):
    """A second issuance after the same predecessor is a 409 for the loser; any other integrity error
    (here a serial used twice) is a fault, not a race the client lost."""
    from sqlalchemy import insert

    from registration_app.core.errors import DuplicateRecord
    from registration_app.store.errors import lost_renewal_race
    from registration_app.store.models import Certificate

    now = datetime.now(timezone.utc)

    def row(serial: str, renewal_key: str) -> dict:
        return dict(serial=serial, email="r@example.org", user_dn="uid=r", profile="p", usage="encryption",
                    status="valid", der=b"0", not_before=now, not_after=now, issued_at=now, key_source="server",
                    replaces=None, renewal_key=renewal_key)

    def add(values: dict) -> None:
        db.run(lambda conn: conn.execute(insert(Certificate.__table__), values), core=True)

    add(row("a1", "r@example.org|p|after:none"))
    with pytest.raises(DuplicateRecord) as renewal:
        add(row("a2", "r@example.org|p|after:none"))
    with pytest.raises(DuplicateRecord) as serial:
        add(row("a1", "r@example.org|p|after:a1"))
    assert lost_renewal_race(renewal.value)
    assert not lost_renewal_race(serial.value)


@contextmanager
def raw_connection(url: str):
    """A transaction on the database with no keys: what code from before revision 0005 wrote."""
    database = Database(url)
    try:
        with database.engine.begin() as conn:
            yield conn
    finally:
        database.dispose()


def append(db, n: int, subject: str = "s") -> None:
    for i in range(n):
        db.run(lambda s, i=i: audit.append(s, event="e", outcome="done", actor="a", subject=f"{subject}{i}"))


def test_a_consistent_rewrite_without_the_audit_key_is_detected(db):
    """Someone who can write the database recomputes every hash as the chain did before it was keyed
    (plain SHA-256, head included): verify, which has the key, still sees it."""
    append(db, 3)
    with db.transaction() as s:
        prev = audit.GENESIS
        for row in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars():
            row.subject = "rewritten"
            row.prev_hash = prev
            row.hash = prev = audit.unkeyed_digest(prev, row.at, row.event, row.outcome, row.actor, row.subject,
                                                   row.detail)
        s.execute(update(AuditHead).values(last_hash=prev))
    report = verify(db)
    assert not report.ok and "row 1" in report.problem and "keyed hash" in report.problem


def test_deleting_every_row_and_the_head_is_reported_and_not_forgotten_by_later_appends(db):
    append(db, 4)
    assert db.anchor.read().rows == 4
    with db.transaction() as s:
        s.execute(delete(AuditEvent))
        s.execute(delete(AuditHead))
    report = verify(db)
    assert not report.ok and "checkpoint" in report.problem and "deleted" in report.problem
    append(db, 6, "after")  # the server goes on appending: the chain restarts, and outgrows the old count
    assert db.anchor.read().rows == 4  # the anchor stays where the database lost it
    report = verify(db)
    assert not report.ok and "checkpoint" in report.problem, report


def test_truncating_the_tail_with_the_head_is_reported(db):
    append(db, 5)
    with db.transaction() as s:
        s.execute(delete(AuditEvent).where(AuditEvent.id > 2))
        last = s.get(AuditEvent, 2)
        s.execute(update(AuditHead).values(last_id=2, last_hash=last.hash, rows=2))
    report = verify(db)
    assert not report.ok and report.rows == 2 and "says row 5 (5 rows)" in report.problem


def test_a_checkpoint_behind_the_database_is_a_lag_not_an_alarm(db):
    append(db, 2)
    behind = db.anchor.read()
    append(db, 3)
    assert db.anchor.read().rows == 5
    with db.read_connection() as conn:
        report = audit.verify(conn, db.keys, behind)
    assert report.ok and report.rows == 5


def test_a_checkpoint_moves_only_forward_whoever_writes_it(db):
    from registration_app.store.anchor import Checkpoint
    append(db, 3)
    head = db.anchor.read()
    db.anchor.advance("x", Checkpoint(2, 2, "older"), row_hash=lambda _id: None)  # a slower worker's commit
    assert db.anchor.read() == head


def test_a_missing_audit_table_is_a_clear_report(db):
    append(db, 1)
    with db.transaction() as s:
        s.execute(text("DROP TABLE audit"))
    report = verify(db)
    assert not report.ok and report.problem == "the table audit is missing from the database (dropped?)"


def test_a_database_without_its_audit_key_refuses_to_append(db):
    keyless = Database(db.url)
    try:
        with pytest.raises(ConfigError, match="audit.secret"):
            append(keyless, 1)
    finally:
        keyless.dispose()


def test_a_code_row_written_into_the_database_by_hand_cannot_be_used(db):
    """The row's key is sealed under codes.secret: a row made with a MAC key of the writer's choice
    (as the stored form was before) does not give that key back."""
    from registration_app.store.models import EnrollmentCode
    now = datetime.now(timezone.utc)
    db.run(lambda s: s.add(EnrollmentCode(id="forged01", email="a@example.org", mac_key=b"k" * 32, key_version=1,
                                          failures=0, created_at=now, expires_at=now + timedelta(hours=1),
                                          created_by="intruder")))
    assert enrollment_code(db, "forged01") is not None and enrollment_code_key(db, "forged01") is None


def test_wrong_macs_are_counted_per_code_id_and_per_agent_and_burn_the_code(db):
    from registration_app.store.repos import BootstrapLimits, bootstrap_retry_after, record_bootstrap_failure
    limits = BootstrapLimits(per_code=3, per_agent=5, window=timedelta(minutes=15))
    code_id, _ = create_enrollment_code(db, "a@example.org", timedelta(hours=1), "op")
    burnt = [record_bootstrap_failure(db, code_id, "agent-a", limits) for _ in range(3)]
    assert burnt == [False, False, True] and enrollment_code(db, code_id) is None
    assert bootstrap_retry_after(db, code_id, "agent-b", limits) is not None  # the id is closed for everyone
    for _ in range(3):  # an id that does not exist counts the same way
        record_bootstrap_failure(db, "nosuchid", "agent-b", limits)
    assert bootstrap_retry_after(db, "nosuchid", "agent-c", limits) is not None
    assert bootstrap_retry_after(db, "otherid1", "agent-b", limits) is None  # agent-b: 3 of its 5
    record_bootstrap_failure(db, "otherid1", "agent-b", limits)
    record_bootstrap_failure(db, "otherid2", "agent-b", limits)
    wait = bootstrap_retry_after(db, "otherid3", "agent-b", limits)
    assert wait is not None and 0 < wait <= 15 * 60
    later = datetime.now(timezone.utc) + timedelta(minutes=16)
    assert bootstrap_retry_after(db, "otherid3", "agent-b", limits, now=later) is None
    with db.read_connection() as conn:
        rows = conn.execute(select(AuditEvent.event, AuditEvent.detail)).all()
    assert [(e, d["code_id"]) for e, d in rows] == [("enrollment_code.burnt", code_id)]


def test_a_database_from_before_the_keys_is_refused_until_adopted_then_verifies(tmp_path):
    """Revision 0004 kept the nonce key in sync_state, code MAC keys as they are and a plain SHA-256
    chain: after 0005 the server refuses to start (`pending`) until init adopts them under the keys."""
    from alembic import command
    from alembic.config import Config

    from registration_app.store.db import MIGRATIONS
    from registration_app.store.upgrade import adopt_server_keys, pending
    url = database_url_for() or f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(config, "0004")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    code_id, printed = "oldcode1", "oldcode1-" + "a" * 32
    _, mac_key = parse_code(printed)
    with raw_connection(url) as conn:  # as the code of revision 0004 wrote them
        prev = audit.GENESIS
        for i in range(3):
            digest = audit.unkeyed_digest(prev, now, "e", "done", "a", f"s{i}", {})
            conn.execute(text("INSERT INTO audit (at, event, outcome, actor, subject, detail, prev_hash, hash) "
                              "VALUES (:at, 'e', 'done', 'a', :s, '{}', :p, :h)"),
                         {"at": now.replace(tzinfo=None), "s": f"s{i}", "p": prev, "h": digest})
            prev = digest
        conn.execute(text("INSERT INTO audit_head (id, last_id, last_hash) VALUES (1, 3, :h)"), {"h": prev})
        conn.execute(text("INSERT INTO sync_state (name, value) VALUES ('nonce-mac-key', :v)"), {"v": "ab" * 32})
        conn.execute(text("INSERT INTO enrollment_codes (id, email, mac_key, created_at, expires_at, created_by) "
                          "VALUES (:id, 'a@example.org', :k, :t, :e, 'op')"),
                     {"id": code_id, "k": mac_key, "t": now.replace(tzinfo=None),
                      "e": (now + timedelta(hours=1)).replace(tzinfo=None)})
    migrate(url)
    db = Database(url, keys=server_keys(tmp_path))
    try:
        assert "autoenroll init" in pending(db)
        with pytest.raises(ConfigError, match="autoenroll init"):
            append(db, 1)
        done = adopt_server_keys(db)
        assert [line.split()[0] for line in done] == ["re-chained", "sealed", "removed"]
        assert pending(db) is None and enrollment_code_key(db, code_id) == ("a@example.org", mac_key)
        report = verify(db)
        assert report.ok and report.rows == 4 and report.checkpoint.rows == 4  # + audit.rekeyed
        append(db, 1)
        assert verify(db).ok and adopt_server_keys(db) == []
    finally:
        db.dispose()


def test_an_old_chain_that_was_changed_is_not_laundered_by_the_upgrade(tmp_path):
    from registration_app.store.upgrade import adopt_server_keys
    url = database_url_for() or f"sqlite:///{tmp_path / 'old.db'}"
    migrate(url)
    with raw_connection(url) as conn:
        conn.execute(text("INSERT INTO audit (at, event, outcome, actor, subject, detail, prev_hash, hash) "
                          "VALUES (:at, 'e', 'done', 'a', 's', '{}', :p, :h)"),
                     {"at": datetime(2026, 1, 1), "p": audit.GENESIS, "h": "f" * 64})
        conn.execute(text("INSERT INTO audit_head (id, last_id, last_hash, rows, keyed) VALUES (1, 1, :h, 1, 0)"),
                     {"h": "f" * 64})
    db = Database(url, keys=server_keys(tmp_path))
    try:
        with pytest.raises(ConfigError, match="broken at row 1"):
            adopt_server_keys(db)
    finally:
        db.dispose()


def _temporary_files() -> list[str]:
    """SQLite's temporary files (etilqs_*, unlinked at once) this process holds open now."""
    import os
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd)
            continue
        if "etilqs_" in target:
            found.append(target)
    return found


def test_a_unit_that_changes_many_pages_keeps_its_savepoint_journal_in_memory(tmp_path):
    """Every group-commit unit runs in a SAVEPOINT, whose journal SQLite spills to a temporary file past
    64 KiB of changed pages unless temp_store is MEMORY: an enrollment's unit did, a file created,
    written and unlinked per transaction."""
    with bare_database(tmp_path, group_commit=True) as db:
        if db.engine.dialect.name != "sqlite":
            pytest.skip("SQLite's statement journal")
        expires = datetime.now(timezone.utc) + timedelta(minutes=5)
        db.run(lambda conn: conn.execute(text("INSERT INTO nonces (value, expires_at) VALUES (:v, :e)"),
                                         [{"v": f"n{i:06d}" + "x" * 40, "e": expires} for i in range(3000)]),
               core=True)
        seen: list[str] = []

        def change_every_page(conn):  # existing pages: each is journaled before it changes
            conn.execute(text("UPDATE nonces SET expires_at = :e"), {"e": expires + timedelta(seconds=1)})
            seen.extend(_temporary_files())

        db.run(change_every_page, core=True)
        assert seen == []
        assert db.query(text("SELECT count(*) AS n FROM nonces WHERE expires_at > :e"), {"e": expires})[0].n == 3000
