"""Engine and transactions.

SQLite (the default) runs in WAL mode with synchronous=FULL and every transaction opened with
BEGIN IMMEDIATE: writers queue on the database lock instead of failing later with "database is locked"
when a read transaction tries to upgrade. PostgreSQL works by URL.

Writers of one SQLite file queue on a lock file (flock) taken before BEGIN IMMEDIATE and released after
COMMIT, and on a lock per process for its threads. SQLite's own busy handler polls with sleeps, so
under several workers most waiting was sleeping (PERFORMANCE.md); a blocked flock wakes as soon as the
holder commits. The kernel drops the
flock of a process that dies, so a killed worker cannot wedge the others. busy_timeout stays as the
fence for writers that do not take the lock (the sqlite3 CLI, another program).
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from sqlalchemy import create_engine, event, select
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.pool import NullPool
from sqlalchemy.orm import Session, sessionmaker

from ..core.errors import Unavailable
from ..core.retry import backoff_delay
from .errors import database_errors
from .group_commit import GroupCommit
from .prepared import Prepared

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str, *, temp_in_memory: bool = False, **options) -> Engine:
    """`temp_in_memory` (SQLite): the statement journal of a SAVEPOINT (every group-commit unit has one)
    stays in memory instead of spilling to a temporary file past 64 KiB, which an enrollment's unit did,
    a file created, written and unlinked per transaction (PERFORMANCE.md, "SQLite"). For the hot path's
    connections only: temporary tables and sorts of big reads (reconcile) keep spilling to a file."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **options)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            if temp_in_memory:
                cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn):
            options = conn.get_execution_options()
            if options.get("isolation_level") == "AUTOCOMMIT":
                return  # `Database.query`: every statement is its own snapshot, no BEGIN at all
            # Readers use a deferred BEGIN: in WAL mode they run beside the writer and never queue.
            # (Straight on the cursor, like the hot paths' statements: prepared.py.)
            Prepared.sql(conn, "BEGIN" if options.get("autoenroll_read_only", False) else "BEGIN IMMEDIATE")

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, **options)


# The newest revision in migrations/versions (a test holds the two together). Every command migrates
# before it works; when the database is already there, one SELECT answers without importing Alembic
# (slow to import: PERFORMANCE.md).
SCHEMA_HEAD = "0011"


def schema_is_current(url: str) -> bool:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == SCHEMA_HEAD
    except Exception:  # no database yet, no version table, another error: let Alembic decide
        return False
    finally:
        engine.dispose()


def sqlite_files(url: str) -> list[Path]:
    """The files of an SQLite database (itself, -wal, -shm), for their modes; none for a server database."""
    from sqlalchemy.engine import make_url
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:" \
            or parsed.database.startswith("file:"):
        return []
    path = Path(parsed.database)
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def migrate(url: str) -> None:
    """Bring the schema to the newest Alembic revision."""
    if schema_is_current(url):
        return
    import logging

    from alembic import command
    from alembic.config import Config

    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to an operator

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    with database_errors():
        command.upgrade(cfg, "head")


class _WriterQueue:
    """Serialises the transactions on one SQLite file: a re-entrant lock for this process's threads,
    then an exclusive flock shared with every other process. Re-made after fork (a flock belongs to the
    open file description, which a child would otherwise share with its parent)."""

    _init_lock = threading.Lock()

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._pid: int | None = None
        self._mine = threading.local()  # how deep this thread holds the lock

    def held_here(self) -> bool:
        """Whether the calling thread holds the lock (a transaction of its own is open)."""
        return getattr(self._mine, "depth", 0) > 0

    def _ready(self) -> None:
        with self._init_lock:
            if self._pid == os.getpid():
                return
            self._lock = threading.RLock()
            self._depth = 0
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600) if self.path else None
            self._pid = os.getpid()

    @contextmanager
    def held(self) -> Iterator[None]:
        if self._pid != os.getpid():
            self._ready()
        with self._lock:
            self._depth += 1
            self._mine.depth = getattr(self._mine, "depth", 0) + 1
            try:
                if self._depth == 1 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_EX)
                yield
            finally:
                self._mine.depth -= 1
                self._depth -= 1
                if self._depth == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)




_writer_queues: dict[str | None, _WriterQueue] = {}


def _writer_queue(engine: Engine) -> _WriterQueue:
    """One queue per SQLite file per process, whichever Database object asks: a transaction opened
    inside another one on the same file (same thread) re-enters instead of waiting for itself."""
    database = engine.url.database
    path = None
    if database and database != ":memory:" and not database.startswith("file:"):
        path = str(Path(database).resolve()) + ".lock"
    with _WriterQueue._init_lock:
        if path is None:
            return _WriterQueue(None)
        return _writer_queues.setdefault(path, _WriterQueue(path))


def insert_if_absent(conn: Connection, table, row: dict) -> None:
    """Insert `row` into `table` unless a row with its primary key exists (ON CONFLICT DO NOTHING): the way
    to make a singleton row (the audit chain's head, the CRL's state) that concurrent first writers may
    both try to make. A SELECT ... FOR UPDATE of a row that does not exist locks nothing, so on PostgreSQL
    two first writers would both insert it, and the loser's unique violation would fail its whole
    transaction; with this the loser waits for the winner's commit and inserts nothing."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:
        conn.execute(table.insert(), row)
        return
    keys = [column.name for column in table.primary_key.columns]
    conn.execute(dialect_insert(table).on_conflict_do_nothing(index_elements=keys), row)


def connection_of(session_or_connection) -> Connection:
    """The Core connection under a Session (its transaction's), or the Connection itself."""
    if isinstance(session_or_connection, Session):
        return session_or_connection.connection()
    return session_or_connection


class _ThreadConnections(threading.local):
    """Each thread's own long-lived reader connection (see `Database.query`)."""

    pid: int | None = None
    reader: Connection | None = None


class _ProcessWriter:
    """The process's one long-lived writer connection (see `Database.write`). Used only under the writer
    queue, which admits one thread of the process at a time, so one connection serves them all; and
    SQLite keeps a connection's page cache only while no OTHER connection commits, so one writer keeps
    its B-tree pages between this process's transactions where a writer per thread read them again
    (PERFORMANCE.md, "The store's CPU per enrollment")."""

    pid: int | None = None
    conn: Connection | None = None


class Database:
    """Owns the engine; `transaction()` is the only way code writes.

    `keys` (keys.py) are the server's secrets as read from the data folder: the nonce and code keys for
    repos.py, the audit key for every append, and the checkpoint every committed append moves (anchor.py).
    """

    def __init__(self, url: str, keys=None, *, group_commit: bool | None = None) -> None:
        from .anchor import AuditAnchor
        from .keys import StoreKeys
        self.url = url
        self.keys = keys or StoreKeys()
        self.anchor = (AuditAnchor(self.keys.checkpoint, self.keys.audit)
                       if self.keys.checkpoint is not None and self.keys.audit is not None else None)
        options = {"autoenroll_keys": self.keys, "autoenroll_anchor": self.anchor}
        self.engine = make_engine(url)
        self.engine.update_execution_options(**options)
        # On SQLite the hot paths (an enrollment's reads and its one transaction) keep long-lived
        # connections (a reader per thread, one writer per process) instead of checking one out of the
        # pool per statement group: the check-out,
        # return, reset and BEGIN/COMMIT statements cost several times the SQL they wrap (PERFORMANCE.md).
        # NullPool: these connections are never returned,
        # so they must not take the pool's slots. A server database keeps its pooled, pre-pinged
        # connections: a long-lived one could have been dropped by the server in between.
        is_sqlite = self.engine.dialect.name == "sqlite"
        self._thread_engine = make_engine(url, poolclass=NullPool, temp_in_memory=True) if is_sqlite else None
        if self._thread_engine is not None:
            self._thread_engine.update_execution_options(**options)
        self._threads = _ThreadConnections()
        self._writer = _ProcessWriter()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._read_engine = self.engine.execution_options(autoenroll_read_only=True)
        self._readers = sessionmaker(self._read_engine, expire_on_commit=False)
        self._writers = _writer_queue(self.engine) if self.engine.dialect.name == "sqlite" else None
        # `run(core=True)` units of this process's threads share commits (group_commit.py): on by default
        # where writers queue on one lock (SQLite); a server database commits concurrent writers itself.
        if group_commit is None:
            group_commit = self._writers is not None
        self._group = GroupCommit(self) if group_commit else None

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One unit of work; retried by the caller via `run` if the database is busy. Database errors
        leave it as the project's errors (errors.py), as they leave every method of this class."""
        with database_errors(), self._transaction() as session:
            yield session

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self._anchored():
            if self._writers is None:
                with self._sessions() as session, session.begin():
                    yield session
                return
            with self._writers.held(), self._sessions() as session, session.begin():
                yield session

    @contextmanager
    def _anchored(self) -> Iterator[None]:
        """Around a write transaction: after it committed, the audit rows it appended move the
        checkpoint outside the database (anchor.py); on SQLite still inside the writer queue."""
        if self.anchor is None:
            yield
            return
        with self._writers.held() if self._writers is not None else nullcontext():
            with self.anchor.transaction(self._audit_row_hash):
                yield

    def _audit_row_hash(self, row_id: int) -> str | None:
        from .models import AuditEvent
        table = AuditEvent.__table__
        rows = self.query(select(table.c.hash).where(table.c.id == row_id))
        return rows[0].hash if rows else None

    @contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only snapshot: no writer lock, so reads never wait for (or block) a writer."""
        with database_errors(), self._readers() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on a bare Core connection: no ORM session to build and flush, for the
        hot paths (an enrollment's one transaction) whose statements are all Core. It runs on this
        process's writer connection (SQLite), or on a pooled one when that is busy (a transaction inside
        another)."""
        with database_errors(), self._write() as conn:
            yield conn

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._anchored():
            if self._writers is None:
                with self._write_transaction() as conn:
                    yield conn
                return
            with self._writers.held(), self._write_transaction() as conn:
                yield conn

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        """Called with the writer queue held (SQLite): the process's writer connection is this thread's
        until the transaction ends; a transaction inside another one of the thread takes a pooled one."""
        conn = self._writer_connection()
        if conn is None or conn.in_transaction():
            with self.engine.begin() as pooled:
                yield pooled
            return
        try:
            with conn.begin():
                yield conn
        except DBAPIError as exc:
            if exc.connection_invalidated or not self._usable(conn) or conn.in_transaction():
                self._drop_writer()  # e.g. a BEGIN that failed half-way: start afresh
            raise

    def _writer_connection(self) -> Connection | None:
        if self._thread_engine is None:
            return None
        writer = self._writer
        if writer.pid != os.getpid():  # a fork (gunicorn worker) inherits no connection
            writer.pid, writer.conn = os.getpid(), None
        if writer.conn is None:
            writer.conn = self._thread_engine.connect()
        return writer.conn

    def _drop_writer(self) -> None:
        conn, self._writer.conn = self._writer.conn, None
        if conn is not None and self._writer.pid == os.getpid():
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                pass

    @contextmanager
    def read_connection(self) -> Iterator[Connection]:
        """`read()` on a bare Core connection."""
        with database_errors(), self._read_engine.begin() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction whose statements all see the database as it was at the first of them, for
        reads that must agree with each other while the server writes (`audit verify` reads the head,
        then walks the rows: under PostgreSQL's READ COMMITTED an append committed in between showed
        the rows running past the head, "rows deleted at the end"). PostgreSQL: REPEATABLE READ, read
        only. SQLite: the read transaction's deferred BEGIN, in WAL mode, is such a snapshot already."""
        engine = self._read_engine
        if engine.dialect.name == "postgresql":
            engine = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with database_errors(), engine.begin() as conn:
            yield conn

    def query(self, statement, parameters: dict | None = None) -> list:
        """The rows of ONE read statement (Core, or prepared.py's `Prepared`), which is its own snapshot:
        run in autocommit on this thread's connection, with no BEGIN, COMMIT or pool check-out around it. For several
        statements that must agree with each other, use `read_connection()`."""
        with database_errors():
            return self._query(statement, parameters)

    def _query(self, statement, parameters: dict | None) -> list:
        from .prepared import Prepared
        if isinstance(statement, Prepared):
            run = statement.rows
        else:
            def run(conn, params):
                return list(conn.execute(statement, params).all())
        conn = self._thread_connection("reader")
        if conn is None:
            with self._read_engine.begin() as pooled:
                return run(pooled, parameters or {})
        try:
            return run(conn, parameters or {})
        except DBAPIError:
            self._drop_thread_connection("reader")  # cheap to re-open; a broken one must not stay
            raise

    def _thread_connection(self, kind: str) -> Connection | None:
        if self._thread_engine is None:
            return None
        threads = self._threads
        if threads.pid != os.getpid():  # a fork (gunicorn worker) inherits no connection
            threads.pid, threads.reader = os.getpid(), None
        conn = getattr(threads, kind)
        if conn is None:
            conn = self._thread_engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            setattr(threads, kind, conn)
        return conn

    def _drop_thread_connection(self, kind: str) -> None:
        conn = getattr(self._threads, kind)
        setattr(self._threads, kind, None)
        if conn is not None:
            try:
                conn.close()
            except Exception:  # already broken: nothing more to release
                pass

    @staticmethod
    def _usable(conn: Connection) -> bool:
        return not conn.closed and not conn.invalidated

    def run(self, work, *, attempts: int = 5, core: bool = False):
        """Run `work(session)` in a transaction, retrying when SQLite reports the database busy;
        `core=True` passes a Core Connection (see `write`) instead of a Session, and with group commit
        (on SQLite) that transaction may be shared with other threads' units, each in its own savepoint
        (group_commit.py): `work` must then use only the connection it is given and its own arguments,
        never this thread's state, and it returns only once the shared COMMIT has."""
        with database_errors():
            if core and self._group is not None:
                return self._group.run(work, attempts)
            return self._run(work, attempts, self._write if core else self._transaction)

    @staticmethod
    def _run(work, attempts: int, opener):
        for attempt in range(attempts):
            try:
                with opener() as session:
                    return work(session)
            except OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if attempt == attempts - 1:
                    raise Unavailable("the database is busy; try again") from exc
                time.sleep(backoff_delay(attempt + 1, base=0.05, cap=1.0))
        raise AssertionError("unreachable")

    def dispose(self) -> None:
        """Close the pool, the process's writer and the calling thread's reader (other threads' close with
        them); called once no transaction is open."""
        self._drop_thread_connection("reader")
        self._drop_writer()
        self.engine.dispose()
