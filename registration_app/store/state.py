"""Named values of the service's own state (`sync_state`): reconcile's last run and report, the KRA's
spent recovery evidence."""

from __future__ import annotations

from .db import Database
from .models import SyncState


def state_in(session, name: str) -> str | None:
    """The value of `name` in the caller's transaction, or None."""
    row = session.get(SyncState, name)
    return row.value if row is not None else None


def put_state(session, name: str, value: str) -> None:
    """Set `name` in the caller's transaction (inserted if new: two writers of a new name race on its key)."""
    row = session.get(SyncState, name)
    if row is None:
        session.add(SyncState(name=name, value=value))
    else:
        row.value = value


def read_state(db: Database, name: str) -> str | None:
    with db.read() as session:
        return state_in(session, name)
