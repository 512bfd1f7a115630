"""One frozen settings object: built-in defaults < TOML file < AUTOENROLL_* environment.

It is passed in (create_app(settings), cli commands), never imported as a global.
Environment variables name a key with `__` between table and key, for example
AUTOENROLL_DATABASE_URL or AUTOENROLL_LDAP__URL.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from directory_sync.config import LdapSettings

from .core.errors import ConfigError
from .core.model import Profile
from .core.profiles import parse_profiles

DEFAULT_PROFILES = {
    "smime-encryption": {
        "usage": "encryption", "key_type": "rsa-3072", "validity_days": 365,
        "groups": ["cn=smime-users,ou=groups,dc=example,dc=org"],
    },
    "smime-encryption-ec": {
        "usage": "encryption", "key_type": "ec-p256", "validity_days": 365,
        "groups": ["cn=smime-users,ou=groups,dc=example,dc=org"],
    },
    "smime-signature": {
        "usage": "signature", "key_type": "ec-p256", "key_source": "either", "validity_days": 365,
        "groups": ["cn=smime-users,ou=groups,dc=example,dc=org"],
    },
}


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite file in data_dir
    public_url: str = "https://localhost:8443"  # how agents reach us (mTLS)
    http_url: str = "http://localhost:8080"  # plain HTTP for the CRL and CA certificate (S/MIME BR)
    bind: str = "127.0.0.1:8443"
    http_bind: str = "127.0.0.1:8080"  # plain HTTP: /crl/ca.crl, /ca.crt, /health only; empty = off
    workers: int = 2
    threads: int = 4
    ca_passphrase: str = ""  # empty: read data_dir/passphrase
    agents_allowed: frozenset[str] = frozenset({"*"})
    agent_scopes: frozenset[str] = frozenset()  # "agent-name=mail-domain": limit an agent to a domain
    trusted_proxies: frozenset[str] = frozenset()  # addresses allowed to forward client certs
    bootstrap_profile: str = "smime-signature"
    pkcs12_iterations: int = 2048  # authorities/pkcs12.DEFAULT_ITERATIONS: the MAC's count; more buys nothing
    key_pool_size: int = 4
    nonce_ttl_seconds: int = 300
    enrollment_code_ttl_hours: int = 72
    max_body_bytes: int = 64 * 1024
    publish_timeout_seconds: float = 2.0
    outbox_interval_seconds: float = 2.0
    crl_validity_hours: int = 24
    recovery_officers_group: str = "cn=recovery-officers,ou=groups,dc=example,dc=org"
    recovery_quorum: int = 2
    recovery_request_ttl_hours: int = 48
    # Split deployment (README "Split deployment"): which authorities this process is.
    role: str = "all"  # all (the server platform) | ra | ca | kra
    ca_url: str = ""  # role ra: the CA service, e.g. https://ca.internal:9443
    kra_url: str = ""  # role ra: the KRA service
    authority_clients: frozenset[str] = frozenset()  # roles ca, kra: RA client certificate names (CN/SAN/subject)
    authority_client_cert: str = "ra-client.pem"  # role ra: its TLS client certificate (clientAuth, TLS CA)
    authority_client_key: str = "ra-client.key"
    authority_timeout_seconds: float = 10.0
    ldap: LdapSettings = field(default_factory=LdapSettings)
    profiles: Mapping[str, Profile] = field(default_factory=lambda: parse_profiles(DEFAULT_PROFILES))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'autoenroll.db').resolve()}"

    @property
    def crl_url(self) -> str:
        return self.http_url.rstrip("/") + "/crl/ca.crl"

    @property
    def ca_issuers_url(self) -> str:
        return self.http_url.rstrip("/") + "/ca.crt"

    def path(self, name: str) -> Path:
        return self.data_dir / name

    def passphrase(self) -> bytes:
        if self.ca_passphrase:
            return self.ca_passphrase.encode()
        try:
            return self.path("passphrase").read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA passphrase file: {exc.strerror}") from exc


def _coerce(value: object, current: object, name: str) -> object:
    if isinstance(current, bool):
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if isinstance(current, int):
        return int(value)  # type: ignore[arg-type]
    if isinstance(current, float):
        return float(value)  # type: ignore[arg-type]
    if isinstance(current, Path):
        return Path(str(value))
    if isinstance(current, frozenset):
        items = value.split(",") if isinstance(value, str) else value
        return frozenset(str(i).strip() for i in items if str(i).strip())  # type: ignore[union-attr]
    if isinstance(current, str):
        return str(value)
    raise ConfigError(f"setting {name} cannot be set this way")


def _apply(obj, values: Mapping[str, object], prefix: str, env: bool = False):
    known = {f.name: f for f in dataclasses.fields(obj)}
    changes = {}
    for key, value in values.items():
        label = f"{prefix}{key.upper() if env else key}"
        if key not in known:
            raise ConfigError(f"unknown setting {label}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting {label} must be a table")
            changes[key] = _apply(current, value, label + ("__" if env else "."), env)
        else:
            try:
                changes[key] = _coerce(value, current, label)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"setting {label}: {exc}") from exc
    return dataclasses.replace(obj, **changes)


def _env_tree(environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    for name, value in environ.items():
        if not name.startswith("AUTOENROLL_") or name in {"AUTOENROLL_CONFIG"}:
            continue
        parts = name[len("AUTOENROLL_"):].lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    settings = Settings()
    config = config or (Path(environ["AUTOENROLL_CONFIG"]) if environ.get("AUTOENROLL_CONFIG") else None)
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {config}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config}: {exc}") from exc
        profiles = data.pop("profiles", None)
        settings = _apply(settings, data, "")
        if profiles is not None:
            settings = dataclasses.replace(settings, profiles=parse_profiles(profiles))
        if "data_dir" in data and not Path(data["data_dir"]).is_absolute():
            settings = dataclasses.replace(settings, data_dir=(config.parent / data["data_dir"]).resolve())
    env = _env_tree(environ)
    env.pop("profiles", None)
    return _apply(settings, env, "AUTOENROLL_", env=True)
