"""`autoenroll audit`: the audit log."""

from __future__ import annotations

import sys

import click

from ..core.errors import AutoenrollError
from .root import _settings, main


@main.group()
def audit() -> None:
    """The audit log: a keyed hash chain, anchored by a checkpoint outside the database."""


@audit.command("verify")
@click.pass_context
def audit_verify(ctx) -> None:
    """Check that no audit row was changed or deleted."""
    from ..authorities.pki_files import read_server_keys
    from ..store import audit as audit_log
    from ..store.db import Database
    settings = _settings(ctx)
    try:
        keys = read_server_keys(settings.data_dir, ("audit",))
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    db = Database(settings.db_url, keys=keys)
    try:
        try:
            checkpoint = db.anchor.read()
        except ValueError as exc:
            click.echo(f"audit log NOT VERIFIED: {keys.checkpoint}: {exc}", err=True)
            sys.exit(2)
        with db.read_connection() as conn:
            report = audit_log.verify(conn, keys, checkpoint)
    finally:
        db.dispose()
    if not report.ok:
        click.echo(f"audit log BROKEN after {report.rows} good rows: {report.problem}", err=True)
        sys.exit(2)
    anchored = (f"; its first {checkpoint.rows} match the checkpoint {keys.checkpoint}" if checkpoint
                else f"; no checkpoint in {settings.data_dir} yet (nothing appended from here)")
    click.echo(f"audit log intact: {report.rows} rows, keyed{anchored}")

