"""Bringing a database from before revision 0005 under the server's keys (keys.py), once, at `autoenroll init`.

Before 0005 the nonce MAC key was a `sync_state` row, each enrollment code's MAC key was stored as it is,
and the audit chain was plain SHA-256. A migration has only the database URL, not the keys, so 0005 adds
the columns and `adopt_server_keys` does the rest in one transaction:

- the `sync_state` nonce key row is deleted (the nonce key is now `nonce.secret`, a new key: the old one
  was readable in the database; nonces in flight, five minutes' worth, are refused once and re-fetched);
- each code's MAC key is sealed under `codes.secret` (outstanding invitations keep working);
- the audit chain is verified as it was (plain SHA-256) and, if intact, re-chained under `audit.secret`,
  with an `audit.rekeyed` row that records the old head; the checkpoint then anchors it. A broken old
  chain is refused, so that init never launders a tampered log.

Until that has run, `pending` says why, and the server refuses to start (wiring.py).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import delete, func, select, update

from ..core.errors import ConfigError
from . import audit
from .db import Database
from .keys import seal_code_key
from .models import AuditEvent, AuditHead, EnrollmentCode, SyncState

LEGACY_NONCE_KEY = "nonce-mac-key"  # the sync_state row of databases before 0005

_HEADS, _EVENTS, _CODES, _STATE = (AuditHead.__table__, AuditEvent.__table__, EnrollmentCode.__table__,
                                   SyncState.__table__)


def pending(db: Database) -> str | None:
    """What still sits in the database that belongs in the data folder, or None."""
    with db.read_connection() as conn:
        if conn.execute(select(_HEADS.c.keyed).where(_HEADS.c.id == 1)).scalar() == 0:
            return audit.UNKEYED_CHAIN
        if conn.execute(select(func.count()).select_from(_CODES).where(_CODES.c.key_version == 0)).scalar():
            return audit.UNKEYED_CHAIN.replace("re-chain the log under the audit key", "seal the enrollment codes")
        if conn.execute(select(_STATE.c.name).where(_STATE.c.name == LEGACY_NONCE_KEY)).first() is not None:
            return audit.UNKEYED_CHAIN.replace("and re-chain the log under the audit key", "")
    return None


def keyed_log(db: Database) -> bool:
    """Whether the database holds audit rows keyed already (then a new audit.secret could verify none)."""
    with db.read_connection() as conn:
        head = conn.execute(select(_HEADS.c.keyed, _HEADS.c.rows).where(_HEADS.c.id == 1)).first()
    return head is not None and bool(head.keyed) and bool(head.rows)


KEYED_WITHOUT_KEY = ("the audit log is keyed with an audit.secret that this data folder lacks: copy it from the "
                     "host where `autoenroll init` first ran (README, Server secrets)")


def adopt_server_keys(db: Database) -> list[str]:
    """Move what `pending` finds under the keys of `db`; what was done, for init to print."""

    def work(conn):
        done = []
        head = conn.execute(select(_HEADS).where(_HEADS.c.id == 1).with_for_update()).first()
        if head is not None and not head.keyed:
            done.append(_rechain(conn, db, head))
        sealed = 0
        for row in conn.execute(select(_CODES.c.id, _CODES.c.mac_key).where(_CODES.c.key_version == 0)).all():
            conn.execute(update(_CODES).where(_CODES.c.id == row.id).values(
                mac_key=seal_code_key(db.keys, row.id, bytes(row.mac_key)), key_version=1))
            sealed += 1
        if sealed:
            done.append(f"sealed {sealed} enrollment code key(s) under codes.secret")
        if conn.execute(delete(_STATE).where(_STATE.c.name == LEGACY_NONCE_KEY)).rowcount:
            done.append("removed the nonce key from the database (now nonce.secret)")
        return done

    return db.run(work, core=True)


def _rechain(conn, db: Database, head) -> str:
    if db.anchor is not None and db.anchor.path.exists():
        raise ConfigError("the audit head says its log is unkeyed, but this data folder holds a checkpoint of a "
                          "keyed log: the database was changed; compare it with a backup before going on")
    key = db.keys.need("audit")
    prev, count = audit.GENESIS, 0
    rows = conn.execute(select(_EVENTS).order_by(_EVENTS.c.id)).all()
    for row in rows:
        if row.prev_hash != prev or audit.unkeyed_digest(row.prev_hash, row.at, row.event, row.outcome, row.actor,
                                                         row.subject, row.detail) != row.hash:
            raise ConfigError(f"the audit log from before its key is broken at row {row.id}: it is not re-chained "
                              "(init would vouch for a changed log); compare it with a backup")
        prev = row.hash
    if rows and (head.last_id != rows[-1].id or head.last_hash != prev):
        raise ConfigError("the audit log from before its key lost rows at its end: it is not re-chained")
    unkeyed_head, prev = prev, audit.GENESIS
    for row in rows:
        digest = audit.keyed_digest(key, prev, row.at, row.event, row.outcome, row.actor, row.subject, row.detail)
        conn.execute(update(_EVENTS).where(_EVENTS.c.id == row.id).values(prev_hash=prev, hash=digest))
        prev, count = digest, count + 1
    conn.execute(update(_HEADS).where(_HEADS.c.id == 1).values(last_hash=prev, rows=count, keyed=1))
    audit.append_many(conn, [dict(event="audit.rekeyed", outcome="done", actor="autoenroll init", subject="audit",
                                  detail={"rows": count, "unkeyed_head": unkeyed_head})], datetime.now(timezone.utc))
    return f"re-chained {count} audit row(s) under audit.secret (the unkeyed chain verified first)"
