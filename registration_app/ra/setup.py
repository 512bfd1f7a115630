"""A server's data folder: `autoenroll init` (the CA, TLS CA and KRA keys in files or a token, the TLS
certificates, the server secrets, the database, the agent's and the operator's configuration) and
`autoenroll client-cert` (a TLS client certificate from the TLS CA). The commands
(registration_app/cli/init.py) parse options, call these and print what they return; every refusal is an
AutoenrollError."""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..core.errors import BadRequest, ConfigError
from ..core.ports import KeyStore
from ..settings import DEFAULT_CONFIG, GENERATED_CONFIG, Settings, default_http_url

KEY_NAMES = ("ca", "tls_ca", "kra")

AGENT_TOML = """# autoenroll-agent configuration, written by `autoenroll init`
server = "{server}"
cert = "agent.pem"
key = "agent.key"
server_ca = "tls-ca.pem"
store = "agent-store"
"""

OPERATOR_TOML = """# written by the first `autoenroll init` from what it was given (AUTOENROLL_* variables); commands run
# without --config read it. Edit it to move a port; the agents' {agent} names the HTTPS URL too.
data_dir = "."
public_url = {public_url}
bind = {bind}
{http_url_line}http_bind = {http_bind}

[ldap]
url = {ldap_url}
"""


class OptionConflict(ConfigError):
    """Options of one command that do not go together (the command line shows its usage with it)."""


@dataclass(frozen=True)
class KeyStoreChoice:
    """init's `--key-store files|pkcs11 --module --token --pin-file --file-key ...` (None: not given)."""

    key_store: str | None = None
    module: str | None = None
    token: str | None = None
    pin_file: str | None = None
    file_keys: tuple[str, ...] = ()


def choose_key_store(settings: Settings, choice: KeyStoreChoice) -> tuple[Settings, str | None]:
    """The settings with init's key-store options over the configuration's [key_store], and the TOML
    table to record (None when the options change nothing). OptionConflict when they do not fit."""
    current = settings.key_store
    if choice.key_store is None:
        if choice.module or choice.token or choice.pin_file or choice.file_keys:
            raise OptionConflict("--module, --token, --pin-file and --file-key go with --key-store pkcs11")
        return settings, None
    if choice.key_store == "files":
        return dataclasses.replace(settings, key_store=dataclasses.replace(current, in_token=frozenset())), None
    wanted = dataclasses.replace(
        current, in_token=frozenset(set(KEY_NAMES) - set(choice.file_keys)),
        module=choice.module or current.module, token=choice.token or current.token,
        pin_file=choice.pin_file or current.pin_file)
    if not wanted.module or not wanted.token:
        raise OptionConflict("--key-store pkcs11 needs --module and --token (or key_store.module and .token)")
    if wanted == current:
        return settings, None
    table = ("\n[key_store]  # autoenroll init --key-store pkcs11 (README, Keys in an HSM)\n"
             f"in_token = {json.dumps(sorted(wanted.in_token))}\nmodule = {json.dumps(wanted.module)}\n"
             f"token = {json.dumps(wanted.token)}\npin_file = {json.dumps(wanted.pin_file)}\n")
    return dataclasses.replace(settings, key_store=wanted), table


@dataclass(frozen=True)
class HttpUrl:
    """The CRL and caIssuers URLs written into every certificate, and what init did about them."""

    crl_url: str
    ca_issuers_url: str
    config: Path  # the configuration file init records in (the --config file, else the data folder's)
    written: bool  # False: http_url was configured already, and kept
    ignored_host: str | None = None  # --http-host given although http_url is configured
    stand_in: bool = False  # this machine's name is not a public DNS name: FALLBACK_HTTP_HOST was used
    machine_name: str = ""


@dataclass(frozen=True)
class KeyStoreRecord:
    """init's [key_store] table: appended to `target`, or not (`written` False: one is there already)."""

    target: Path
    table: str
    written: bool
    token: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Initialised:
    data_dir: Path
    existed: bool  # the CA was there already: nothing of the PKI was touched
    made_private: bool  # the data folder was open to others, and no longer is
    ca_cert: Path
    agent_config: Path
    upgraded: list[str]  # what an older database still held of the server secrets, moved out
    operator_config: Path | None  # DEFAULT_CONFIG, when this init wrote it
    http: HttpUrl
    key_store: KeyStoreRecord | None


def initialise(settings: Settings, *, ca_key_type: str, ca_name: str, server_names: tuple[str, ...],
               agent_names: tuple[str, ...], http_host: str | None, key_store_table: str | None,
               config_path: Path | None) -> Initialised:
    """Create the CA, the KRA storage key, TLS certificates, the server secrets, the database and the
    agent config; on an existing data folder, make it private and move secrets out of an older database.
    `settings` as choose_key_store made them; `config_path` the --config file (None: none given)."""
    from ..authorities.pki_files import PkiPaths, create_pki, make_private, write_secret
    from ..core.model import KeyType

    data = settings.data_dir
    data.mkdir(mode=0o700, parents=True, exist_ok=True)
    made_private = make_private(data)
    paths = PkiPaths.in_dir(data)
    existed = paths.ca_cert.exists()
    if not settings.ca_passphrase and not settings.path("passphrase").exists():
        write_secret(settings.path("passphrase"), secrets.token_urlsafe(32).encode())
    create_pki(data, ca_key_type=KeyType(ca_key_type), ca_name=ca_name, server_names=server_names,
               agent_names=agent_names, passphrase=settings.passphrase(), now=datetime.now(timezone.utc),
               token=token_of(settings), in_token=settings.key_store.in_token)
    upgraded = _init_database(settings)
    agent_toml = settings.path("agent.toml")
    if not agent_toml.exists():
        agent_toml.write_text(AGENT_TOML.format(server=settings.public_url))
    operator_config = None
    if config_path is None and settings.data_dir == DEFAULT_CONFIG.parent:
        operator_config = _record_configuration(settings)
    target = config_path if config_path is not None and config_path.exists() else settings.path(GENERATED_CONFIG)
    http = _record_http_url(settings, http_host, target)
    key_store = _record_key_store(settings, key_store_table, target) if key_store_table else None
    return Initialised(data_dir=data, existed=existed, made_private=made_private, ca_cert=paths.ca_cert,
                       agent_config=agent_toml, upgraded=upgraded, operator_config=operator_config, http=http,
                       key_store=key_store)


def token_of(settings: Settings):
    """The Token of `[key_store]`, or None when every key is in a file."""
    from ..authorities.pkcs11_store import Token
    ks = settings.key_store
    if not ks.in_token:
        return None
    return Token(ks.module, ks.token, settings.path(ks.pin_file))


def _record_key_store(settings: Settings, table: str, target: Path) -> KeyStoreRecord:
    """Append init's [key_store] table to the configuration (the --config file, else
    <data_dir>/autoenroll.toml), so that `serve` and every later command find the token."""
    text = target.read_text() if target.exists() else ""
    written = "[key_store]" not in text
    if written:
        target.write_text(text + table)
    return KeyStoreRecord(target=target, table=table, written=written, token=settings.key_store.token,
                          keys=tuple(sorted(settings.key_store.in_token)))


def _record_http_url(settings: Settings, http_host: str | None, target: Path) -> HttpUrl:
    """Write the CRL/AIA base URL into the server's configuration (`target`) unless one is configured
    already."""
    if settings.http_url:
        ignored = http_host if http_host and http_host not in settings.http_url else None
        return HttpUrl(crl_url=settings.crl_url, ca_issuers_url=settings.ca_issuers_url, config=target,
                       written=False, ignored_host=ignored)
    url, fell_back = default_http_url(settings.http_bind, http_host)
    line = f'http_url = "{url}"  # CRL and caIssuers URLs in every certificate (autoenroll init --http-host)\n'
    # Top-level keys must come before the first [table] of a TOML file: put it first.
    target.write_text(line + (target.read_text() if target.exists() else ""))
    return HttpUrl(crl_url=f"{url}/crl/ca.crl", ca_issuers_url=f"{url}/ca.crt", config=target, written=True,
                   stand_in=fell_back, machine_name=socket.getfqdn() if fell_back else "")


def _record_configuration(settings: Settings) -> Path | None:
    """Keep the LDAP URL and ports `init` ran with, so that a second terminal's commands use them too."""
    if DEFAULT_CONFIG.exists():
        return None
    values = dict(public_url=settings.public_url, bind=settings.bind, http_bind=settings.http_bind,
                  ldap_url=settings.ldap.url)
    # An http_url not configured yet is chosen and written first in this file by _record_http_url.
    http_url_line = f"http_url = {json.dumps(settings.http_url)}\n" if settings.http_url else ""
    DEFAULT_CONFIG.write_text(OPERATOR_TOML.format(  # JSON strings are TOML basic strings
        agent=settings.path("agent.toml"), http_url_line=http_url_line,
        **{k: json.dumps(v) for k, v in values.items()}))
    return DEFAULT_CONFIG


def _init_database(settings: Settings) -> list[str]:
    """The database with private modes, the server secrets beside it (created if missing), and what an
    older database still held of them moved out (store/upgrade.py)."""
    from ..authorities.pki_files import create_server_keys, make_private, read_server_keys
    from ..core.files import write_file
    from ..store.db import Database, migrate, sqlite_files
    from ..store.keys import KEY_FILES
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


@dataclass(frozen=True)
class ClientCertificate:
    cert: Path
    key: Path  # mode 0600


def issue_client_certificate(settings: Settings, keys: KeyStore, name: str, *, out_dir: Path | None,
                             days: int) -> ClientCertificate:
    """A TLS client certificate from the TLS CA of `keys` (a file key, or the token's): a new user server
    (agent), or the RA's certificate for a split deployment. `name` goes into the CN and the DNS SAN."""
    from ..authorities.certs import build_tls_certificate
    from ..authorities.keys import generate_private_key
    from ..authorities.pki_files import PkiPaths, read_cert, write_cert, write_unencrypted_private_key
    from ..core.model import KeyType
    paths = PkiPaths.in_dir(settings.data_dir)
    if not paths.tls_ca_key.exists() and "tls_ca" not in settings.key_store.in_token:
        raise ConfigError(f"no TLS CA key in {settings.data_dir}: issue client certificates where "
                          "`autoenroll init` ran (tls-ca.key stays on that host)")
    out = out_dir or settings.data_dir
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    issued = ClientCertificate(cert=out / f"{name}.pem", key=out / f"{name}.key")
    try:
        ca_key = keys.tls_ca_signing_key()  # a file, or the token
        key = generate_private_key(KeyType.EC_P256)
        cert = build_tls_certificate(read_cert(paths.tls_ca_cert), ca_key, key.public_key(), dns_names=[name],
                                     common_name=name, client=True, server=False,
                                     now=datetime.now(timezone.utc), days=days)
    except ValueError as exc:
        raise BadRequest(f"cannot issue a certificate for {name!r}: {exc}") from exc
    write_unencrypted_private_key(issued.key, key)
    write_cert(issued.cert, cert)
    return issued
