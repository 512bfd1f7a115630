"""A real platform (gunicorn, TLS, client certificates) on the session's slapd, its own data directory,
and the means to mint whatever certificates an attacker would bring."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from bench import world
from bench.client import AgentConnection
from bench.platform import make_platform
from directory_sync.slapd import PrivateSlapd
from bench import pki
from tests.fault import records
from tests.ldap_admin import MODIFY_ADD, LdapAdmin


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64std(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jws(header: dict, payload: bytes | dict, sign) -> bytes:
    """A flattened JWS built by hand (so that every field can be wrong); `sign(signing_input) -> bytes`."""
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    protected = b64url(json.dumps(header).encode())
    encoded = b64url(payload)
    signature = sign(f"{protected}.{encoded}".encode())
    return json.dumps({"protected": protected, "payload": encoded, "signature": b64url(signature)}).encode()


def es256(key):
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return sign


@dataclass
class Adversary:
    platform: object
    ldap_url: str
    ca: pki.Issued  # the platform's own S/MIME CA, key included: to mint odd but genuine certificates
    minter: world.Minter
    entitled: world.User
    unentitled: world.User

    def connection(self, **kwargs) -> AgentConnection:
        return AgentConnection.for_platform(self.platform, **kwargs)

    def header(self, conn: AgentConnection, user_chain, *, alg: str = "ES256", path: str = "enroll", **overrides):
        header = {"alg": alg, "x5c": [b64std(c.public_bytes(Encoding.DER)) for c in user_chain],
                  "nonce": conn.nonce(), "url": conn.url(path), "x5t#S256": conn.thumbprint}
        header.update(overrides)
        return {k: v for k, v in header.items() if v is not None}

    def user(self, email: str | None = None, groups: tuple[str, ...] = (world.GROUP,)) -> world.User:
        uid = "adv-" + uuid.uuid4().hex[:10]
        add_user(self.ldap_url, self.platform, uid, groups)
        return self.minter.user(uid, email=email)


def add_user(ldap_url: str, platform, uid: str, groups: tuple[str, ...]) -> None:
    from directory_sync.slapd import ADMIN_DN
    admin_pw = platform.admin_password
    conn = LdapAdmin(ldap_url, ADMIN_DN, admin_pw)
    try:
        dn = world.user_dn(uid)
        assert conn.add(dn, ["inetOrgPerson", "pkiUser"],
                        {"uid": uid, "cn": f"Adversary {uid}", "sn": "Adversary", "mail": f"{uid}@example.org"}), \
            conn.result
        for group in groups:
            assert conn.modify(f"cn={group},ou=groups,dc=example,dc=org", {"member": [(MODIFY_ADD, [dn])]}), conn.result
    finally:
        conn.unbind()


@pytest.fixture(scope="session")
def adversarial_slapd(tmp_path_factory):
    """Its own slapd: the users the adversarial platforms add to the entitling group must not show up
    in other tests."""
    slapd = PrivateSlapd(tmp_path_factory.mktemp("adversarial-slapd"))
    slapd.start()
    try:
        slapd.bulk_load(world.users_ldif([], group=True))
        yield slapd
    finally:
        slapd.stop()


def _platform(folder, slapd, **settings):
    platform = make_platform(folder, slapd.url, **records.FAST, **settings)
    platform.admin_password = slapd.admin_password
    platform.start()
    return platform


@pytest.fixture(scope="session")
def adversary(tmp_path_factory, adversarial_slapd):
    # A renewed signature certificate stops authenticating at once here (production waits
    # superseded_grace_seconds), so that the refusal can be shown without waiting.
    platform = _platform(tmp_path_factory.mktemp("adversarial") / "server", adversarial_slapd,
                         superseded_grace_seconds=0)
    try:
        minter = world.Minter(platform.data, platform.passphrase)
        ca = pki.Issued(minter.ca_cert, minter.ca_key)
        adv = Adversary(platform, adversarial_slapd.url, ca, minter, None, None)  # type: ignore[arg-type]
        adv.entitled = adv.user()
        adv.unentitled = adv.user(groups=())
        yield adv
    finally:
        platform.stop()


@pytest.fixture(scope="session")
def behind_proxy(tmp_path_factory, adversarial_slapd):
    """A platform that trusts a TLS-terminating proxy on 127.0.0.1 (where the tests connect from): every
    connection of the tests is "the proxy", which forwards the client's certificate in X-Client-Cert."""
    platform = _platform(tmp_path_factory.mktemp("behind-proxy") / "server", adversarial_slapd,
                         trusted_proxies=["127.0.0.1"])
    try:
        minter = world.Minter(platform.data, platform.passphrase)
        yield Adversary(platform, adversarial_slapd.url, pki.Issued(minter.ca_cert, minter.ca_key), minter,
                        None, None)  # type: ignore[arg-type]
    finally:
        platform.stop()


@pytest.fixture(scope="session")
def in_process(adversary):
    """The same application in this process (create_app + Flask's test client) on the platform's data:
    for thousands of fuzz cases, and for agent certificates TLS would already refuse."""
    from registration_app.wiring import build_services
    from registration_app.web.app import create_app

    settings = adversary.platform.settings()
    services = build_services(settings, run_migrations=False)
    try:
        yield create_app(settings, services), services
    finally:
        services.close()
