"""A bare server database for the store's and auth's tests: migrated, with the keys `autoenroll init`
would write into a data folder, on SQLite or on the run's PostgreSQL (`--database=postgresql`)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.postgres import database_url_for
from registration_app.store.db import Database, migrate
from registration_app.store.keys import StoreKeys


def server_keys(folder: Path) -> StoreKeys:
    """The keys `autoenroll init` would write into a data folder, made here for a bare Database."""
    return StoreKeys(nonce=secrets.token_bytes(32), codes=secrets.token_bytes(32), audit=secrets.token_bytes(32),
                     checkpoint=folder / "audit.checkpoint")


@contextmanager
def bare_database(folder: Path, **options) -> Iterator[Database]:
    """`options`: of Database (group_commit)."""
    url = database_url_for() or f"sqlite:///{folder / 't.db'}"
    migrate(url)
    database = Database(url, keys=server_keys(folder), **options)
    try:
        yield database
    finally:
        database.dispose()
