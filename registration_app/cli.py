"""`autoenroll`: the operator's command line."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import click

from .cli_errors import ReportingGroup, debug_option
from .core.errors import AutoenrollError
from .settings import Settings, load_settings


# Written by `init` when no --config is given, read by later commands without one: the LDAP URL and the
# ports that `make run` (or the operator's AUTOENROLL_* variables) gave the first `init`.
DEFAULT_CONFIG = Settings().data_dir / "autoenroll.toml"


def _settings(ctx) -> Settings:
    return ctx.obj["settings"]


@click.group(cls=ReportingGroup)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="AUTOENROLL_CONFIG",
              help=f"TOML configuration (default: {DEFAULT_CONFIG} if `autoenroll init` wrote it, else the "
                   "built-in defaults with data in ./var).")
@debug_option
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, debug: bool) -> None:
    """Registration server: second certificates from first ones, beside LDAP."""
    # The server logs each request; a command's INFO lines would only repeat what it prints.
    default_level = "INFO" if ctx.invoked_subcommand == "serve" else "WARNING"
    logging.basicConfig(level=os.environ.get("AUTOENROLL_LOG_LEVEL", default_level),
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.WARNING)  # its INFO lines say nothing to an operator
    # Without --config, load_settings reads what `init` wrote (<data_dir>/autoenroll.toml) if it is there;
    # a --config that names no file is an error, not the defaults.
    settings = load_settings(config_path)
    ctx.obj = {"settings": settings, "config_path": config_path}


def _services(ctx):
    from .services import build_services
    services = build_services(_settings(ctx))
    ctx.call_on_close(services.close)  # LDAP connections and the database closed when the command ends
    return services


AGENT_TOML = """# autoenroll-agent configuration, written by `autoenroll init`
server = "{server}"
cert = "agent.pem"
key = "agent.key"
server_ca = "tls-ca.pem"
store = "agent-store"
"""


@main.command()
@click.option("--ca-key-type", type=click.Choice(["ec-p256", "rsa-3072"]), default="ec-p256", show_default=True)
@click.option("--ca-name", default="Autoenroll CA", show_default=True)
@click.option("--server-name", "server_names", multiple=True, default=("localhost", "127.0.0.1"), show_default=True)
@click.option("--agent-name", "agent_names", multiple=True, default=("agent.example.org",), show_default=True)
@click.option("--http-host", default=None,
              help="Public host name of the plain-HTTP CRL and CA certificate URLs written into every "
                   "certificate (default: this machine's fully qualified name); recorded as http_url.")
@click.pass_context
def init(ctx, ca_key_type, ca_name, server_names, agent_names, http_host) -> None:
    """Create the CA, the KRA storage key, TLS certificates, the server secrets, the database and the
    agent config; on an existing data folder, make it private and move secrets out of an older database."""
    from .authorities.pki_files import PkiPaths, create_pki, write_secret
    from .core.model import KeyType

    settings = _settings(ctx)
    data = settings.data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if make_private(data):
        click.echo(f"  made {data} private (mode 700)", err=True)
    existed = PkiPaths.in_dir(data).ca_cert.exists()
    if not settings.ca_passphrase and not settings.path("passphrase").exists():
        write_secret(settings.path("passphrase"), secrets.token_urlsafe(32).encode())
    try:
        create_pki(data, ca_key_type=KeyType(ca_key_type), ca_name=ca_name, server_names=server_names,
                   agent_names=agent_names, passphrase=settings.passphrase(), now=datetime.now(timezone.utc))
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    try:
        done = _init_database(settings)
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    agent_toml = settings.path("agent.toml")
    if not agent_toml.exists():
        agent_toml.write_text(AGENT_TOML.format(server=settings.public_url))
    click.echo(("already initialised: " if existed else "initialised: ") + str(data.resolve()))
    click.echo(f"  CA certificate: {PkiPaths.in_dir(data).ca_cert}")
    click.echo(f"  agent config:   {agent_toml}")
    for line in done:
        click.echo(f"  {line}")
    if ctx.obj["config_path"] is None and settings.data_dir == DEFAULT_CONFIG.parent:
        _record_configuration(settings)
    _record_http_url(ctx, settings, http_host)


def _record_http_url(ctx, settings: Settings, http_host: str | None) -> None:
    """Write the CRL/AIA base URL into the server's configuration (the file given with --config, else
    <data_dir>/autoenroll.toml) unless one is configured already; say loudly when it is a stand-in."""
    from .settings import GENERATED_CONFIG, default_http_url
    config_path = ctx.obj.get("config_path")
    target = config_path if config_path is not None and config_path.exists() else settings.path(GENERATED_CONFIG)
    if settings.http_url:
        if http_host and http_host not in settings.http_url:
            click.echo(f"warning: --http-host {http_host} ignored: http_url = {settings.http_url!r} is configured "
                       f"already (change it where it is set, e.g. {target})", err=True)
        click.echo(f"  CRL and CA URLs: {settings.crl_url}, {settings.ca_issuers_url}")
        return
    url, fell_back = default_http_url(settings.http_bind, http_host)
    line = f'http_url = "{url}"  # CRL and caIssuers URLs in every certificate (autoenroll init --http-host)\n'
    # Top-level keys must come before the first [table] of a TOML file: put it first.
    target.write_text(line + (target.read_text() if target.exists() else ""))
    click.echo(f"  CRL and CA URLs: {url}/crl/ca.crl, {url}/ca.crt (http_url in {target})")
    if fell_back:
        click.echo(f"WARNING: this machine's name ({socket.getfqdn()!r}) is not a fully qualified public DNS name, "
                   f"so certificates will name {url} for their CRL and CA certificate, a stand-in that relying "
                   f"parties cannot reach. Before issuing certificates, set http_url in {target} to the public "
                   "name of this server's plain-HTTP port (or delete that line and run `autoenroll init "
                   "--http-host NAME` again).", err=True)


def _init_database(settings: Settings) -> list[str]:
    """The database with private modes, the server secrets beside it (created if missing), and what an
    older database still held of them moved out (store/upgrade.py)."""
    from .authorities.pki_files import create_server_keys, read_server_keys
    from .core.files import write_file
    from .store.db import Database, migrate, sqlite_files
    from .store.keys import KEY_FILES
    from .core.errors import ConfigError
    from .store.upgrade import KEYED_WITHOUT_KEY, adopt_server_keys, keyed_log

    files = sqlite_files(settings.db_url)
    if files and not files[0].exists():
        write_file(files[0], b"", mode=0o600)  # empty and private before SQLite opens it; -wal, -shm follow
    for path in files:
        make_private(path)
    migrate(settings.db_url)
    if not settings.path(KEY_FILES["audit"]).exists():
        db = Database(settings.db_url)
        try:
            if keyed_log(db):
                raise ConfigError(KEYED_WITHOUT_KEY)
        finally:
            db.dispose()
    create_server_keys(settings.data_dir)
    db = Database(settings.db_url, keys=read_server_keys(settings.data_dir, tuple(KEY_FILES)))
    try:
        return adopt_server_keys(db)
    finally:
        db.dispose()


def make_private(path: Path) -> bool:
    from .authorities.pki_files import make_private as take_away_others
    return take_away_others(path)


@main.command("client-cert")
@click.argument("name")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for NAME.pem and NAME.key (default: the data directory).")
@click.option("--days", type=click.IntRange(1, 825), default=825, show_default=True)
@click.pass_context
def client_cert(ctx, name: str, out_dir: Path | None, days: int) -> None:
    """Issue a TLS client certificate from the TLS CA: a new user server (agent), or the RA's
    certificate for a split deployment. NAME goes into the CN and the DNS SAN, the allow-list name."""
    from .authorities.certs import build_tls_certificate
    from .authorities.keys import generate_private_key
    from .authorities.pki_files import (PkiPaths, read_cert, read_private_key, write_cert,
                                        write_unencrypted_private_key)
    from .core.model import KeyType
    settings = _settings(ctx)
    paths = PkiPaths.in_dir(settings.data_dir)
    if not paths.tls_ca_key.exists():
        raise click.ClickException(f"no TLS CA key in {settings.data_dir}: issue client certificates where "
                                   "`autoenroll init` ran (tls-ca.key stays on that host)")
    out = out_dir or settings.data_dir
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    try:
        ca_key = read_private_key(paths.tls_ca_key, settings.passphrase())
        key = generate_private_key(KeyType.EC_P256)
        cert = build_tls_certificate(read_cert(paths.tls_ca_cert), ca_key, key.public_key(), dns_names=[name],
                                     common_name=name, client=True, server=False,
                                     now=datetime.now(timezone.utc), days=days)
        write_unencrypted_private_key(key_path, key)
        write_cert(cert_path, cert)
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    except ValueError as exc:
        raise click.ClickException(f"cannot issue a certificate for {name!r}: {exc}") from exc
    click.echo(f"{cert_path}\n{key_path} (mode 0600)")
    click.echo(f"allow it with agents_allowed (agents) or authority_clients (the RA): {name}", err=True)


@main.command("revoke-agent")
@click.argument("cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--reason", default="keyCompromise", show_default=True, help="Recorded with the revocation.")
@click.pass_context
def revoke_agent(ctx, cert_file: Path, reason: str) -> None:
    """Refuse a user server's (or the RA's) TLS client certificate from now on: in every worker, on its
    next request, on a kept-alive connection too. Other certificates for the same name keep working."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from .auth.agent import thumbprint
    from .store.db import Database, migrate
    from .store.repos import revoke_agent as record
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except ValueError as exc:
        raise click.ClickException(f"{cert_file} is not a PEM certificate") from exc
    from .authorities.pki_files import read_server_keys
    settings = _settings(ctx)
    migrate(settings.db_url)
    try:
        db = Database(settings.db_url, keys=read_server_keys(settings.data_dir, ("audit",)))
    except AutoenrollError as exc:
        raise click.ClickException(exc.detail) from exc
    subject, serial = cert.subject.rfc4514_string(), format(cert.serial_number, "x")
    try:
        added = record(db, thumbprint=thumbprint(cert.public_bytes(Encoding.DER)), subject=subject,
                       serial=serial, reason=reason, actor=_operator())
    finally:
        db.dispose()
    click.echo(f"{'revoked' if added else 'already revoked'}: {subject} (serial {serial})")


@main.command()
@click.pass_context
def serve(ctx) -> None:
    """Run the registration server under gunicorn (TLS, optional client certificates)."""
    from .web.server import run
    run(_settings(ctx))


@main.command()
@click.argument("email")
@click.option("--hours", type=int, help="Validity of the code (default: enrollment_code_ttl_hours).")
@click.pass_context
def invite(ctx, email: str, hours: int | None) -> None:
    """Print a one-time enrollment code for EMAIL's first signature certificate."""
    from .store import audit
    from .store.repos import create_enrollment_code
    services = _services(ctx)
    ttl = timedelta(hours=hours or services.settings.enrollment_code_ttl_hours)
    if services.ra is None:
        raise click.ClickException(f"invite runs where the registration authority runs (role all or ra), "
                                   f"not role {services.role}")
    profile = services.settings.profiles[services.settings.bootstrap_profile]
    user = services.ra.check_entitlement(email, profile)  # the rule bootstrap applies again when the code is used
    code_id, printed = create_enrollment_code(services.db, user.email, ttl, created_by=_operator())
    services.db.run(lambda s: audit.append(s, event="invite.created", outcome="done", actor=_operator(),
                                           subject=user.email, detail={"code_id": code_id, "ttl_hours": ttl / timedelta(hours=1)}))
    click.echo(printed)
    click.echo(f"one-time code for {user.email}, valid for {ttl / timedelta(hours=1):g} hours; "
               "give it to the user's agent:", err=True)
    click.echo(f"  autoenroll-agent bootstrap --email {user.email} --code {printed}", err=True)


OPERATOR_TOML = """# written by the first `autoenroll init` from what it was given (AUTOENROLL_* variables); commands run
# without --config read it. Edit it to move a port; the agents' {agent} names the HTTPS URL too.
data_dir = "."
public_url = {public_url}
bind = {bind}
{http_url_line}http_bind = {http_bind}

[ldap]
url = {ldap_url}
"""


def _record_configuration(settings: Settings) -> None:
    """Keep the LDAP URL and ports `init` ran with, so that a second terminal's commands use them too."""
    if DEFAULT_CONFIG.exists():
        return
    values = dict(public_url=settings.public_url, bind=settings.bind, http_bind=settings.http_bind,
                  ldap_url=settings.ldap.url)
    # An http_url not configured yet is chosen and written first in this file by _record_http_url.
    http_url_line = f"http_url = {json.dumps(settings.http_url)}\n" if settings.http_url else ""
    DEFAULT_CONFIG.write_text(OPERATOR_TOML.format(  # JSON strings are TOML basic strings
        agent=settings.path("agent.toml"), http_url_line=http_url_line,
        **{k: json.dumps(v) for k, v in values.items()}))
    click.echo(f"  configuration:  {DEFAULT_CONFIG} (LDAP {settings.ldap.url}, HTTPS {settings.bind})")


@main.group()
def config() -> None:
    """The configuration in effect."""


@config.command("show")
@click.pass_context
def config_show(ctx) -> None:
    """Print the effective configuration (defaults < file < environment) as JSON, secrets masked;
    profiles as merged over the built-in ones, groups resolved to DNs."""
    from .settings import effective_configuration
    click.echo(json.dumps(effective_configuration(_settings(ctx)), indent=2, sort_keys=True))


def _operator() -> str:
    return f"operator:{os.environ.get('SUDO_USER') or os.environ.get('USER') or 'unknown'}"


@main.group()
def audit() -> None:
    """The audit log: a keyed hash chain, anchored by a checkpoint outside the database."""


@audit.command("verify")
@click.pass_context
def audit_verify(ctx) -> None:
    """Check that no audit row was changed or deleted."""
    from .authorities.pki_files import read_server_keys
    from .store import audit as audit_log
    from .store.db import Database
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


@main.group()
def sync() -> None:
    """Directory synchronisation."""


@sync.command("status")
@click.pass_context
def sync_status(ctx) -> None:
    """Outbox depth and oldest age, the last reconcile pass and the CRL."""
    from .cli_directory import directory_status
    from .store.db import Database
    click.echo(json.dumps(directory_status(Database(_settings(ctx).db_url)), indent=2, default=str))


@sync.command("drain")
@click.pass_context
def sync_drain(ctx) -> None:
    """Publish everything that is due now (the server's worker does this on its own)."""
    services = _services(ctx)
    done = services.publisher.drain(limit=100000)
    click.echo(f"published {done} outbox rows")


@main.command()
@click.argument("serial")
@click.option("--reason", default="unspecified", show_default=True,
              type=click.Choice(["unspecified", "keyCompromise", "affiliationChanged", "superseded",
                                 "cessationOfOperation", "privilegeWithdrawn"]))
@click.pass_context
def revoke(ctx, serial: str, reason: str) -> None:
    """Revoke a certificate by serial (hex); the CRL is regenerated and the directory updated."""
    from cryptography import x509
    services = _services(ctx)
    changed = services.ca.revoke(serial.lower().removeprefix("0x"), x509.ReasonFlags(reason), actor=_operator())
    services.publisher.drain()
    click.echo(f"revoked {serial} ({reason})" if changed else f"{serial} was already revoked")


from .cli_directory import register as _register_directory_commands  # noqa: E402

_register_directory_commands(main, sync)
