"""`autoenroll init` and `autoenroll client-cert`: the data folder, its PKI, secrets and database."""

from __future__ import annotations

import dataclasses
import functools
import json
import secrets
import socket
from datetime import datetime, timezone
from pathlib import Path

import click

from ..core.errors import AutoenrollError
from ..settings import Settings
from .root import DEFAULT_CONFIG, _settings, main


AGENT_TOML = """# autoenroll-agent configuration, written by `autoenroll init`
server = "{server}"
cert = "agent.pem"
key = "agent.key"
server_ca = "tls-ca.pem"
store = "agent-store"
"""


_KEY_CHOICE = click.Choice(["ca", "tls_ca", "kra"])


def key_store_options(command):
    """`--key-store pkcs11 --module PATH --token LABEL --pin-file FILE [--file-key NAME ...]` for init."""
    @click.option("--key-store", "key_store", type=click.Choice(["files", "pkcs11"]), default=None,
                  help="Where the CA, TLS CA and KRA keys are generated (default: [key_store] of the "
                       "configuration, else files).")
    @click.option("--module", default=None, help="The PKCS#11 module (with --key-store pkcs11).")
    @click.option("--token", default=None, help="The label of the token (with --key-store pkcs11).")
    @click.option("--pin-file", default=None, help="The file holding the token's user PIN, mode 0600.")
    @click.option("--file-key", "file_keys", multiple=True, type=_KEY_CHOICE,
                  help="With --key-store pkcs11: keep this key in a file all the same (repeatable).")
    @functools.wraps(command)
    def wrapper(*args, key_store, module, token, pin_file, file_keys, **kwargs):
        choice = dict(key_store=key_store, module=module, token=token, pin_file=pin_file, file_keys=file_keys)
        return command(*args, key_store_choice=choice, **kwargs)
    return wrapper


def apply_key_store_choice(settings: Settings, choice: dict) -> tuple[Settings, str | None]:
    """The settings with init's key-store options over the configuration's [key_store], and the TOML
    table to record (None when the options change nothing)."""
    current = settings.key_store
    if choice["key_store"] is None:
        if any(choice[k] for k in ("module", "token", "pin_file", "file_keys")):
            raise click.UsageError("--module, --token, --pin-file and --file-key go with --key-store pkcs11")
        return settings, None
    if choice["key_store"] == "files":
        return dataclasses.replace(settings, key_store=dataclasses.replace(current, in_token=frozenset())), None
    wanted = dataclasses.replace(
        current, in_token=frozenset({"ca", "tls_ca", "kra"} - set(choice["file_keys"])),
        module=choice["module"] or current.module, token=choice["token"] or current.token,
        pin_file=choice["pin_file"] or current.pin_file)
    if not wanted.module or not wanted.token:
        raise click.UsageError("--key-store pkcs11 needs --module and --token (or key_store.module and .token)")
    if wanted == current:
        return settings, None
    table = ("\n[key_store]  # autoenroll init --key-store pkcs11 (README, Keys in an HSM)\n"
             f"in_token = {json.dumps(sorted(wanted.in_token))}\nmodule = {json.dumps(wanted.module)}\n"
             f"token = {json.dumps(wanted.token)}\npin_file = {json.dumps(wanted.pin_file)}\n")
    return dataclasses.replace(settings, key_store=wanted), table


def token_of(settings: Settings):
    """The Token of `[key_store]`, or None when every key is in a file."""
    from ..authorities.pkcs11_store import Token
    ks = settings.key_store
    if not ks.in_token:
        return None
    return Token(ks.module, ks.token, settings.path(ks.pin_file))


def record_key_store(ctx, settings: Settings, table: str) -> None:
    """Append init's [key_store] table to the configuration (the --config file, else
    <data_dir>/autoenroll.toml), so that `serve` and every later command find the token."""
    from ..settings import GENERATED_CONFIG
    config_path = ctx.obj.get("config_path")
    target = config_path if config_path is not None and config_path.exists() else settings.path(GENERATED_CONFIG)
    text = target.read_text() if target.exists() else ""
    if "[key_store]" in text:
        click.echo(f"warning: {target} has a [key_store] table already; make it say what init did:{table}",
                   err=True)
        return
    target.write_text(text + table)
    click.echo(f"  keys in token {settings.key_store.token!r}: {', '.join(sorted(settings.key_store.in_token))} "
               f"([key_store] in {target})")


@main.command()
@click.option("--ca-key-type", type=click.Choice(["ec-p256", "rsa-3072"]), default="ec-p256", show_default=True)
@click.option("--ca-name", default="Autoenroll CA", show_default=True)
@click.option("--server-name", "server_names", multiple=True, default=("localhost", "127.0.0.1"), show_default=True)
@click.option("--agent-name", "agent_names", multiple=True, default=("agent.example.org",), show_default=True)
@click.option("--http-host", default=None,
              help="Public host name of the plain-HTTP CRL and CA certificate URLs written into every "
                   "certificate (default: this machine's fully qualified name); recorded as http_url.")
@key_store_options
@click.pass_context
def init(ctx, ca_key_type, ca_name, server_names, agent_names, http_host, key_store_choice) -> None:
    """Create the CA, the KRA storage key, TLS certificates, the server secrets, the database and the
    agent config; on an existing data folder, make it private and move secrets out of an older database.
    With --key-store pkcs11 the CA, TLS CA and KRA keys are generated in the token (README, Keys in an HSM)."""
    from ..authorities.pki_files import PkiPaths, create_pki, write_secret
    from ..core.model import KeyType

    settings, key_store_table = apply_key_store_choice(_settings(ctx), key_store_choice)
    data = settings.data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    if make_private(data):
        click.echo(f"  made {data} private (mode 700)", err=True)
    existed = PkiPaths.in_dir(data).ca_cert.exists()
    if not settings.ca_passphrase and not settings.path("passphrase").exists():
        write_secret(settings.path("passphrase"), secrets.token_urlsafe(32).encode())
    try:
        create_pki(data, ca_key_type=KeyType(ca_key_type), ca_name=ca_name, server_names=server_names,
                   agent_names=agent_names, passphrase=settings.passphrase(), now=datetime.now(timezone.utc),
                   token=token_of(settings), in_token=settings.key_store.in_token)
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
    if key_store_table:
        record_key_store(ctx, settings, key_store_table)


def _record_http_url(ctx, settings: Settings, http_host: str | None) -> None:
    """Write the CRL/AIA base URL into the server's configuration (the file given with --config, else
    <data_dir>/autoenroll.toml) unless one is configured already; say loudly when it is a stand-in."""
    from ..settings import GENERATED_CONFIG, default_http_url
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
    from ..authorities.pki_files import create_server_keys, read_server_keys
    from ..core.files import write_file
    from ..store.db import Database, migrate, sqlite_files
    from ..store.keys import KEY_FILES
    from ..core.errors import ConfigError
    from ..store.upgrade import KEYED_WITHOUT_KEY, adopt_server_keys, keyed_log

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
    from ..authorities.pki_files import make_private as take_away_others
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
    from ..authorities.certs import build_tls_certificate
    from ..authorities.keys import generate_private_key
    from ..authorities.pki_files import PkiPaths, read_cert, write_cert, write_unencrypted_private_key
    from ..core.model import KeyType
    from ..wiring import key_store
    settings = _settings(ctx)
    paths = PkiPaths.in_dir(settings.data_dir)
    if not paths.tls_ca_key.exists() and "tls_ca" not in settings.key_store.in_token:
        raise click.ClickException(f"no TLS CA key in {settings.data_dir}: issue client certificates where "
                                   "`autoenroll init` ran (tls-ca.key stays on that host)")
    out = out_dir or settings.data_dir
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_path, key_path = out / f"{name}.pem", out / f"{name}.key"
    try:
        ca_key = key_store(settings).tls_ca_signing_key()  # a file, or the token
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
