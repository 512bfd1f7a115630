"""Wiring: build the authorities of this process from the settings, by `settings.role`.

- "all": the server platform: RA, key authority, CA and KRA in one process (the default).
- "ra": the registration authority; the CA and the KRA are services reached over mTLS (authorities/remote.py).
  It holds neither ca.key nor kra.key, only the CA certificate and the KRA's public storage key.
- "ca": the CA service: ca.key, the certificates, the CRL and the publisher (the CA publishes).
- "kra": the KRA service: kra.key; it verifies the evidence of every recovery itself (kra_verify.py).

A split role refuses to start when its data directory holds a private key it does not need, so that the
documented copy ("only ca.key to the CA host, only kra.key to the KRA host") is also the enforced one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from .auth.agent import ANY_AGENT, AgentPolicy
from .auth.anchors import AnchorPolicy
from .auth.chain import UserTrust
from .auth.revocation import CrlChecker
from .authorities.ca import LocalCA
from .authorities.certs import CaUrls
from .authorities.key_authority import LocalKeyAuthority, SplitKeyAuthority
from .authorities.keys import KeyPool
from .authorities.kra import LocalKRA
from .authorities.officers import OfficerRoster
from .authorities.pki_files import (PemKeyStore, PkiPaths, check_private, read_cert, read_certs, read_public_key,
                                    read_server_keys)
from .core.errors import ConfigError
from .core.ports import CaStatus, CertificateAuthority, Directory, KeyStore, RecoveryAuthority
from .ra.recovery import Recovery
from .ra.authority import RegistrationAuthority
from .settings import Settings
from .store.db import Database, migrate, sqlite_files

if TYPE_CHECKING:
    from .authorities.kra_verify import EvidenceVerifier  # role kra only: imported by _kra_services

ROLES = ("all", "ra", "ca", "kra")
# Private keys a role must not hold (tls-ca.key issues agent certificates: no server needs it at run time).
FORBIDDEN_KEYS = {"ra": ("ca_key", "kra_key", "tls_ca_key"), "ca": ("kra_key", "tls_ca_key"),
                  "kra": ("ca_key", "tls_ca_key")}
# The server secrets (store/keys.py) each role reads at start: the RA checks nonces and enrollment codes;
# every role appends audit rows. README, Split deployment, lists the files to copy.
# The CA, TLS CA and KRA keys (by their key_store names) each role signs or unwraps with at run time.
ROLE_USES = {"all": ("ca", "kra"), "ra": (), "ca": ("ca",), "kra": ("kra",)}
_KEY_FILE = {"ca": "ca_key", "tls_ca": "tls_ca_key", "kra": "kra_key"}
ROLE_KEYS = {"all": ("nonce", "codes", "audit"), "ra": ("nonce", "codes", "audit"), "ca": ("audit",),
             "kra": ("audit",)}


@dataclass
class Services:
    settings: Settings
    db: Database
    directory: Directory
    ca: CaStatus  # a CertificateAuthority (LocalCA, RemoteCA), except in role kra (CaView)
    kra: RecoveryAuthority | None  # LocalKRA | RemoteKRA
    pool: KeyPool | None
    key_authority: SplitKeyAuthority | None  # LocalKeyAuthority in role all
    publisher: Any  # Publisher | RemotePublisher | None (ra/authority.py: no Protocol for publication yet)
    ra: RegistrationAuthority | None
    recovery: Recovery | None
    agent_policy: AgentPolicy
    user_trust: UserTrust
    authority_policy: AgentPolicy | None = None  # roles ca, kra: which RAs may call
    evidence: EvidenceVerifier | None = None  # role kra
    # /health: the token keys this role uses sign (or unwrap) a probe now; None when they are files
    key_probe: Callable[[], None] | None = None

    @property
    def role(self) -> str:
        return self.settings.role

    @property
    def nonce_ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.nonce_ttl_seconds)

    def start_background(self) -> None:
        """Per process (after gunicorn forks): key pool filler (RA) and outbox worker (whoever publishes)."""
        if self.pool is not None:
            self.pool.start()
        if self.role in ("all", "ca"):
            self._outbox = self.publisher.start_thread(self.settings.outbox_interval_seconds)
        if self.role == "kra":  # the two-phase escrow's pending rows, settled by the CA's records
            self._sweep = cast(LocalKRA, self.kra).start_sweep()

    def close(self) -> None:
        completions = getattr(self.publisher, "completions", None)
        if completions is not None:  # rows published inline but not marked yet: mark them now
            completions.flush(timeout=5)
        if self.pool is not None:
            self.pool.stop()
        for worker in (getattr(self, "_outbox", None), getattr(self, "_sweep", None)):
            if worker is not None:
                worker[1].set()
                worker[0].join(timeout=5)
        for part in (self.directory, self.ca, self.kra, *getattr(self.publisher, "targets", ())):
            close = getattr(part, "close", None)
            if close is not None:
                close()
        self.db.dispose()


def check_role(settings: Settings) -> None:
    """Refuse a role that is unknown, incompletely configured, holding a key it must not hold, or whose
    private files others may read."""
    paths = PkiPaths.in_dir(settings.data_dir)
    if settings.role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, not {settings.role!r}")
    check_private_files(settings)
    held = [getattr(paths, name).name for name in FORBIDDEN_KEYS.get(settings.role, ())
            if getattr(paths, name).exists()]
    if settings.role in ("ca", "kra"):  # the RA's secrets: whoever holds them can mint nonces and codes
        from .store.keys import KEY_FILES
        held += [KEY_FILES[k] for k in ROLE_KEYS["ra"] if k not in ROLE_KEYS[settings.role]
                 and settings.path(KEY_FILES[k]).exists()]
    if held:
        raise ConfigError(f"role {settings.role!r} must not hold {', '.join(held)} in {settings.data_dir}: "
                          "move it to the host of the authority that uses it (README, Split deployment)")
    check_token_keys(settings)
    if settings.role == "ra" and not (settings.ca_url and settings.kra_url):
        raise ConfigError("role 'ra' needs ca_url and kra_url (the CA and KRA services)")
    if settings.role in ("ca", "kra"):
        if not settings.authority_clients:
            raise ConfigError(f"role {settings.role!r} needs authority_clients: the names of the RA client "
                              "certificates it accepts")
        if ANY_AGENT in settings.authority_clients:
            raise ConfigError("authority_clients cannot be '*': name the RA certificates, or agents could call")


def check_directory(settings: Settings) -> None:
    """The LDAP settings (plaintext, password file, development password) and the TLS set-up of [ldap]
    and of every [targets.NAME], checked once before the server starts (directory_sync/connection.py)."""
    from directory_sync.connection import check_directory as check
    from .core.errors import AutoenrollError
    check(settings.ldap)
    for name, target in settings.targets.items():
        try:
            check(target)
        except AutoenrollError as exc:
            raise type(exc)(f"publication target {name!r}: {exc.detail}", **exc.extra) from exc


def key_store(settings: Settings) -> KeyStore:
    """The files of the data folder, or the token of `[key_store]` for the keys it names."""
    from .authorities.pkcs11_store import KEY_NAMES, Pkcs11KeyStore, Token
    files = PemKeyStore(PkiPaths.in_dir(settings.data_dir), settings.passphrase)
    wanted = settings.key_store.in_token
    if not wanted:
        return files
    if wanted - set(KEY_NAMES):
        raise ConfigError(f"key_store.in_token names {', '.join(sorted(wanted - set(KEY_NAMES)))}: the keys are "
                          f"{', '.join(KEY_NAMES)}")
    token = Token(settings.key_store.module, settings.key_store.token, settings.path(settings.key_store.pin_file))
    return Pkcs11KeyStore(token, wanted, files)


def check_token_keys(settings: Settings) -> None:
    """The token's part of check_role: a role keeps in its token only the keys it uses (as in its data
    folder), a key moved into the token has no file copy left, and every token key the role uses answers
    now (module, token, PIN, label, the right key): a ConfigError naming what is wrong, before serving."""
    from .authorities.pkcs11_store import KEY_NAMES, Pkcs11KeyStore, key_label
    store = key_store(settings)
    if not isinstance(store, Pkcs11KeyStore):
        return
    paths = PkiPaths.in_dir(settings.data_dir)
    left = [getattr(paths, _KEY_FILE[name]).name for name in sorted(store.in_token)
            if getattr(paths, _KEY_FILE[name]).exists()]
    if left:
        raise ConfigError(f"{', '.join(left)} still in {settings.data_dir} although key_store.in_token says the "
                          "key is in the token: destroy the file copy (shred -u), it is a second copy of the key")
    if settings.role == "all":
        return store.check(ROLE_USES["all"])
    uses = ROLE_USES.get(settings.role, ())
    configured = sorted(name for name in store.in_token if name not in uses)
    if configured:
        raise ConfigError(f"role {settings.role!r} must not use {', '.join(configured)} (key_store.in_token): "
                          "that key belongs to another authority's token (README, Keys in an HSM)")
    if not uses:
        return
    labels = store.token.labels()
    foreign = [key_label(name) for name in KEY_NAMES if name not in uses and key_label(name) in labels]
    if foreign:
        raise ConfigError(f"role {settings.role!r} must not hold {', '.join(foreign)} in token "
                          f"{store.token.label!r}: each authority's keys go in a token (or slot) of their own "
                          "(README, Keys in an HSM)")
    store.check(uses)


def check_private_files(settings: Settings) -> None:
    """The data folder 0700; the database, its -wal and -shm, keys and secrets 0600 (as ssh demands of
    its private files): refused at start otherwise. `autoenroll init` creates them so."""
    from .store.keys import CHECKPOINT_FILE, KEY_FILES
    paths = PkiPaths.in_dir(settings.data_dir)
    private = [settings.data_dir, *sqlite_files(settings.db_url), settings.path("passphrase"),
               *(settings.path(name) for name in (*KEY_FILES.values(), CHECKPOINT_FILE)),
               *(p for p in paths.all() if p.suffix == ".key"), settings.path(settings.key_store.pin_file)]
    for path in private:
        check_private(path)


def server_database(settings: Settings) -> Database:
    """The role's database, with the server keys of its data folder."""
    return Database(settings.db_url, keys=read_server_keys(settings.data_dir, ROLE_KEYS[settings.role]))


def check_database(db: Database) -> None:
    """What `autoenroll init` has still to move out of the database (store/upgrade.py): a ConfigError
    saying so. The server asks once, in the master before it forks; its workers do not ask again, so that
    a worker started while the database is down (a restart, a worker replaced) boots and answers 503
    instead of failing to boot, which makes gunicorn's master shut the whole server down."""
    from .store.upgrade import pending
    still_in_database = pending(db)
    if still_in_database is not None:
        raise ConfigError(still_in_database)


def build_services(settings: Settings, *, directory: Directory | None = None, run_migrations: bool = True,
                   database_checked: bool = False) -> Services:
    """Every service of settings.role. `database_checked`: `check_database` has run already (the server's
    master did before forking this worker), so building touches neither the database nor the directory."""
    from directory_sync.ldap import LdapDirectory

    paths = PkiPaths.in_dir(settings.data_dir)
    if not paths.ca_cert.exists():
        raise ConfigError(f"no CA certificate in {settings.data_dir}; run `autoenroll init` first")
    check_role(settings)
    if run_migrations:
        migrate(settings.db_url)
    db = server_database(settings)
    if not database_checked:
        try:
            check_database(db)
        except BaseException:
            db.dispose()
            raise
    ca_cert = read_cert(paths.ca_cert)
    user_trust = build_user_trust(settings, ca_cert)
    tls_anchors = (read_cert(paths.tls_ca_cert),)
    agent_policy = AgentPolicy(anchors=tls_anchors, allowed=settings.agents_allowed, scopes=settings.agent_scopes)
    if directory is None:  # the groups requests ask about: answered with the entry where one search can
        directory = LdapDirectory(settings.ldap, entitlement_groups=[
            *(g for p in settings.profiles.values() for g in p.groups), settings.recovery_officers_group])
    keys = key_store(settings)
    common: dict[str, Any] = dict(settings=settings, db=db, directory=directory, agent_policy=agent_policy,
                                  user_trust=user_trust, key_probe=_key_probe(settings, keys))
    if settings.role == "ca":
        ca_service = _local_ca(settings, keys, db, ca_cert)
        return Services(**common, ca=ca_service, kra=None, pool=None, key_authority=None,
                        publisher=_publisher(settings, db, directory, ca_service), ra=None, recovery=None,
                        authority_policy=AgentPolicy(anchors=tls_anchors, allowed=settings.authority_clients))
    if settings.role == "kra":
        return _kra_services(settings, keys, db, ca_cert, common, tls_anchors)

    pool = KeyPool(size=settings.key_pool_size,
                   key_types={p.key_type for p in settings.profiles.values() if p.key_type.is_rsa})
    ca: CertificateAuthority
    kra: RecoveryAuthority
    key_authority: SplitKeyAuthority
    if settings.role == "ra":
        ca, remote_kra, publisher = _remote_authorities(settings, paths, ca_cert)
        kra = remote_kra
        key_authority = SplitKeyAuthority(ca, remote_kra, pool, db, pkcs12_iterations=settings.pkcs12_iterations)
    else:
        local_ca = ca = _local_ca(settings, keys, db, ca_cert)
        local_kra = kra = LocalKRA(
            db, read_public_key(paths.kra_public_key), keys.kra_storage_key,
            pkcs12_iterations=settings.pkcs12_iterations, quorum=settings.recovery_quorum,
            officers=OfficerRoster(directory, settings.recovery_officers_group, ca.is_revoked),
            pending_grace=timedelta(seconds=settings.escrow_pending_grace_seconds))
        publisher = _publisher(settings, db, directory, ca)
        key_authority = LocalKeyAuthority(local_ca, local_kra, pool, published=publisher.completions,
                                          pkcs12_iterations=settings.pkcs12_iterations)
    ra = RegistrationAuthority(settings, db, directory, key_authority, publisher)
    recovery = Recovery(settings, db, directory, kra, ca.chain, ca.is_revoked)
    return Services(**common, ca=ca, kra=kra, pool=pool, key_authority=key_authority, publisher=publisher, ra=ra,
                    recovery=recovery)


def _key_probe(settings: Settings, keys: KeyStore) -> Callable[[], None] | None:
    """What /health asks of the key store: every token key this role uses answers now (a ConfigError
    naming the failure otherwise). None when they are files, read at start."""
    from .authorities.pkcs11_store import Pkcs11KeyStore
    uses = ROLE_USES.get(settings.role, ())
    if not isinstance(keys, Pkcs11KeyStore) or not keys.in_token & set(uses):
        return None
    return lambda: keys.check(uses)


def build_user_trust(settings: Settings, ca_cert) -> UserTrust:
    """Our CA, the certificates of data_dir/user-trust.pem and of each `[trust.anchors.<name>]` file,
    with the policies of those tables (README "Other trust anchors")."""
    extra = settings.path("user-trust.pem")
    bundle = read_certs(extra) if extra.exists() else []
    policies: list[AnchorPolicy] = []
    claimed: set[bytes] = set()
    for anchor in settings.trust.anchors:
        if anchor.file:
            certificates = read_certs(settings.path(anchor.file))
        else:
            wanted = _subject_of(anchor).rfc4514_string().lower()
            certificates = [c for c in bundle if c.subject.rfc4514_string().lower() == wanted]
            if not certificates:
                raise ConfigError(f"trust anchor {anchor.name!r}: no certificate in {extra.name} has the subject "
                                  f"{anchor.subject!r}")
        if ca_cert in certificates:
            raise ConfigError(f"trust anchor {anchor.name!r} names this server's own CA certificate")
        claimed.update(c.fingerprint(hashes.SHA256()) for c in certificates)
        policies.append(AnchorPolicy(
            name=anchor.name, certificates=tuple(certificates), domains=anchor.domains,
            revocation=anchor.revocation, max_crl_age=timedelta(seconds=anchor.max_crl_age_seconds),
            match_attribute=anchor.match_attribute))
    for cert in bundle:  # the rest of user-trust.pem: the safe defaults (any domain, CRL checked)
        if cert != ca_cert and cert.fingerprint(hashes.SHA256()) not in claimed:
            policies.append(AnchorPolicy(name=f"user-trust.pem: {cert.subject.rfc4514_string()}", certificates=(cert,)))
    anchors = (ca_cert, *(c for p in policies for c in p.certificates))
    return UserTrust(anchors=anchors, our_issuers=(ca_cert,), external=tuple(policies),
                     revocation=CrlChecker(timeout=settings.trust.crl_timeout_seconds))


def _subject_of(anchor) -> x509.Name:
    try:
        return x509.Name.from_rfc4514_string(anchor.subject)
    except ValueError:
        raise ConfigError(f"trust anchor {anchor.name!r}: subject {anchor.subject!r} is not an RFC 4514 name") from None


def _local_ca(settings: Settings, keys: KeyStore, db: Database, ca_cert) -> LocalCA:
    return LocalCA(db, ca_cert, keys.ca_signing_key(),
                   CaUrls(crl_url=settings.crl_url, ca_issuers_url=settings.ca_issuers_url),
                   crl_validity=timedelta(hours=settings.crl_validity_hours))


def _publisher(settings: Settings, db: Database, directory: Directory, ca: LocalCA):
    from directory_sync.publisher import Publisher
    from directory_sync.targets import TargetPublisher
    ca_der = ca.certificate.public_bytes(Encoding.DER)
    publisher = Publisher(db, directory, dict(settings.profiles), ca_der, ca=ca,
                          inline_wait=settings.publish_timeout_seconds)
    publisher.targets = [TargetPublisher.from_settings(name, target, db, settings.profiles, ca_der)
                         for name, target in settings.targets.items()]
    return publisher


def _remote_authorities(settings: Settings, paths: PkiPaths, ca_cert):
    from .authorities.remote import AuthorityClient, RemoteCA, RemoteKRA, RemotePublisher
    cert, key = settings.path(settings.authority_client_cert), settings.path(settings.authority_client_key)
    if not (cert.exists() and key.exists()):
        raise ConfigError(f"role 'ra' needs its TLS client certificate {cert} and key {key} (README, Split deployment)")
    options: dict[str, Any] = dict(client_cert=(str(cert), str(key)), server_ca=str(paths.tls_ca_cert),
                   timeout=settings.authority_timeout_seconds, pool_size=max(4, settings.threads * 2))
    ca_client = AuthorityClient(settings.ca_url, name="CA", **options)
    ca = RemoteCA(ca_client, ca_cert)
    kra = RemoteKRA(AuthorityClient(settings.kra_url, name="KRA", **options), read_public_key(paths.kra_public_key))
    return ca, kra, RemotePublisher(ca_client, timeout=settings.publish_timeout_seconds + 1.0)


def _kra_services(settings: Settings, keys: KeyStore, db: Database, ca_cert, common: dict, tls_anchors) -> Services:
    from .authorities.kra_verify import CaView, EvidenceVerifier
    storage_key = keys.kra_storage_key()  # at start: a wrong passphrase fails now
    kra = LocalKRA(db, storage_key.public_key(), lambda: storage_key, pkcs12_iterations=settings.pkcs12_iterations,
                   pending_grace=timedelta(seconds=settings.escrow_pending_grace_seconds))
    ca = CaView(db, ca_cert)
    evidence = EvidenceVerifier(db=db, directory=common["directory"], trust=common["user_trust"],
                                is_revoked=ca.is_revoked, officers_group=settings.recovery_officers_group,
                                quorum=settings.recovery_quorum)
    return Services(**common, ca=ca, kra=kra, pool=None, key_authority=None, publisher=None, ra=None,
                    recovery=None, evidence=evidence,
                    authority_policy=AgentPolicy(anchors=tls_anchors, allowed=settings.authority_clients))


if TYPE_CHECKING:  # mypy (make test) checks that directory_sync's LDAP client has the signatures of the Protocol
    from directory_sync.ldap import LdapDirectory

    def _is_directory(implementation: LdapDirectory) -> Directory:
        return implementation
