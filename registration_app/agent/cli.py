"""`autoenroll-agent`: the user-server side."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli_errors import ReportingGroup, debug_option
from . import actions
from .actions import bootstrap as do_bootstrap
from .actions import enroll as do_enroll
from .client import AgentConfig, AgentError, RegistrationClient
from .store import AgentStore


@click.group(cls=ReportingGroup)
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="AUTOENROLL_AGENT_CONFIG", default="var/agent.toml", show_default=True,
              help="Agent configuration written by `autoenroll init`.")
@debug_option
@click.pass_context
def main(ctx: click.Context, config_path: Path, debug: bool) -> None:
    """Obtain certificates for users, authenticated by their first certificate."""
    try:
        config = AgentConfig.load(config_path)
    except (ValueError, KeyError, TypeError) as exc:  # TOMLDecodeError is a ValueError
        raise click.ClickException(f"{config_path} is not an agent configuration ({type(exc).__name__}: "
                                   f"{exc}); `autoenroll init` writes one") from exc
    ctx.obj = {"config": config, "store": AgentStore(config.store)}


def _client(ctx) -> RegistrationClient:
    client = RegistrationClient(ctx.obj["config"])
    ctx.call_on_close(client.close)
    return client


def _report(outcome, what: str) -> None:
    click.echo(f"{what} for {outcome.email}: profile {outcome.profile}, serial {outcome.serial}, "
               f"valid until {outcome.not_after}")
    click.echo("published in the directory" if outcome.published
               else "not in the directory yet: queued (LDAP slow or unavailable); the server publishes it "
                    "as soon as LDAP accepts it")
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
@click.option("--profile", default=None,
              help="A profile of the server (default: its default_encryption_profile; the built-in ones are "
                   "listed above).")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="PKCS#12 password (default: a random one, saved beside the .p12 with mode 0600).")
@click.option("--legacy", is_flag=True, help="3DES/SHA-1 PKCS#12 for clients that cannot read AES.")
@click.option("--replace", is_flag=True, help="Replace the current certificate now, even before its renewal window.")
@click.option("--client-key", is_flag=True, help="Generate the key here and send a CSR (signature profiles).")
@click.pass_context
def enroll(ctx, email, profile, password_file, legacy, replace, client_key) -> None:
    """Obtain a certificate of PROFILE for a user who holds a signature certificate.

    \b
    The profiles a server has out of the box:
      smime-encryption     RSA-3072 encryption key, made and escrowed by the server (the default)
      smime-encryption-ec  EC P-256 encryption key, made and escrowed by the server
      smime-signature      EC P-256 signature key, made here (--client-key) or by the server

    A server may be configured with others: it lists its own when it refuses an unknown name
    (404 unknown_profile). The agent has no copy of the server's configuration to read them from.
    """
    password = password_file.read_text().strip() if password_file else None
    try:
        outcome = do_enroll(_client(ctx), ctx.obj["store"], email, profile, password=password,
                            legacy=legacy, replace=replace, client_key=client_key)
    except (AgentError, ValueError) as exc:
        _fail(exc)
    _report(outcome, "certificate")


@main.command(name="list")
@click.option("--email", help="Ask the server for this user's certificates (all states) instead.")
@click.pass_context
def list_(ctx, email: str | None) -> None:
    """What this agent holds for each user (or, with --email, what the server knows)."""
    if email:
        try:
            body = actions.list_remote(_client(ctx), ctx.obj["store"], email)
        except (AgentError, ValueError) as exc:
            _fail(exc)
        click.echo(body["email"])
        for c in body["certificates"]:
            click.echo(f"  {c['profile']:24} {c['serial']}  {c['status']:10} until {c['not_after'][:10]}"
                       f"{'  escrowed' if c['escrowed'] else ''}")
        return
    for folder in ctx.obj["store"].users():
        state = folder.state()
        click.echo(folder.email)
        for serial, info in sorted(state.get("certificates", {}).items(), key=lambda kv: kv[1]["not_after"]):
            current = state.get("current", {}).get(info["profile"]) == serial
            click.echo(f"  {info['profile']:24} {serial}  until {info['not_after'][:10]}"
                       f"{'  (current)' if current else ''}")


@main.command()
@click.option("--email", required=True)
@click.option("--profile", default="smime-encryption", show_default=True)
@click.option("--force", is_flag=True, help="Renew now, even before the renewal window opens.")
@click.pass_context
def renew(ctx, email: str, profile: str, force: bool) -> None:
    """Renew the user's current certificate of PROFILE (signature keys are generated here)."""
    try:
        _report(actions.renew(_client(ctx), ctx.obj["store"], email, profile, force=force), "renewed certificate")
    except (AgentError, ValueError) as exc:
        _fail(exc)


@main.command()
@click.option("--email", required=True)
@click.option("--serial", "serials", multiple=True, help="Serial (hex) of an encryption certificate; repeatable.")
@click.option("--all", "all_", is_flag=True, help="Every escrowed encryption key of the user.")
@click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--legacy", is_flag=True, help="3DES/SHA-1 PKCS#12 for clients that cannot read AES.")
@click.pass_context
def recover(ctx, email, serials, all_, password_file, legacy) -> None:
    """Get the user's escrowed encryption keys back (current, superseded, expired or revoked)."""
    if bool(serials) == all_:
        _fail(click.UsageError("give --serial S (one or more) or --all"))
    password = password_file.read_text().strip() if password_file else None
    try:
        outcomes = actions.recover(_client(ctx), ctx.obj["store"], email,
                                   serials=None if all_ else list(serials), password=password, legacy=legacy)
    except (AgentError, ValueError) as exc:
        _fail(exc)
    click.echo(f"recovered {len(outcomes)} key(s) for {email}; {PASSWORD_BESIDE}")
    for outcome in outcomes:
        click.echo(f"  {outcome.profile} {outcome.serial} (until {outcome.not_after[:10]}): {outcome.files['pkcs12']}")


# Where a recovered key's password is (one line before the list: scripts read each key's .p12 from its line).
PASSWORD_BESIDE = "each PKCS#12's password is in the .pass file beside it (mode 0600)"


@main.command()
@click.option("--email", required=True)
@click.option("--serial", required=True)
@click.option("--reason", default="unspecified", show_default=True,
              type=click.Choice(["unspecified", "keyCompromise", "affiliationChanged", "superseded",
                                 "cessationOfOperation"]))
@click.pass_context
def revoke(ctx, email, serial, reason) -> None:
    """Revoke one of the user's own certificates."""
    try:
        body = actions.revoke(_client(ctx), ctx.obj["store"], email, serial, reason)
    except (AgentError, ValueError) as exc:
        _fail(exc)
    click.echo(f"revoked {body['serial']} ({body['reason']})")


@main.group()
def officer() -> None:
    """m-of-n key recovery by recovery officers (each signs with their own certificate)."""


def _officer_call(ctx, officer_email: str, path: str, payload: dict) -> dict:
    try:
        return actions.officer_call(_client(ctx), ctx.obj["store"], officer_email, path, payload)
    except (AgentError, ValueError) as exc:
        _fail(exc)


def _show_request(body: dict) -> None:
    """Everything an approval covers, so that `approve` approves what an officer has read."""
    click.echo(f"recovery request {body['id']}: {body['status']}; user {body['email']}; "
               f"approvals {len(body['approvals'])}/{body['quorum']} {', '.join(body['approvals'])}; "
               f"expires {body['expires_at'][:16]}")
    click.echo(f"  requested by {body.get('requester', '?')}; reason: {body.get('reason') or '(none given)'}")
    serials = body.get("serials")
    click.echo(f"  keys: {', '.join(serials) if serials else 'every escrowed key of the user'}")
    for approval in body.get("discounted", ()):
        click.echo(f"  approval by {approval['officer']} no longer counts: {approval['why']}")


@officer.command("request")
@click.option("--as", "officer_email", required=True, help="The requesting officer.")
@click.option("--user", "user_email", required=True, help="Whose keys.")
@click.option("--serial", "serials", multiple=True)
@click.option("--reason", required=True)
@click.pass_context
def officer_request(ctx, officer_email, user_email, serials, reason) -> None:
    payload = {"email": user_email, "reason": reason, **({"serials": list(serials)} if serials else {"all": True})}
    _show_request(_officer_call(ctx, officer_email, "recovery-requests", payload))


@officer.command("approve")
@click.option("--as", "officer_email", required=True)
@click.argument("request_id")
@click.pass_context
def officer_approve(ctx, officer_email, request_id) -> None:
    """Approve exactly what `show` displays: the approval repeats the user and serials it covers."""
    shown = _officer_call(ctx, officer_email, f"recovery-requests/{request_id}/show", {})
    _show_request(shown)
    _show_request(_officer_call(ctx, officer_email, f"recovery-requests/{request_id}/approve",
                                {"email": shown["email"], "serials": shown["serials"]}))


@officer.command("refuse")
@click.option("--as", "officer_email", required=True)
@click.argument("request_id")
@click.pass_context
def officer_refuse(ctx, officer_email, request_id) -> None:
    _show_request(_officer_call(ctx, officer_email, f"recovery-requests/{request_id}/refuse", {}))


@officer.command("show")
@click.option("--as", "officer_email", required=True)
@click.argument("request_id")
@click.pass_context
def officer_show(ctx, officer_email, request_id) -> None:
    _show_request(_officer_call(ctx, officer_email, f"recovery-requests/{request_id}/show", {}))


@officer.command("release")
@click.option("--as", "officer_email", required=True)
@click.argument("request_id")
@click.pass_context
def officer_release(ctx, officer_email, request_id) -> None:
    """Receive the keys of an approved request (once)."""
    try:
        body, outcomes = actions.officer_release(_client(ctx), ctx.obj["store"], officer_email, request_id)
    except (AgentError, ValueError) as exc:
        _fail(exc)
    _show_request(body)
    click.echo(f"released {len(outcomes)} key(s); {PASSWORD_BESIDE}")
    for outcome in outcomes:
        click.echo(f"  {outcome.serial}: {outcome.files['pkcs12']}")


@main.command()
@click.option("--interval", default=300.0, show_default=True, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, then exit (for cron or tests).")
@click.option("--insecure-now", hidden=True, callback=lambda _c, _p, v: _instant(v),
              help="Pretend the time is this ISO instant with a zone, e.g. 2027-01-01T00:00:00+00:00 (tests only).")
@click.pass_context
def daemon(ctx, interval: float, once: bool, insecure_now) -> None:
    """Renew every certificate in the store at about two thirds of its lifetime."""
    import logging
    from datetime import datetime, timezone

    from .daemon import RenewalDaemon
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    clock = (lambda: insecure_now) if insecure_now else (lambda: datetime.now(timezone.utc))
    runner = RenewalDaemon(_client(ctx), ctx.obj["store"], clock=clock)
    if once:
        counts = runner.run_once()
        click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
        sys.exit(1 if counts["failed"] else 0)
    runner.run_forever(interval)


def _instant(value: str | None):
    """--insecure-now: an ISO 8601 instant that names its zone (a naive time is ambiguous)."""
    if value is None:
        return None
    from datetime import datetime
    try:
        instant = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    if instant.tzinfo is None:
        raise click.BadParameter(f"{value!r} has no zone: add one, e.g. {value}+00:00")
    return instant
