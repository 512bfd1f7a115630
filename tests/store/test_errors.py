"""store/errors.py: database errors leave the store as the project's errors (no caller names
SQLAlchemy): a broken constraint is DuplicateRecord with the constraint's name, a database that
cannot be reached is DatabaseUnavailable with the driver's words for the operator only."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from directory_sync.slapd import free_port
from registration_app.core.errors import DatabaseUnavailable, DuplicateRecord
from registration_app.store.db import Database
from registration_app.web.status import status_of


def test_a_broken_unique_constraint_is_a_duplicate_record(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'd.db'}")
    try:
        db.run(lambda conn: conn.execute(text("CREATE TABLE t (k TEXT PRIMARY KEY)")), core=True)
        db.run(lambda conn: conn.execute(text("INSERT INTO t VALUES ('a')")), core=True)
        with pytest.raises(DuplicateRecord) as refused:
            db.run(lambda conn: conn.execute(text("INSERT INTO t VALUES ('a')")), core=True)
        assert refused.value.constraint == "t.k"
        with pytest.raises(DuplicateRecord):
            with db.transaction() as session:
                session.execute(text("INSERT INTO t VALUES ('a')"))
    finally:
        db.dispose()


def test_a_database_that_cannot_be_reached_is_unavailable_with_the_cause_kept_apart(tmp_path):
    db = Database(f"postgresql+psycopg://nobody:pw@127.0.0.1:{free_port()}/autoenroll")
    try:
        for attempt in (lambda: db.query(text("SELECT 1")),
                        lambda: db.run(lambda conn: conn.execute(text("SELECT 1")), core=True)):
            with pytest.raises(DatabaseUnavailable) as refused:
                attempt()
            assert status_of(refused.value) == 503 and refused.value.extra == {"retry_after": 5}
            assert "refused" in refused.value.cause.lower() and "127.0.0.1" not in refused.value.detail
    finally:
        db.dispose()
