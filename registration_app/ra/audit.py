"""The operator's check of the audit log (`autoenroll audit verify`): the keyed hash chain walked
against the checkpoint kept outside the database. The command (registration_app/cli/audit.py) prints
what this returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings
from ..store.audit import AuditReport
from ..store.keys import CHECKPOINT_FILE


@dataclass(frozen=True)
class AuditVerdict:
    checkpoint_file: Path
    report: AuditReport | None  # None: the checkpoint could not be read, so nothing was verified
    unreadable: str = ""  # why not


def verify_audit_log(settings: Settings) -> AuditVerdict:
    """Walk the chain of this data folder's database with its audit key and checkpoint."""
    from ..authorities.pki_files import read_server_keys
    from ..store import audit
    from ..store.db import Database
    keys = read_server_keys(settings.data_dir, ("audit",))
    checkpoint_file = keys.checkpoint or settings.path(CHECKPOINT_FILE)
    db = Database(settings.db_url, keys=keys)
    try:
        try:
            checkpoint = db.anchor.read() if db.anchor is not None else None
        except ValueError as exc:
            return AuditVerdict(checkpoint_file, None, str(exc))
        with db.snapshot() as conn:  # the head and the rows as of one moment, the server appending meanwhile
            return AuditVerdict(checkpoint_file, audit.verify(conn, keys, checkpoint))
    finally:
        db.dispose()
