"""What an operator's status shows of the store."""

from __future__ import annotations

from .db import Database
from .models import CrlState


def crl_summary(db: Database) -> dict | None:
    """The current CRL's number, thisUpdate and nextUpdate (ISO 8601), or None if none was built."""
    with db.read() as session:
        state = session.get(CrlState, 1)
        if state is None or state.der is None:
            return None
        return {"number": state.number, "this_update": state.this_update.isoformat(),
                "next_update": state.next_update.isoformat()}
