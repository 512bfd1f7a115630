"""The RA in process on an in-memory directory (tests/ra/fakes.py): the real RegistrationAuthority,
Recovery, CA, KRA and database (SQLite in a temporary folder, or the run's PostgreSQL) wired by
build_services, without slapd or gunicorn; users sign with certificates of the platform's own CA."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select

from bench.world import Minter, User
from directory_sync.config import LdapSettings
from registration_app.agent.jws import sign_user_request
from registration_app.auth.chain import verify_user_chain
from registration_app.core.model import AgentIdentity, VerifiedRequest
from registration_app.core.profiles import parse_profiles
from registration_app.settings import DEFAULT_PROFILES
from registration_app.store.models import Certificate
from registration_app.wiring import Services
from tests.directory_sync.world import PASSPHRASE, make_services
from tests.ra.fakes import InMemoryDirectory

ENTITLED = "cn=ra-policy,ou=groups,dc=example,dc=org"
OFFICERS = "cn=ra-officers,ou=groups,dc=example,dc=org"
PEOPLE = "ou=people,dc=example,dc=org"
URL = "https://ra.example.org/api/v1/enroll"
AGENT_DER = b"agent certificate (the TLS layer's, not checked by the RA)"
AGENT = AgentIdentity(subject="CN=mail.example.org", names=frozenset({"mail.example.org"}),
                      certificate_der=AGENT_DER, thumbprint=hashlib.sha256(AGENT_DER).hexdigest())
# The built-in profiles entitled by ENTITLED only; the EC encryption one limited to 3 a day, so that the
# rate limit shows in a few requests.
PROFILES = parse_profiles({name: {**table, "groups": [ENTITLED],
                                  **({"max_per_day": 3} if name == "smime-encryption-ec" else {})}
                           for name, table in DEFAULT_PROFILES.items()})


@dataclass
class RaWorld:
    services: Services
    directory: InMemoryDirectory
    minter: Minter

    def person(self, *groups: str) -> User:
        """A new directory entry in `groups` (default: the entitling group), with a signature
        certificate of our CA, as `autoenroll-agent bootstrap` would have given them."""
        uid = "u" + uuid.uuid4().hex[:10]
        email = f"{uid}@example.org"
        self.directory.add_user(f"uid={uid},{PEOPLE}", email, groups=groups or (ENTITLED,))
        return self.minter.user(uid, email=email)

    def request(self, user: User, payload: dict, now: datetime | None = None) -> VerifiedRequest:
        """What web/api.py hands the RA after its checks: the payload, the user's verified chain, the
        agent, and the signed request itself (the evidence recovery keeps)."""
        now = now or datetime.now(timezone.utc)
        raw = sign_user_request(payload, key=user.key, chain=list(user.chain), nonce=uuid.uuid4().hex, url=URL,
                                agent_thumbprint=AGENT.thumbprint)
        identity = verify_user_chain([c.public_bytes(Encoding.DER) for c in user.chain],
                                     self.services.user_trust, now, self.services.ca.is_revoked)
        return VerifiedRequest(payload=payload, user=identity, agent=AGENT, raw=raw)

    def history(self, user: User, profile: str) -> list[tuple[str, str, str | None]]:
        """(serial, status, replaces) of the user's certificates of `profile`, newest first."""
        with self.services.db.read() as session:
            rows = session.execute(select(Certificate).where(Certificate.email == user.email.lower(),
                                                             Certificate.profile == profile)
                                   .order_by(Certificate.issued_at.desc())).scalars()
            return [(c.serial, c.status, c.replaces) for c in rows]

    def shown(self, user: User) -> list[int]:
        """Serial numbers of the certificates the directory shows for the user, in order."""
        return [x509.load_der_x509_certificate(v).serial_number for v in self.directory.certificates_of(user.dn)]


@pytest.fixture(scope="session")
def ra_world(tmp_path_factory) -> Iterator[RaWorld]:
    directory = InMemoryDirectory()
    data = tmp_path_factory.mktemp("ra-policy")
    services = make_services(data, LdapSettings(), directory=directory, profiles=PROFILES,
                             recovery_officers_group=OFFICERS, pkcs12_iterations=2048)
    try:
        yield RaWorld(services, directory, Minter(data, PASSPHRASE))
    finally:
        services.close()
