"""`autoenroll keys ...`: where the CA, TLS CA and KRA private keys live (files, or a PKCS#11 token;
README, Keys in an HSM). init's key-store options are in init.py; the use case is registration_app/ra/keys.py."""

from __future__ import annotations

import click

from ..ra.setup import KEY_NAMES, OptionConflict
from .root import _settings, main

KEY_CHOICE = click.Choice(list(KEY_NAMES))


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
    from ..ra.keys import import_key_to_token
    try:
        imported = import_key_to_token(_settings(ctx), name, module=module, token=token_label, pin_file=pin_file)
    except OptionConflict as exc:
        raise click.UsageError(exc.detail) from exc
    click.echo(f"imported {imported.key_file.name} into token {imported.token!r} as {imported.label!r} "
               "(sensitive, never extractable)")
    click.echo(f"NOW DESTROY THE FILE COPY: {imported.key_file} is still a copy of the key that anyone with the "
               f"passphrase can use: shred -u {imported.key_file}", err=True)
    click.echo(f"then add {name!r} to key_store.in_token (with module and token) in the configuration; the "
               "server refuses to start while the file is there", err=True)
