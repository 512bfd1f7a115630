from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import update

from registration_app.core.codes import parse_code
from registration_app.core.errors import BadEnrollmentCode
from registration_app.store import audit
from registration_app.store.db import Database, migrate
from registration_app.store.models import AuditEvent
from registration_app.store.repos import (consume_nonce, create_enrollment_code, enrollment_code, issue_nonce,
                                          use_enrollment_code)


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 't.db'}"
    migrate(url)
    database = Database(url)
    yield database
    database.dispose()


def test_nonces_are_single_use_and_expire(db):
    nonce = issue_nonce(db, timedelta(minutes=5))
    assert consume_nonce(db, nonce) and not consume_nonce(db, nonce)
    old = issue_nonce(db, timedelta(seconds=1), now=datetime.now(timezone.utc) - timedelta(minutes=1))
    assert not consume_nonce(db, old)
    assert not consume_nonce(db, "x" * 100) and not consume_nonce(db, "")


def test_enrollment_codes_are_stored_derived_and_used_once(db):
    code_id, printed = create_enrollment_code(db, "a@example.org", timedelta(hours=1), "op")
    row = enrollment_code(db, code_id)
    assert printed.split("-", 1)[1].encode() not in row.mac_key and parse_code(printed) == (code_id, row.mac_key)
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
    with db.transaction() as s:
        assert audit.verify(s).ok and audit.verify(s).rows == 5
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(subject="forged"))
    with db.transaction() as s:
        report = audit.verify(s)
    assert not report.ok and "row 3" in report.problem
    with db.transaction() as s:
        s.execute(update(AuditEvent).where(AuditEvent.id == 3).values(subject="2"))
        assert audit.verify(s).ok
        s.delete(s.get(AuditEvent, 5))
    with db.transaction() as s:
        report = audit.verify(s)
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
    with db.engine.begin() as conn:  # an older database is migrated, not skipped
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0002'")
        conn.exec_driver_sql("DROP INDEX ix_certificates_lower_email_profile")
    assert not schema_is_current(db.url)
    migrate(db.url)
    assert schema_is_current(db.url)
