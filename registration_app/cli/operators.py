"""The operator's commands: invite, revoke, revoke-agent. They parse options and print; the use cases
are registration_app/ra/operators.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import click

from .root import _operator, _services, _settings, main


@main.command("revoke-agent")
@click.argument("cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reason", default="keyCompromise", show_default=True, help="Recorded with the revocation.")
@click.pass_context
def revoke_agent(ctx, cert_file: Path, reason: str) -> None:
    """Refuse a user server's (or the RA's) TLS client certificate from now on: in every worker, on its
    next request, on a kept-alive connection too. Other certificates for the same name keep working."""
    from ..ra.operators import revoke_agent as revoke
    revoked = revoke(_settings(ctx), cert_file.read_bytes(), reason=reason, operator=_operator(),
                     source=str(cert_file))
    click.echo(f"{'revoked' if revoked.added else 'already revoked'}: {revoked.subject} (serial {revoked.serial})")


@main.command()
@click.argument("email")
@click.option("--hours", type=int, help="Validity of the code (default: enrollment_code_ttl_hours).")
@click.pass_context
def invite(ctx, email: str, hours: int | None) -> None:
    """Print a one-time enrollment code for EMAIL's first signature certificate."""
    from ..ra.operators import invite as create
    invitation = create(_services(ctx), email, hours=hours, operator=_operator())
    click.echo(invitation.code)
    click.echo(f"one-time code for {invitation.email}, valid for {invitation.ttl / timedelta(hours=1):g} hours; "
               "give it to the user's agent:", err=True)
    click.echo(f"  autoenroll-agent bootstrap --email {invitation.email} --code {invitation.code}", err=True)


@main.command()
@click.argument("serial")
@click.option("--reason", default="unspecified", show_default=True,
              type=click.Choice(["unspecified", "keyCompromise", "affiliationChanged", "superseded",
                                 "cessationOfOperation", "privilegeWithdrawn"]))
@click.pass_context
def revoke(ctx, serial: str, reason: str) -> None:
    """Revoke a certificate by serial (hex); the CRL is regenerated and the directory updated."""
    from cryptography import x509

    from ..ra.operators import revoke as revoke_certificate
    changed = revoke_certificate(_services(ctx), serial, x509.ReasonFlags(reason), operator=_operator())
    click.echo(f"revoked {serial} ({reason})" if changed else f"{serial} was already revoked")
