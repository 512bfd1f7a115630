"""Wiring: build every authority of the all-in-one "server platform" from the settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography.hazmat.primitives.serialization import Encoding

from .auth.agent import AgentPolicy
from .auth.chain import UserTrust
from .authorities.ca import LocalCA
from .authorities.certs import CaUrls
from .authorities.key_authority import LocalKeyAuthority
from .authorities.keys import KeyPool
from .authorities.kra import LocalKRA
from .authorities.pki_files import PkiPaths, read_cert, read_certs, read_private_key, read_public_key
from .core.errors import ConfigError
from .recovery import Recovery
from .service import RegistrationAuthority
from .settings import Settings
from .store.db import Database, migrate


@dataclass
class Services:
    settings: Settings
    db: Database
    directory: object
    ca: LocalCA
    kra: LocalKRA
    pool: KeyPool
    key_authority: LocalKeyAuthority
    publisher: object
    ra: RegistrationAuthority
    recovery: Recovery
    agent_policy: AgentPolicy
    user_trust: UserTrust

    @property
    def nonce_ttl(self) -> timedelta:
        return timedelta(seconds=self.settings.nonce_ttl_seconds)

    def start_background(self) -> None:
        """Per process (after gunicorn forks): key pool filler and outbox worker threads."""
        self.pool.start()
        self._outbox = self.publisher.start_thread(self.settings.outbox_interval_seconds)

    def close(self) -> None:
        self.pool.stop()
        outbox = getattr(self, "_outbox", None)
        if outbox is not None:
            outbox[1].set()
            outbox[0].join(timeout=5)
        close = getattr(self.directory, "close", None)
        if close is not None:
            close()
        self.db.dispose()


def build_services(settings: Settings, *, directory=None, run_migrations: bool = True) -> Services:
    from directory_sync.ldap import LdapDirectory
    from directory_sync.publisher import Publisher

    paths = PkiPaths.in_dir(settings.data_dir)
    if not paths.ca_cert.exists():
        raise ConfigError(f"no CA in {settings.data_dir}; run `autoenroll init` first")
    if run_migrations:
        migrate(settings.db_url)
    db = Database(settings.db_url)
    passphrase = settings.passphrase()
    ca_cert = read_cert(paths.ca_cert)
    ca = LocalCA(db, ca_cert, read_private_key(paths.ca_key, passphrase),
                 CaUrls(crl_url=settings.crl_url, ca_issuers_url=settings.ca_issuers_url),
                 crl_validity=timedelta(hours=settings.crl_validity_hours))
    kra = LocalKRA(db, read_public_key(paths.kra_public_key),
                   lambda: read_private_key(paths.kra_key, passphrase))
    pool = KeyPool(size=settings.key_pool_size,
                   key_types={p.key_type for p in settings.profiles.values() if p.key_type.is_rsa})
    key_authority = LocalKeyAuthority(ca, kra, pool, pkcs12_iterations=settings.pkcs12_iterations)
    directory = directory if directory is not None else LdapDirectory(settings.ldap)
    publisher = Publisher(db, directory, dict(settings.profiles), ca_cert.public_bytes(Encoding.DER))
    extra = settings.path("user-trust.pem")
    anchors = (ca_cert, *(read_certs(extra) if extra.exists() else ()))
    user_trust = UserTrust(anchors=anchors, our_issuers=(ca_cert,))
    agent_policy = AgentPolicy(anchors=(read_cert(paths.tls_ca_cert),), allowed=settings.agents_allowed)
    ra = RegistrationAuthority(settings, db, directory, key_authority, publisher)
    recovery = Recovery(settings, db, directory, kra, ca.chain)
    return Services(settings=settings, db=db, directory=directory, ca=ca, kra=kra, pool=pool,
                    key_authority=key_authority, publisher=publisher, ra=ra, recovery=recovery,
                    agent_policy=agent_policy,
                    user_trust=user_trust)
