"""Where the CA, TLS CA and KRA private keys live (README, Keys in an HSM): `autoenroll keys
import-to-token` moves a file key into a PKCS#11 token. The command (registration_app/cli/keys.py)
prints what this returns; every refusal is an AutoenrollError."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..core.errors import AlreadyExists, NotFound
from ..settings import Settings
from .setup import OptionConflict


@dataclass(frozen=True)
class ImportedKey:
    name: str  # ca, tls_ca or kra
    key_file: Path  # the file copy, still there: the operator must destroy it
    token: str  # the token's label
    label: str  # the key's label in the token


def import_key_to_token(settings: Settings, name: str, *, module: str | None = None, token: str | None = None,
                        pin_file: str | None = None) -> ImportedKey:
    """Move the file key `name` into the token (module, token and PIN file default to [key_store]),
    marked sensitive and never extractable there, check that the token now signs (or unwraps) with it,
    and audit the move; refused when the token already holds it."""
    from ..authorities.pkcs11_store import Token, key_fingerprint, key_label
    from ..authorities.pki_files import PkiPaths, read_private_key

    ks = settings.key_store
    module, token = module or ks.module, token or ks.token
    if not module or not token:
        raise OptionConflict("name the token: --module and --token (or key_store.module and .token)")
    paths = PkiPaths.in_dir(settings.data_dir)
    key_file: Path = {"ca": paths.ca_key, "tls_ca": paths.tls_ca_key, "kra": paths.kra_key}[name]
    device = Token(module, token, settings.path(pin_file or ks.pin_file))
    label = key_label(name)
    if label in device.labels():
        raise AlreadyExists(
            f"token {token!r} already holds {label!r}: {name} was imported (or generated) there before; "
            f"refusing to import it twice. If {key_file.name} is still in {settings.data_dir}, destroy it: "
            f"shred -u {key_file}")
    if not key_file.exists():
        raise NotFound(f"no {key_file.name} in {settings.data_dir}: nothing to import")
    private_key = read_private_key(key_file, settings.passphrase())
    device.import_key(name, private_key)
    device.key(name, private_key.public_key()).check()  # the token signs (or unwraps) with it now
    _audit_import(settings, name, token, key_fingerprint(private_key.public_key()))
    return ImportedKey(name=name, key_file=key_file, token=token, label=label)


def _audit_import(settings: Settings, name: str, token: str, fingerprint: str) -> None:
    """One audit row for the move, when this host keeps the audit log (the key's host may not)."""
    from ..authorities.pki_files import read_server_keys
    from ..store import audit
    from ..store.db import Database, migrate
    from ..store.keys import KEY_FILES
    if not settings.path(KEY_FILES["audit"]).exists():
        return
    migrate(settings.db_url)
    db = Database(settings.db_url, keys=read_server_keys(settings.data_dir, ("audit",)))
    try:
        db.run(lambda conn: audit.append(
            conn, event="key.imported_to_token", outcome="done", actor=f"operator:{getpass.getuser()}",
            subject=name, now=datetime.now(timezone.utc),
            detail={"token": token, "public_key_sha256": fingerprint}))
    finally:
        db.dispose()
