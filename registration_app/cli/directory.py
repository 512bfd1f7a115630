"""`autoenroll sync` (status, drain, reconcile), `autoenroll provision` and `autoenroll crl`: the
directory and the CRL. They parse options and print; the use cases are registration_app/ra/directory.py."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from .root import _operator, _services, _settings, main


@main.group()
def sync() -> None:
    """Directory synchronisation."""


@sync.command("status")
@click.pass_context
def sync_status(ctx) -> None:
    """Outbox depth and oldest age, the last reconcile pass and the CRL."""
    from ..ra.directory import sync_status as status
    click.echo(json.dumps(status(_settings(ctx)), indent=2, default=str))


@sync.command("drain")
@click.pass_context
def sync_drain(ctx) -> None:
    """Publish everything that is due now (the server's worker does this on its own)."""
    from ..ra.directory import drain
    drained = drain(_services(ctx))
    click.echo(f"published {drained.published} outbox rows")
    for name, published in drained.targets:
        click.echo(f"target {name}: published {published} outbox rows")


@sync.command("reconcile")
@click.option("--dry-run", is_flag=True, help="Change nothing; print what would be done.")
@click.option("--incremental", is_flag=True,
              help="Only entries and certificates changed since the last pass (a full pass if none ran).")
@click.option("--every", type=float, metavar="SECONDS",
              help="Run periodically (a full pass first, then --incremental ones if given) until stopped.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.pass_context
def sync_reconcile(ctx, dry_run: bool, incremental: bool, every: float | None, as_json: bool) -> None:
    """Revoke and unpublish what is no longer entitled; put the directory in line with the CA."""
    from ..ra.directory import reconcile, reconcile_periodically
    if every is not None:
        if dry_run:
            raise click.UsageError("--every and --dry-run do not go together")
        if every <= 0:
            raise click.UsageError("--every needs a positive number of seconds")
        try:
            reconcile_periodically(_services(ctx), every, incremental=incremental, operator=_operator(),
                                   echo=click.echo)
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        return
    report = reconcile(_services(ctx), dry_run=dry_run, incremental=incremental, operator=_operator())
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        for line in report.lines():
            click.echo(line)
    if report.errors:
        sys.exit(1)


@main.command()
@click.option("--group", required=True, help="Group DN (or bare cn under the groups base).")
@click.option("--profile", "profile_name", default=None,
              help="Encryption profile (default: the setting default_encryption_profile).")
@click.option("--batch-size", type=click.IntRange(1, 5000), default=200, show_default=True)
@click.option("--dry-run", is_flag=True, help="Count who would get a certificate; issue nothing.")
@click.pass_context
def provision(ctx, group: str, profile_name: str, batch_size: int, dry_run: bool) -> None:
    """Issue an escrowed encryption certificate to every entitled member of GROUP who lacks one.

    Members collect their private key later through self-service recovery. Safe to run again:
    members who already have a current certificate of the profile are skipped.
    """
    from ..ra.directory import provision_group
    services = _services(ctx)
    options = dict(batch_size=batch_size, dry_run=dry_run, operator=_operator())
    if sys.stderr.isatty() and not dry_run:
        with click.progressbar(length=1, label="provisioning", file=sys.stderr) as bar:
            def progress(advance: int, total: int) -> None:
                bar.length = max(1, total)
                bar.update(advance)

            report = provision_group(services, group, profile_name, progress=progress, **options)
    else:
        report = provision_group(services, group, profile_name, **options)
    if dry_run:
        click.echo(f"dry run, nothing issued: provision {report.profile} for {group}: {report.members} members, "
                   f"{report.entitled} entitled, {report.already} already have one, would issue {report.issued}")
    else:
        click.echo(report.summary())
    for email, why in report.failed[:20]:
        click.echo(f"  not issued to {email}: {why}", err=True)


@main.command()
@click.option("--refresh", is_flag=True, help="Build a new CRL now (new number) and publish it to LDAP.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the CRL (DER) here.")
@click.pass_context
def crl(ctx, refresh: bool, out: Path | None) -> None:
    """Show the current CRL (rebuilt if past half its validity); --refresh forces a new one."""
    from ..ra.directory import current_crl
    services = _services(ctx)
    shown = current_crl(services, refresh=refresh, out=out)
    if shown.not_published is not None:
        click.echo(f"not published to LDAP now ({shown.not_published}); the outbox will retry", err=True)
    current = shown.crl
    left = current.next_update_utc - datetime.now(timezone.utc)
    click.echo(f"CRL number {shown.number}: {len(current)} revoked, this update "
               f"{current.last_update_utc:%Y-%m-%d %H:%M:%S}Z, next update {current.next_update_utc:%Y-%m-%d %H:%M:%S}Z "
               f"(in {left.total_seconds() / 3600:.1f} h); served at {services.settings.crl_url}")
