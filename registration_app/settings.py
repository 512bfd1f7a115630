"""One frozen settings object: built-in defaults < TOML file < AUTOENROLL_* environment.

It is passed in (create_app(settings), cli commands), never imported as a global.
Environment variables name a key with `__` between table and key, for example
AUTOENROLL_DATABASE_URL or AUTOENROLL_LDAP__URL.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from directory_sync.config import LdapSettings

from .core.dn import InvalidDn, group_dn, normalise_dn
from .core.entitlement import resolve_profile_groups
from .core.errors import ConfigError
from .core.model import Profile, Usage
from .core.profiles import merge_profile_tables, parse_profiles

# The built-in profiles. A configuration file's [profiles.NAME] tables are merged over them key by key
# (core/profiles.merge_profile_tables); `enabled = false` removes one. The recovery officers hold
# signature certificates (they sign approvals), so their group is entitled to the signature profile.
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
        "groups": ["cn=smime-users,ou=groups,dc=example,dc=org", "cn=recovery-officers,ou=groups,dc=example,dc=org"],
    },
}


@dataclass(frozen=True)
class AnchorSettings:
    """One `[trust.anchors.<name>]` table: a trust anchor other than our CA (README "Other trust anchors")."""

    name: str
    file: str = ""  # a PEM file (in data_dir unless absolute) with the anchor's CA certificate(s)
    subject: str = ""  # or: the subject (RFC 4514) of a certificate in user-trust.pem
    domains: frozenset[str] = frozenset()  # mail domains it may vouch for; empty: any
    revocation: str = "crl"  # "crl" (fail closed) | "none" (insecure: never checked)
    max_crl_age_seconds: int = 3600  # a cached CRL is fetched again after this, or at its nextUpdate
    match_attribute: str = "userCertificate"  # the entry attribute that must list the certificate


@dataclass(frozen=True)
class TrustSettings:
    """`[trust]`: certificates of user-trust.pem that no anchor table names get `AnchorSettings` defaults."""

    anchors: tuple[AnchorSettings, ...] = ()
    crl_timeout_seconds: float = 5.0


@dataclass(frozen=True)
class KeyStoreSettings:
    """Where the CA, TLS CA and KRA private keys are (README, Keys in an HSM): the keys named in
    `in_token` ("ca", "tls_ca", "kra") in the PKCS#11 token labelled `token`, the others in encrypted PEM
    files of the data folder (the default: every key in a file)."""

    in_token: frozenset[str] = frozenset()
    module: str = ""  # the PKCS#11 module, e.g. /usr/lib/softhsm/libsofthsm2.so
    token: str = ""  # the token's label (one token, or slot, per service in a split deployment)
    pin_file: str = "token.pin"  # the user PIN, mode 0600; relative to data_dir


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite file in data_dir
    public_url: str = "https://localhost:8443"  # how agents reach us (mTLS)
    # Plain-HTTP base of the CRL and CA certificate URLs written into every certificate (S/MIME BR: a
    # public host name). `autoenroll init` writes it (see default_http_url); empty: computed as init would.
    http_url: str = ""
    bind: str = "127.0.0.1:8443"
    http_bind: str = "127.0.0.1:8080"  # plain HTTP: /crl/ca.crl, /ca.crt, /health only; empty = off
    workers: int = 2
    threads: int = 4
    ca_passphrase: str = ""  # empty: read data_dir/passphrase
    agents_allowed: frozenset[str] = frozenset({"*"})
    agent_scopes: frozenset[str] = frozenset()  # "agent-name=mail-domain": limit an agent to a domain
    trusted_proxies: frozenset[str] = frozenset()  # addresses allowed to forward client certs
    bootstrap_profile: str = "smime-signature"  # what an invite entitles to: the first signature certificate
    # What `autoenroll-agent enroll` without --profile and `autoenroll provision` issue. A user holds at
    # most one current encryption certificate across the encryption profiles without `coexist = true`.
    default_encryption_profile: str = "smime-encryption"
    pkcs12_iterations: int = 2048  # authorities/pkcs12.DEFAULT_ITERATIONS: the MAC's count; more buys nothing
    key_pool_size: int = 4
    nonce_ttl_seconds: int = 300
    # A renewed (superseded) signature certificate still authenticates this long after its successor was
    # issued: the agent's retry after a lost answer (the daemon's next pass) gets the certificate issued.
    superseded_grace_seconds: int = 600
    enrollment_code_ttl_hours: int = 72
    # Wrong enrollment-code MACs (README, Enrollment codes): a code burns at enrollment_code_max_failures, and
    # any code id with that many, or an agent with bootstrap_failures_per_agent, in the window gets 429.
    enrollment_code_max_failures: int = 5
    bootstrap_failures_per_agent: int = 20
    bootstrap_failure_window_seconds: int = 900
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
    # Role kra (or all): a pending escrow whose certificate the CA has not recorded is voided by the sweep
    # after this long; it must exceed the RA's authority_timeout_seconds (README "Split deployment").
    escrow_pending_grace_seconds: float = 600.0
    ldap: LdapSettings = field(default_factory=LdapSettings)
    # More directories that get the same certificates (`[targets.NAME]`, each an [ldap]-shaped table with
    # its own attribute map); users and groups are read from [ldap] only. directory_sync/targets.py.
    targets: Mapping[str, LdapSettings] = field(default_factory=dict)
    trust: TrustSettings = field(default_factory=TrustSettings)
    key_store: KeyStoreSettings = field(default_factory=KeyStoreSettings)
    profiles: Mapping[str, Profile] = field(default_factory=lambda: parse_profiles(DEFAULT_PROFILES))

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'autoenroll.db').resolve()}"

    @property
    def crl_url(self) -> str:
        return self.http_base + "/crl/ca.crl"

    @property
    def ca_issuers_url(self) -> str:
        return self.http_base + "/ca.crt"

    @property
    def http_base(self) -> str:
        return (self.http_url or default_http_url(self.http_bind)[0]).rstrip("/")

    def path(self, name: str) -> Path:
        return self.data_dir / name

    def passphrase(self) -> bytes:
        if self.ca_passphrase:
            return self.ca_passphrase.encode()
        try:
            return self.path("passphrase").read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA passphrase file: {exc.strerror}") from exc


# Name suffixes that are not public DNS names (RFC 6761, 6762, 8375 and habit): a certificate naming one
# in its CRL distribution point or AIA fails the S/MIME BR lint (pkilint: internal_domain_name).
_INTERNAL_SUFFIXES = (".localhost", ".localdomain", ".local", ".internal", ".lan", ".home", ".home.arpa",
                      ".test", ".example", ".invalid", ".intranet", ".corp")
FALLBACK_HTTP_HOST = "ca.example.org"
GENERATED_CONFIG = "autoenroll.toml"  # in data_dir: what `autoenroll init` chose, read when no file is named
# What the first `autoenroll init` without --config writes (the LDAP URL and ports it was given) and
# later commands without one read: the generated configuration of the default data folder.
DEFAULT_CONFIG = Settings.data_dir / GENERATED_CONFIG


def public_host_name(name: str) -> bool:
    """Whether `name` looks like a fully qualified public DNS name (not an address, not a local name)."""
    name = name.strip().rstrip(".").lower()
    labels = name.split(".")
    if len(labels) < 2 or not all(labels) or labels[-1].isdigit() or ":" in name:
        return False
    return not ("." + name).endswith(_INTERNAL_SUFFIXES)


@functools.cache
def _fqdn() -> str:
    return socket.getfqdn()  # may ask DNS: once per process


def default_http_url(http_bind: str, host: str | None = None) -> tuple[str, bool]:
    """(http_url, whether it fell back): `http://<host>:<port of http_bind>`, host defaulting to this
    machine's fully qualified name, or FALLBACK_HTTP_HOST when that is not a public DNS name."""
    port = http_bind.rsplit(":", 1)[-1] if ":" in http_bind else "8080"
    host = (host or _fqdn()).strip().rstrip(".")
    fell_back = not public_host_name(host)
    host = FALLBACK_HTTP_HOST if fell_back else host
    return (f"http://{host}" if port == "80" else f"http://{host}:{port}"), fell_back


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


# AUTOENROLL_* variables that are read elsewhere, not settings (the command lines read them).
NOT_SETTINGS = frozenset({"AUTOENROLL_CONFIG", "AUTOENROLL_AGENT_CONFIG", "AUTOENROLL_DEBUG", "AUTOENROLL_LOG_LEVEL"})


def _env_tree(environ: Mapping[str, str]) -> dict:
    tree: dict = {}
    for name, value in environ.items():
        if not name.startswith("AUTOENROLL_") or name in NOT_SETTINGS:
            continue
        parts = name[len("AUTOENROLL_"):].lower().split("__")
        node = tree
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree


def generated_config(environ: Mapping[str, str]) -> Path | None:
    """`<data_dir>/autoenroll.toml` (written by `autoenroll init`) if it exists: the file read when none is named."""
    path = Path(environ.get("AUTOENROLL_DATA_DIR") or Settings.data_dir) / GENERATED_CONFIG
    return path if path.is_file() else None


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    settings = Settings()
    env = _env_tree(environ)
    config = config or (Path(environ["AUTOENROLL_CONFIG"]) if environ.get("AUTOENROLL_CONFIG") else None) \
        or generated_config(environ)
    if config is not None:
        try:
            data = tomllib.loads(config.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"configuration file {config} does not exist") from exc
        except OSError as exc:
            raise ConfigError(f"cannot read {config}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{config}: {exc}") from exc
        file_profiles = data.pop("profiles", None)
        trust = data.pop("trust", None)
        file_targets = data.pop("targets", None)
        settings = _ldap_preset(settings, data, env)
        settings = _apply(settings, data, "")
        if trust is not None:
            settings = dataclasses.replace(settings, trust=parse_trust(trust))
        if file_profiles is not None and not isinstance(file_profiles, Mapping):
            raise ConfigError(f"{config}: profiles must be tables ([profiles.NAME])")
        if "data_dir" in data and not Path(data["data_dir"]).is_absolute():
            settings = dataclasses.replace(settings, data_dir=(config.parent / data["data_dir"]).resolve())
    else:
        file_profiles = file_targets = None
        settings = _ldap_preset(settings, {}, env)
    env_targets = env.pop("targets", None)
    if file_targets is not None or env_targets is not None:  # AUTOENROLL_TARGETS__<NAME>__<KEY> over the file's
        settings = dataclasses.replace(settings, targets=parse_targets(file_targets or {}, env_targets))
    env_profiles = env.pop("profiles", None)
    if file_profiles is not None or env_profiles is not None:
        tables = merge_profile_tables(DEFAULT_PROFILES, file_profiles or {})
        if env_profiles is not None:  # AUTOENROLL_PROFILES__<NAME>__<KEY>: merged over the file's tables
            tables = merge_profile_tables(tables, profile_tables_from_environment(env_profiles, tables))
        settings = dataclasses.replace(settings, profiles=parse_profiles(tables))
    trust_env = env.pop("trust", None)
    if trust_env is not None:  # AUTOENROLL_TRUST__ANCHORS__<NAME>__<KEY>: merged over the TOML tables
        settings = dataclasses.replace(settings, trust=parse_trust(_merge(_trust_table(settings.trust), trust_env)))
    return check_escrow_grace(resolve_groups(_apply(settings, env, "AUTOENROLL_", env=True)))


def check_escrow_grace(settings: Settings) -> Settings:
    """Refuse a pending-escrow grace not longer than the authority timeout: the sweep would void the escrow
    of a CA call still under way, whose certificate then has no recoverable key."""
    if settings.escrow_pending_grace_seconds <= settings.authority_timeout_seconds:
        raise ConfigError(f"setting escrow_pending_grace_seconds ({settings.escrow_pending_grace_seconds:g}) must be "
                          f"longer than authority_timeout_seconds ({settings.authority_timeout_seconds:g}), the RA's "
                          "longest CA call")
    return settings


_PROFILE_FLAGS = frozenset({"enabled", "keep_superseded", "coexist"})
_PROFILE_COUNTS = frozenset({"validity_days", "renew_window_days", "max_per_day"})
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def profile_tables_from_environment(env: object, tables: Mapping[str, Mapping]) -> dict[str, dict]:
    """`AUTOENROLL_PROFILES__<NAME>__<KEY>=value` variables as profile tables to merge over `tables`
    (the built-in and the file's). Variable names are case-insensitive and cannot hold `-`, so NAME
    matches a profile in effect ignoring case with `_` standing for `-` (SMIME_ENCRYPTION is
    smime-encryption); a NAME that matches none adds a profile of that name (lower case). The values
    are strings: true/false (1/0, yes/no, on/off) for enabled, keep_superseded and coexist; for groups,
    DNs or bare names separated by `;` (a DN holds commas)."""
    if not isinstance(env, Mapping):
        raise ConfigError("AUTOENROLL_PROFILES is not a setting: set AUTOENROLL_PROFILES__<NAME>__<KEY>")
    overrides: dict[str, dict] = {}
    for env_name, values in env.items():
        label = f"AUTOENROLL_PROFILES__{env_name.upper()}"
        if not isinstance(values, Mapping):
            raise ConfigError(f"{label} names no key of the profile: set {label}__<KEY> (for example "
                              f"{label}__VALIDITY_DAYS)")
        table = overrides.setdefault(_named_by(label, env_name, tables, "profiles"), {})
        for key, value in values.items():
            if isinstance(value, Mapping):
                raise ConfigError(f"unknown setting {label}__{key.upper()}__{'__'.join(k.upper() for k in value)}")
            table[key] = _profile_value(f"{label}__{key.upper()}", key, value)
    return overrides


def _profile_value(label: str, key: str, value: str) -> object:
    if key in _PROFILE_FLAGS:
        word = value.strip().lower()
        if word not in _TRUE | _FALSE:
            raise ConfigError(f"setting {label}: {value!r} is neither true nor false")
        return word in _TRUE
    if key in _PROFILE_COUNTS:
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"setting {label}: {value!r} is not a whole number") from None
    if key == "groups":
        return [group.strip() for group in re.split(r"(?<!\\);", value) if group.strip()]
    return value.strip()


def parse_targets(table: Mapping, env: object = None) -> dict[str, LdapSettings]:
    """`[targets.NAME]` tables: each an [ldap]-shaped table (url, bind, TLS, `preset`,
    `[targets.NAME.attributes]`): for example Active Directory for Outlook beside an OpenLDAP address book.

    `env`: the `AUTOENROLL_TARGETS__<NAME>__<KEY>` variables (`..__ATTRIBUTES__<KEY>` for the attribute
    map), merged over the file's tables key by key, as AUTOENROLL_PROFILES__* are: NAME matches a target of
    the file ignoring case with `_` standing for `-`, or adds a target of that name (lower case); a
    variable's `PRESET` wins over the file's."""
    if not isinstance(table, Mapping):
        raise ConfigError("setting targets must be a table of tables ([targets.<name>])")
    overrides = target_tables_from_environment(env, table) if env is not None else {}
    parsed = {}
    for name in [*table, *(n for n in overrides if n not in table)]:
        values = table.get(name, {})
        if not isinstance(values, Mapping):
            raise ConfigError(f"setting targets.{name} must be a table")
        if len(name) > 64:
            raise ConfigError(f"setting targets.{name}: the name is longer than 64 characters")
        values = dict(values)
        label, over = f"AUTOENROLL_TARGETS__{name.upper().replace('-', '_')}__", dict(overrides.get(name, {}))
        preset_label, preset = (f"{label}PRESET", over.pop("preset")) if "preset" in over else \
            (f"targets.{name}.preset", values.get("preset", "openldap"))
        values.pop("preset", None)
        try:
            base = LdapSettings.for_preset(str(preset).strip().lower())
        except ValueError as exc:
            raise ConfigError(f"setting {preset_label}: {exc}") from exc
        parsed[name] = _apply(_apply(base, values, f"targets.{name}."), over, label, env=True)
    return parsed


def target_tables_from_environment(env: object, tables: Mapping) -> dict[str, dict]:
    """The AUTOENROLL_TARGETS__<NAME>__... variables by target name: the file's target NAME stands for
    (ignoring case, `_` for `-`), else NAME in lower case."""
    if not isinstance(env, Mapping):
        raise ConfigError("AUTOENROLL_TARGETS is not a setting: set AUTOENROLL_TARGETS__<NAME>__<KEY>")
    overrides: dict[str, dict] = {}
    for env_name, values in env.items():
        label = f"AUTOENROLL_TARGETS__{env_name.upper()}"
        if not isinstance(values, Mapping):
            raise ConfigError(f"{label} names no key of the target: set {label}__<KEY> (for example {label}__URL)")
        overrides[_named_by(label, env_name, tables, "targets")] = dict(values)
    return overrides


def _named_by(label: str, env_name: str, tables: Mapping, kind: str) -> str:
    """The table a variable's NAME stands for: the one of `tables` equal to it ignoring case, with `_`
    standing for `-` (environment names cannot hold `-`), else NAME itself (a new one)."""
    matches = [name for name in tables if name.lower().replace("-", "_") == env_name.replace("-", "_")]
    if len(matches) > 1:
        raise ConfigError(f"{label} matches the {kind} {', '.join(sorted(matches))}: rename one of them")
    return matches[0] if matches else env_name


def _ldap_preset(settings: Settings, data: dict, env: dict) -> Settings:
    """Start [ldap] from the defaults of `ldap.preset` (the environment's, else the file's), which the
    rest of [ldap] and of AUTOENROLL_LDAP__* then override key by key; `preset` is taken out of both."""
    tables = [t for t in (env.get("ldap"), data.get("ldap")) if isinstance(t, dict)]
    names = [t.pop("preset") for t in tables if "preset" in t]
    if not names:
        return settings
    try:
        return dataclasses.replace(settings, ldap=LdapSettings.for_preset(str(names[0]).strip().lower()))
    except ValueError as exc:
        raise ConfigError(f"setting ldap.preset: {exc}") from exc


def parse_trust(table: Mapping) -> TrustSettings:
    """The `[trust]` table: `crl_timeout_seconds`, and one `[trust.anchors.<name>]` table per anchor."""
    if not isinstance(table, Mapping):
        raise ConfigError("setting trust must be a table")
    table = dict(table)
    anchors = table.pop("anchors", {}) or {}
    if not isinstance(anchors, Mapping):
        raise ConfigError("setting trust.anchors must be a table of tables ([trust.anchors.<name>])")
    trust = _apply(TrustSettings(), table, "trust.")
    parsed = []
    for name, values in anchors.items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"setting trust.anchors.{name} must be a table")
        anchor = _apply(AnchorSettings(name=name), values, f"trust.anchors.{name}.")
        if bool(anchor.file) == bool(anchor.subject):
            raise ConfigError(f"trust anchor {name!r}: give either file or subject (a certificate of user-trust.pem)")
        if anchor.revocation not in ("crl", "none"):
            raise ConfigError(f"trust anchor {name!r}: revocation must be \"crl\" or \"none\", not {anchor.revocation!r}")
        if anchor.max_crl_age_seconds <= 0:
            raise ConfigError(f"trust anchor {name!r}: max_crl_age_seconds must be positive")
        parsed.append(anchor)
    return dataclasses.replace(trust, anchors=tuple(parsed))


def _trust_table(trust: TrustSettings) -> dict:
    table = {f.name: getattr(trust, f.name) for f in dataclasses.fields(trust) if f.name != "anchors"}
    table["anchors"] = {a.name: {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if f.name != "name"}
                        for a in trust.anchors}
    return table


def _merge(base: Mapping, over: Mapping) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(merged.get(key, {}), value) if isinstance(value, Mapping) else value
    return merged


def resolve_groups(settings: Settings) -> Settings:
    """Check and resolve, once at start-up, every group and profile name the settings hold: each
    profile's groups become normalised DNs (bare names under groups_base), and so does the officers'
    group; ConfigError names the profile or setting that is wrong."""
    base = settings.ldap.groups_base
    try:
        normalise_dn(base)
    except InvalidDn as exc:
        raise ConfigError(f"setting ldap.groups_base {base!r} is not a distinguished name") from exc
    profiles = resolve_profile_groups(settings.profiles, base)
    try:
        officers = group_dn(settings.recovery_officers_group, base)
    except InvalidDn as exc:
        raise ConfigError(f"setting recovery_officers_group {settings.recovery_officers_group!r} is not a "
                          "distinguished name (nor a bare name under ldap.groups_base)") from exc
    for setting, usage in (("bootstrap_profile", Usage.SIGNATURE), ("default_encryption_profile", Usage.ENCRYPTION)):
        name = getattr(settings, setting)
        if name not in profiles:
            raise ConfigError(f"setting {setting}: there is no profile {name!r} (profiles: {', '.join(sorted(profiles))})")
        if profiles[name].usage is not usage:
            raise ConfigError(f"setting {setting}: profile {name!r} is not a {usage.value} profile")
    return dataclasses.replace(settings, profiles=profiles, recovery_officers_group=officers)


MASK = "********"
_SECRET_WORDS = ("password", "passphrase", "secret")


def _masked_url(url: str) -> str:
    """A URL with the password of its user-info masked (postgresql+psycopg://user:pw@host/db)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in userinfo:
        return url
    return f"{scheme}://{userinfo.split(':', 1)[0]}:{MASK}@{host}"


def _plain(name: str, value: object) -> object:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(f.name, getattr(value, f.name)) for f in dataclasses.fields(value)}
    if any(word in name for word in _SECRET_WORDS):
        return MASK if value else value
    if isinstance(value, str) and "://" in value:
        return _masked_url(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, frozenset):
        return sorted(value)
    if isinstance(value, (tuple, list)):
        return [_plain(name, item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(name, item) for key, item in value.items()}
    return value


def effective_configuration(settings: Settings) -> dict:
    """The settings in effect as plain data for `autoenroll config show`: passwords, passphrases and
    the password of any URL masked; every profile as the table that configures it."""
    from .core.profiles import profile_table
    out = {}
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if f.name == "profiles":
            out["profiles"] = {name: profile_table(p) for name, p in sorted(value.items())}
        else:
            out[f.name] = _plain(f.name, value)
    return out
