"""store/db.py's connections on SQLite: the process's write transactions share one writer connection, so
that its page cache survives from one transaction of the process to the next (PERFORMANCE.md)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import text

from tests.databases import bare_database


@pytest.fixture
def db(tmp_path):
    with bare_database(tmp_path, group_commit=False) as database:
        if database.engine.dialect.name != "sqlite":
            pytest.skip("the writer connection is SQLite's (a server database pools its connections)")
        yield database


def _dbapi(conn):
    return conn.connection.dbapi_connection


def test_every_thread_writes_on_the_process_one_writer_connection(db):
    seen = []

    def write(i: int) -> None:
        with db.write() as conn:
            conn.execute(text("CREATE TABLE IF NOT EXISTS probe (n INTEGER)"))
            conn.execute(text("INSERT INTO probe VALUES (:n)"), {"n": i})
            seen.append(_dbapi(conn))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    write(4)
    assert len(seen) == 5 and all(conn is seen[0] for conn in seen)
    assert db.query(text("SELECT count(*) FROM probe"))[0][0] == 5


def test_a_transaction_that_raises_writes_nothing_and_the_writer_serves_the_next(db):
    with db.write() as conn:
        conn.execute(text("CREATE TABLE probe (n INTEGER)"))
        writer = _dbapi(conn)
    with pytest.raises(ValueError):
        with db.write() as conn:
            conn.execute(text("INSERT INTO probe VALUES (1)"))
            raise ValueError("the unit fails after its write")
    with db.write() as conn:
        assert _dbapi(conn) is writer
        conn.execute(text("INSERT INTO probe VALUES (7)"))
    assert [row[0] for row in db.query(text("SELECT n FROM probe"))] == [7]
