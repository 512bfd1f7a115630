"""`autoenroll keys ...`: where the CA, TLS CA and KRA private keys live (files, or a PKCS#11 token;
README, Keys in an HSM). init's key-store options are in init.py."""

from __future__ import annotations

import getpass
from pathlib import Path

import click

from ..core.errors import AutoenrollError
from ..settings import Settings
from .root import main

KEY_CHOICE = click.Choice(["ca", "tls_ca", "kra"])


@main.group("keys")
def keys() -> None:
    """Where the CA, TLS CA and KRA private keys are: files of the data folder or a PKCS#11 token."""


@keys.command("import-to-token")
@click.argument("name", type=KEY_CHOICE)
@click.option("--module", default=None, help="The PKCS#11 module (default: key_store.module).")
@click.option("--token", "token_label", default=None, help="The token's label (default: key_store.token).")
@click.option("--pin-file", default=None, help="The user PIN's file (default: key_store.pin_file).")
@click.pass_context
def import_to_token(ctx, name: str, module: str | None, token_label: str | None, pin_file: str | None) -> None:
    """Move the file key NAME (ca, tls_ca or kra) into the token, marked sensitive and not extractable
    there; refused when the token already holds it. The file copy must then be destroyed."""
    from ..authorities.pkcs11_store import Token, key_fingerprint, key_label
    from ..authorities.pki_files import PkiPaths, read_private_key

    settings: Settings = ctx.obj["settings"]
    ks = settings.key_store
    module, token_label = module or ks.module, token_label or ks.token
    if not module or not token_label:
        raise click.UsageError("name the token: --module and --token (or key_store.module and .token)")
    paths = PkiPaths.in_dir(settings.data_dir)
    key_file: Path = {"ca": paths.ca_key, "tls_ca": paths.tls_ca_key, "kra": paths.kra_key}[name]
    token = Token(module, token_label, settings.path(pin_file or ks.pin_file))
    try:
        if key_label(name) in token.labels():
            raise click.ClickException(
                f"token {token_label!r} already holds {key_label(name)!r}: {name} was imported (or generated) "
                f"there before; refusing to import it twice. If {key_file.name} is still in "
                f"{settings.data_dir}, destroy it: shred -u {key_file}")
        if not key_file.exists():
            raise click.ClickException(f"no {key_file.name} in {settings.data_dir}: nothing to import")
        private_key = read_private_key(key_file, settings.passphrase())
        token.import_key(name, private_key)
        token.key(name, private_key.public_key()).check()  # the token signs (or unwraps) with it now
        _audit_import(settings, name, token_label, key_fingerprint(private_key.public_key()))
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    click.echo(f"imported {key_file.name} into token {token_label!r} as {key_label(name)!r} "
               "(sensitive, never extractable)")
    click.echo(f"NOW DESTROY THE FILE COPY: {key_file} is still a copy of the key that anyone with the "
               f"passphrase can use: shred -u {key_file}", err=True)
    click.echo(f"then add {name!r} to key_store.in_token (with module and token) in the configuration; the "
               "server refuses to start while the file is there", err=True)


def _audit_import(settings: Settings, name: str, token_label: str, fingerprint: str) -> None:
    """One audit row for the move, when this host keeps the audit log (the key's host may not)."""
    from ..authorities.pki_files import read_server_keys
    from ..store import audit
    from ..store.db import Database, migrate
    from ..store.keys import KEY_FILES
    from datetime import datetime, timezone
    if not settings.path(KEY_FILES["audit"]).exists():
        return
    migrate(settings.db_url)
    db = Database(settings.db_url, keys=read_server_keys(settings.data_dir, ("audit",)))
    try:
        db.run(lambda conn: audit.append(
            conn, event="key.imported_to_token", outcome="done", actor=f"operator:{getpass.getuser()}",
            subject=name, now=datetime.now(timezone.utc),
            detail={"token": token_label, "public_key_sha256": fingerprint}))
    finally:
        db.dispose()


