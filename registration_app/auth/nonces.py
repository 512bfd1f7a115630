"""Nonces: the one owner of issuing, checking and using them. Callers ask this module; the token's
format and its table are the store's (store/repos.py), which nothing else calls for nonces.

A nonce is single use, shared by every worker: the INSERT that records it decides a race. Three ways to
use one:
- `consume`: checked and used at once, in a transaction of its own (bootstrap, the read-only routes);
- `check`, then `spend` in the transaction that acts on the request (an enrollment: the key authority's
  one transaction), so that a replay racing the original issues nothing;
- `spend_if_unused` in a refusal's transaction: a refused request uses its nonce too.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from ..core.errors import BadNonce
from ..store.db import Database
from ..store.repos import NonceToken, consume_nonce, issue_nonce, nonce_unused, record_nonce

if TYPE_CHECKING:
    from .request_checks import RequestChecks

__all__ = ["NonceToken", "check", "consume", "issue", "spend", "spend_if_unused"]

USED_MEANWHILE = "the nonce was used by another request meanwhile; get a new one"


def issue(db: Database, ttl: timedelta, now: datetime | None = None) -> str:
    """A fresh nonce (nothing is written: it is MAC-bound, and its expiry is inside it)."""
    return issue_nonce(db, ttl, now)


def consume(db: Database, value: str, now: datetime | None = None) -> bool:
    """Check `value` and use it now; False if it is not ours, expired or used."""
    return consume_nonce(db, value, now)


def check(db: Database, value: str, now: datetime | None = None, *,
          checks: RequestChecks | None = None) -> NonceToken | None:
    """The token if `value` is ours, unexpired and unused; nothing is written (see `spend`). With
    `checks`, the request's read-ahead answers (no statement of its own when it read this nonce)."""
    if checks is not None:
        return checks.nonce_unused(value, now)
    return nonce_unused(db, value, now)


def spend(conn, token: NonceToken, now: datetime | None = None, *, savepoint: bool = True) -> None:
    """Use a checked nonce in the caller's transaction; BadNonce if another request used it since the
    check (the caller's transaction then rolls back: without `savepoint`, it must)."""
    if not record_nonce(conn, token, now or datetime.now(timezone.utc), savepoint=savepoint):
        raise BadNonce(USED_MEANWHILE)


def spend_if_unused(conn, token: NonceToken) -> None:
    """Use a refused request's nonce in the caller's transaction, unless the request used it already."""
    record_nonce(conn, token)
