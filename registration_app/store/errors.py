"""The one place where database errors become the project's errors (core/errors.py), so that no
caller above the store (authorities, the RA, web, directory_sync) names SQLAlchemy.

- a constraint the write would break: DuplicateRecord, with the constraint's name (psycopg names it;
  SQLite names the columns, which `_SQLITE_COLUMNS` maps back to the constraint);
- the database server unreachable, or the connection cut (restarted, failed over): DatabaseUnavailable,
  which the agent retries (503); the pool replaces the dead connections;
- anything else (a bug: bad SQL, a missing table) stays as it is."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from ..core.errors import DatabaseUnavailable, DuplicateRecord
from .models import ONE_ENCRYPTION_CONSTRAINT, RENEWAL_KEY_CONSTRAINT

# SQLite says "UNIQUE constraint failed: certificates.renewal_key": the columns, not the constraint.
_SQLITE_COLUMNS = {"certificates.renewal_key": RENEWAL_KEY_CONSTRAINT,
                   "certificates.encryption_slot": ONE_ENCRYPTION_CONSTRAINT}
RETRY_AFTER_SECONDS = 5


def constraint_of(exc: IntegrityError) -> str:
    diag = getattr(exc.orig, "diag", None)  # psycopg names the violated constraint
    if diag is not None and diag.constraint_name:
        return diag.constraint_name
    text = str(exc.orig)
    columns = text.split("constraint failed: ", 1)[1].strip() if "constraint failed: " in text else ""
    return _SQLITE_COLUMNS.get(columns, columns)


def translated(exc: BaseException) -> BaseException:
    """The project's error for a database error, or `exc` itself when it is not one we translate."""
    if isinstance(exc, IntegrityError):
        constraint = constraint_of(exc)
        return DuplicateRecord(f"the database refused a duplicate ({constraint or 'a constraint'})",
                               constraint=constraint)
    if isinstance(exc, DBAPIError) and (isinstance(exc, OperationalError) or exc.connection_invalidated):
        cause = str(exc.orig).splitlines()[0] if exc.orig and str(exc.orig) else type(exc).__name__
        return DatabaseUnavailable("the database cannot be reached; try again shortly", cause=cause,
                                   retry_after=RETRY_AFTER_SECONDS)
    return exc


@contextmanager
def database_errors() -> Iterator[None]:
    """Around a unit of work: database errors leave it as the project's errors."""
    try:
        yield
    except DBAPIError as exc:
        error = translated(exc)
        if error is exc:
            raise
        raise error from exc


def lost_renewal_race(error: DuplicateRecord) -> bool:
    """Whether `error` is a race the caller lost, a 409: a second issuance after the same predecessor (the
    certificates' unique renewal key), or a second current encryption certificate for one address (two
    encryption profiles at once: the one-current-encryption index). Any other duplicate is a fault, not
    the client's."""
    return error.constraint in (RENEWAL_KEY_CONSTRAINT, ONE_ENCRYPTION_CONSTRAINT)


def lost_race_message(error: DuplicateRecord) -> str:
    """What the 409 of a lost race (`lost_renewal_race`) tells the client, by the constraint that decided it."""
    if error.constraint == ONE_ENCRYPTION_CONSTRAINT:
        return ("another request issued a current encryption certificate for this address at the same time; "
                "list your certificates, and enroll with replace to supersede it")
    return "another request already replaced this certificate; list your certificates and try again"
