"""`autoenroll audit`: the audit log. The use case is registration_app/ra/audit.py."""

from __future__ import annotations

import sys

import click

from .root import _settings, main


@main.group()
def audit() -> None:
    """The audit log: a keyed hash chain, anchored by a checkpoint outside the database."""


@audit.command("verify")
@click.pass_context
def audit_verify(ctx) -> None:
    """Check that no audit row was changed or deleted."""
    from ..ra.audit import verify_audit_log
    settings = _settings(ctx)
    verdict = verify_audit_log(settings)
    report = verdict.report
    if report is None:
        click.echo(f"audit log NOT VERIFIED: {verdict.checkpoint_file}: {verdict.unreadable}", err=True)
        sys.exit(2)
    if not report.ok:
        click.echo(f"audit log BROKEN after {report.rows} good rows: {report.problem}", err=True)
        sys.exit(2)
    checkpoint = report.checkpoint
    anchored = (f"; its first {checkpoint.rows} match the checkpoint {verdict.checkpoint_file}" if checkpoint
                else f"; no checkpoint in {settings.data_dir} yet (nothing appended from here)")
    click.echo(f"audit log intact: {report.rows} rows, keyed{anchored}")
