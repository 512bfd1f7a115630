"""Prepared statements for the hot paths: a Core statement compiled once per dialect (and, for an
INSERT, per set of columns), then run straight on the DBAPI cursor of the caller's Connection, with
the same bind and result processing as SQLAlchemy's (the columns' types: UTC datetimes, JSON).

SQLAlchemy's per-statement work (the compiled-cache lookup, the execution context, constructing the
parameters, the result's metadata) costs about a hundred times the SQL of a primary-key read or
insert on SQLite (PERFORMANCE.md, "The transaction"); an enrollment runs about fifteen such
statements, most of them inside the SQLite writer lock. The statement runs on the Connection's own
DBAPI connection, so it belongs to the transaction (or autocommit snapshot) that Connection is in; a
driver error leaves as SQLAlchemy's DBAPIError (errors.py translates it like any other).

Only for statements whose every column value is passed in (no Python-side default other than a
constant, which is filled in) and without expanding IN lists: the others stay ordinary Core."""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.dml import Insert


@dataclass(frozen=True)
class _Compiled:
    sql: str
    names: tuple[str, ...]  # the parameters, in the driver's order (positional) or by name
    positional: bool
    constants: dict[str, Any]  # parameters with a value in the statement itself, or a column default
    processors: dict[str, Callable[[Any], Any]]
    row: Any  # the namedtuple of one result row, or None
    results: tuple[Callable[[Any], Any] | None, ...]


class Prepared:
    """`statement`, compiled once per dialect; see the module docstring."""

    def __init__(self, statement) -> None:
        self.statement = statement
        self._compiled: dict[tuple, _Compiled] = {}
        self._lock = threading.Lock()

    def _for(self, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        cache_key = (dialect.name, keys) if isinstance(self.statement, Insert) else (dialect.name,)
        found = self._compiled.get(cache_key)
        if found is None:
            with self._lock:
                found = self._compiled.get(cache_key) or self._compile(dialect, keys)
                self._compiled[cache_key] = found
        return found

    def _compile(self, dialect: Dialect, keys: tuple[str, ...]) -> _Compiled:
        constants: dict[str, Any] = {}
        column_keys = None
        if isinstance(self.statement, Insert):
            column_keys = list(keys)
            for column in self.statement.table.columns:
                if column.key in keys or column.default is None:
                    continue
                if not column.default.is_scalar:
                    raise ValueError(f"{column} has a computed default: pass its value")
                column_keys.append(column.key)
                constants[column.key] = cast(Any, column.default).arg  # a scalar ColumnDefault
        compiled = self.statement.compile(dialect=dialect, column_keys=column_keys)
        positional = bool(dialect.positional)
        names = tuple(compiled.positiontup or ()) if positional else tuple(compiled.binds)
        processors = {}
        for name, bind in compiled.binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                processors[name] = processor
            if name not in constants and not bind.required:  # a value written in the statement (None too)
                constants[name] = bind.effective_value
        columns = list(getattr(self.statement, "exported_columns", ()) or ())
        row = namedtuple("Row", [c.key for c in columns], rename=True) if columns else None
        results = tuple(c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns)
        return _Compiled(compiled.string, names, positional, constants, processors, row, results)

    def _parameters(self, compiled: _Compiled, params: dict) -> Sequence | dict:
        values = []
        for name in compiled.names:
            value = params[name] if name in params else compiled.constants[name]
            processor = compiled.processors.get(name)
            values.append(processor(value) if processor is not None else value)
        return values if compiled.positional else dict(zip(compiled.names, values))

    def _cursor(self, conn: Connection, params: dict | list[dict]):
        rows = params if isinstance(params, list) else [params]
        keys = tuple(sorted(rows[0])) if rows else ()
        compiled = self._for(conn.dialect, keys)
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None, "a Connection that is open"
        cursor = dbapi.cursor()
        try:
            if isinstance(params, list):
                cursor.executemany(compiled.sql, [self._parameters(compiled, row) for row in rows])  # type: ignore[arg-type]
            else:
                cursor.execute(compiled.sql, self._parameters(compiled, params))
        except conn.dialect.loaded_dbapi.Error as exc:
            # as SQLAlchemy does: a connection the server dropped is invalidated (the pool replaces it)
            gone = conn.dialect.is_disconnect(exc, dbapi, cursor)
            cursor.close()
            if gone:
                conn.invalidate(exc)
            raise DBAPIError.instance(compiled.sql, None, exc, conn.dialect.loaded_dbapi.Error,
                                      connection_invalidated=gone, dialect=conn.dialect) from exc
        return compiled, cursor

    def rows(self, conn: Connection, params: dict | None = None) -> list:
        """The rows of a SELECT (or an INSERT/UPDATE ... RETURNING), as named tuples."""
        compiled, cursor = self._cursor(conn, params or {})
        try:
            fetched = cursor.fetchall()
        finally:
            cursor.close()
        make, results = compiled.row, compiled.results
        return [make(*(value if process is None else process(value) for value, process in zip(raw, results)))
                for raw in fetched]

    def run(self, conn: Connection, params: dict | list[dict]) -> int:
        """Execute (a list: executemany); the driver's row count."""
        if isinstance(params, list) and not params:
            return 0
        _compiled, cursor = self._cursor(conn, params)
        try:
            return cursor.rowcount
        finally:
            cursor.close()

    @staticmethod
    def sql(conn: Connection, text: str) -> None:
        """A statement without parameters or rows (a SAVEPOINT), on the same cursor path."""
        Prepared(None)._execute_text(conn, text)

    def _execute_text(self, conn: Connection, text: str) -> None:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None, "a Connection that is open"
        cursor = dbapi.cursor()
        try:
            cursor.execute(text)
        except conn.dialect.loaded_dbapi.Error as exc:
            gone = conn.dialect.is_disconnect(exc, dbapi, cursor)
            if gone:
                conn.invalidate(exc)
            raise DBAPIError.instance(text, None, exc, conn.dialect.loaded_dbapi.Error,
                                      connection_invalidated=gone, dialect=conn.dialect) from exc
        finally:
            cursor.close()
