"""`autoenroll sync` (status, drain, reconcile), `autoenroll provision` and `autoenroll crl`: the
directory and the CRL."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import click

from ..core.errors import AutoenrollError
from . import root
from .root import _operator, _settings, main


def _services(ctx):
    services = root._services(ctx)
    if getattr(services.publisher, "ca", None) is None:
        services.publisher.ca = services.ca  # lets drains refresh a CRL that is due
    return services


@main.group()
def sync() -> None:
    """Directory synchronisation."""


@sync.command("status")
@click.pass_context
def sync_status(ctx) -> None:
    """Outbox depth and oldest age, the last reconcile pass and the CRL."""
    from ..ra.operators import directory_status
    from ..store.db import Database
    settings = _settings(ctx)
    click.echo(json.dumps(directory_status(Database(settings.db_url), targets=settings.targets), indent=2, default=str))


@sync.command("drain")
@click.pass_context
def sync_drain(ctx) -> None:
    """Publish everything that is due now (the server's worker does this on its own)."""
    services = _services(ctx)
    done = services.publisher.drain(limit=100000)
    click.echo(f"published {done} outbox rows")
    for target in services.publisher.targets:
        click.echo(f"target {target.name}: published {target.drain(limit=100000)} outbox rows")


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
    from directory_sync.reconcile import Reconciler, run_periodically
    services = _services(ctx)
    reconciler = Reconciler(services.db, services.directory, services.ca, services.publisher,
                            services.settings.profiles, actor=f"reconcile:{_operator()}")
    if every is not None:
        if dry_run:
            raise click.UsageError("--every and --dry-run do not go together")
        if every <= 0:
            raise click.UsageError("--every needs a positive number of seconds")
        try:
            run_periodically(reconciler, every, incremental=incremental, echo=click.echo)
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        return
    report = reconciler.run(dry_run=dry_run, incremental=incremental)
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
    from ..core.profiles import get_profile
    from ..ra.provision import Provisioner
    services = _services(ctx)
    try:
        profile = get_profile(services.settings.profiles,
                              profile_name or services.settings.default_encryption_profile)
        provisioner = Provisioner(services, batch_size=batch_size, actor=f"provision:{_operator()}")
        if sys.stderr.isatty() and not dry_run:
            report = _with_progress(provisioner, group, profile)
        else:
            report = provisioner.run(group, profile, dry_run=dry_run)
    finally:
        services.pool.stop()
    if dry_run:
        click.echo(f"dry run, nothing issued: provision {profile.name} for {group}: {report.members} members, "
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
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509 import CRLNumber
    services = _services(ctx)
    current = services.ca.refresh_crl() if refresh else services.ca.crl()
    try:
        services.publisher.drain(limit=100000)
    except AutoenrollError as exc:
        click.echo(f"not published to LDAP now ({exc.detail}); the outbox will retry", err=True)
    if out is not None:
        out.write_bytes(current.public_bytes(Encoding.DER))
    number = current.extensions.get_extension_for_class(CRLNumber).value.crl_number
    left = current.next_update_utc - datetime.now(timezone.utc)
    click.echo(f"CRL number {number}: {len(current)} revoked, this update {current.last_update_utc:%Y-%m-%d %H:%M:%S}Z, "
               f"next update {current.next_update_utc:%Y-%m-%d %H:%M:%S}Z (in {left.total_seconds() / 3600:.1f} h); "
               f"served at {services.settings.crl_url}")


def _with_progress(provisioner, group, profile):
    """click.progressbar on stderr: only called when stderr is a terminal."""
    with click.progressbar(length=1, label="provisioning", file=sys.stderr) as bar:
        def progress(advance: int, total: int) -> None:
            bar.length = max(1, total)
            bar.update(advance)

        return provisioner.run(group, profile, progress=progress)
