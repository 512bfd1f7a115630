"""`autoenroll-agent`: the user-server side."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .actions import bootstrap as do_bootstrap
from .actions import enroll as do_enroll
from .client import AgentConfig, AgentError, RegistrationClient
from .store import AgentStore


@click.group()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="AUTOENROLL_AGENT_CONFIG", default="var/agent.toml", show_default=True,
              help="Agent configuration written by `autoenroll init`.")
@click.pass_context
def main(ctx: click.Context, config_path: Path) -> None:
    """Obtain certificates for users, authenticated by their first certificate."""
    config = AgentConfig.load(config_path)
    ctx.obj = {"config": config, "store": AgentStore(config.store)}


def _client(ctx) -> RegistrationClient:
    return RegistrationClient(ctx.obj["config"])


def _report(outcome, what: str) -> None:
    click.echo(f"{what} for {outcome.email}: profile {outcome.profile}, serial {outcome.serial}, "
               f"valid until {outcome.not_after}")
    click.echo("published in the directory" if outcome.published
               else "queued for the directory (LDAP unavailable; the server retries)")
    for name, path in outcome.files.items():
        click.echo(f"  {name}: {path}")


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@main.command()
@click.option("--email", required=True, help="The invited user's address.")
@click.option("--code", required=True, help="The enrollment code from `autoenroll invite`.")
@click.pass_context
def bootstrap(ctx, email: str, code: str) -> None:
    """Obtain a user's first signature certificate with a one-time enrollment code."""
    try:
        _report(do_bootstrap(_client(ctx), ctx.obj["store"], email, code), "signature certificate")
    except (AgentError, ValueError) as exc:
        _fail(exc)


@main.command()
@click.option("--email", required=True)
@click.option("--profile", default="smime-encryption", show_default=True)
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PKCS#12 password (default: a random one, saved beside the .p12 with mode 0600).")
@click.option("--legacy", is_flag=True, help="3DES/SHA-1 PKCS#12 for clients that cannot read AES.")
@click.option("--replace", is_flag=True, help="Replace the current certificate now, even before its renewal window.")
@click.option("--client-key", is_flag=True, help="Generate the key here and send a CSR (signature profiles).")
@click.pass_context
def enroll(ctx, email, profile, password_file, legacy, replace, client_key) -> None:
    """Obtain a certificate of PROFILE for a user who holds a signature certificate."""
    password = password_file.read_text().strip() if password_file else None
    try:
        outcome = do_enroll(_client(ctx), ctx.obj["store"], email, profile, password=password,
                            legacy=legacy, replace=replace, client_key=client_key)
    except (AgentError, ValueError) as exc:
        _fail(exc)
    _report(outcome, "certificate")


@main.command(name="list")
@click.pass_context
def list_(ctx) -> None:
    """What this agent holds for each user."""
    for folder in ctx.obj["store"].users():
        state = folder.state()
        click.echo(folder.email)
        for serial, info in sorted(state.get("certificates", {}).items(), key=lambda kv: kv[1]["not_after"]):
            current = state.get("current", {}).get(info["profile"]) == serial
            click.echo(f"  {info['profile']:24} {serial}  until {info['not_after'][:10]}"
                       f"{'  (current)' if current else ''}")
