"""Trust anchors other than our CA, against the real server (gunicorn, TLS, slapd): a partner CA and a
national eID configured in the data folder, their CRLs served over HTTP on loopback by the test.

A certificate of such an anchor authenticates only the entry that lists it, within the anchor's domains,
never for recovering escrowed keys, and only while its CRL says it is not revoked (fail closed)."""

from __future__ import annotations

import time
import uuid

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from bench import world
from bench.client import AgentConnection
from bench.platform import Stack, eventually
from directory_sync.slapd import ADMIN_DN
from tests.external_ca import CrlServer, ExternalCA, dead_url
from tests.fault import records
from tests.ldap_admin import MODIFY_ADD, LdapAdmin

PAYLOAD = {"profile": "smime-encryption-ec", "password": "external-anchor-password"}
PARTNER_MAX_AGE = 1  # seconds: the revocation tests wait this long for every worker's copy to go stale


class Anchors:
    def __init__(self, platform, slapd, crls: CrlServer) -> None:
        self.platform, self.slapd, self.crls = platform, slapd, crls
        self.partner = ExternalCA.create("Partner Root", crls.url("/partner.crl"))
        self.eid = ExternalCA.create("National eID", crls.url("/eid.crl"))
        self.dead = ExternalCA.create("Partner Down", dead_url())
        self.unchecked = ExternalCA.create("Partner Unchecked", dead_url())
        self.minter = world.Minter(platform.data, platform.passphrase)

    def configure(self) -> None:
        data = self.platform.data
        pem = {name: getattr(self, name).ca.cert.public_bytes(Encoding.PEM)
               for name in ("partner", "eid", "dead", "unchecked")}
        (data / "user-trust.pem").write_bytes(pem["eid"] + pem["unchecked"])
        (data / "partner.pem").write_bytes(pem["partner"])
        (data / "dead.pem").write_bytes(pem["dead"])
        self.platform.config.write_text(self.platform.config.read_text() + f"""
[trust]
crl_timeout_seconds = 2.0
[trust.anchors.partner]
file = "partner.pem"
max_crl_age_seconds = {PARTNER_MAX_AGE}
[trust.anchors.eid]
subject = "{self.eid.ca.cert.subject.rfc4514_string()}"
domains = ["eid.example"]
[trust.anchors.down]
file = "dead.pem"
[trust.anchors.unchecked]
subject = "{self.unchecked.ca.cert.subject.rfc4514_string()}"
revocation = "none"
""")
        self.partner.publish(self.crls)
        self.eid.publish(self.crls)

    def entry(self, email: str | None = None, *, listed=()) -> str:
        """A new entitled user (mail `email`, or uid@example.org) whose userCertificate lists `listed`."""
        uid = "x-" + uuid.uuid4().hex[:10]
        email = email or f"{uid}@example.org"
        conn = LdapAdmin(self.slapd.url, ADMIN_DN, self.slapd.admin_password)
        try:
            dn = world.user_dn(uid)
            attrs = {"uid": uid, "cn": f"External {uid}", "sn": "External", "mail": email}
            if listed:
                attrs["userCertificate;binary"] = [c.der for c in listed]
            assert conn.add(dn, ["inetOrgPerson", "pkiUser"], attrs), conn.result
            assert conn.modify(world.GROUP_DN, {"member": [(MODIFY_ADD, [dn])]}), conn.result
        finally:
            conn.unbind()
        return email


@pytest.fixture(scope="module")
def anchors(tmp_path_factory):
    with Stack(tmp_path_factory.mktemp("anchors"), ldif=world.users_ldif([], group=True), start=False,
               **records.FAST) as stack, CrlServer() as crls:
        setup = Anchors(stack.platform, stack.slapd, crls)
        setup.configure()
        stack.platform.start()
        yield setup


def as_user(issued, *chain) -> world.User:
    return world.User(uid="", email="", dn="", key=issued.key, chain=(issued.cert, *chain))


def post(anchors, path: str, user, payload: dict):
    conn = AgentConnection.for_platform(anchors.platform)
    try:
        body = conn.sign(payload, user, path=path)
        before = records.counts(anchors.platform)
        return conn.post(path, body), before
    finally:
        conn.close()


def assert_refused(anchors, before: dict, reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body[:400])
    assert reply.json()["code"] == code, reply.json()
    after = records.counts(anchors.platform)
    assert (after["certificates"], after["escrow"]) == (before["certificates"], before["escrow"])
    denials = [e for e in records.audit_since(anchors.platform, before["audit"]) if e.event == "request.denied"]
    if status < 500:
        assert [e.detail.get("code") for e in denials] == [code], [(e.event, e.detail) for e in denials]


def test_a_partner_certificate_for_alices_address_gets_nothing_of_alice(anchors):
    """The external-anchor attack: a partner CA's certificate for ALICE@EXAMPLE.ORG."""
    alice_email = anchors.entry()
    alice = anchors.minter.user("alice", email=alice_email)
    reply, _ = post(anchors, "enroll", alice, PAYLOAD)  # alice, with her certificate of our CA
    assert reply.status == 201, reply.body[:300]
    published = eventually(lambda: records.ldap_values(anchors.slapd.url, alice_email), timeout=30,
                           what="alice's certificate in LDAP")

    mallory = as_user(anchors.partner.user(alice_email.upper()))
    for path, payload, code in (
            ("certificates", {}, "own_ca_required"),
            ("recover", {"all": True, "password": "stolen-keys"}, "own_ca_required"),
            ("enroll", PAYLOAD, "certificate_not_listed"),
            ("enroll", {**PAYLOAD, "replace": True}, "certificate_not_listed"),
            ("revoke", {"serial": reply.json()["serial"], "reason": "keyCompromise"}, "certificate_not_listed")):
        refused, before = post(anchors, path, mallory, payload)
        assert_refused(anchors, before, refused, 403, code)
        assert "pkcs12" not in refused.json() and "certificates" not in refused.json()
    assert records.ldap_values(anchors.slapd.url, alice_email) == published
    assert [c.status for c in records.certificates(anchors.platform) if c.email == alice_email] == ["valid"]


def test_a_partner_certificate_that_the_entry_lists_enrolls_into_that_entry(anchors):
    bob_email = f"bob-{uuid.uuid4().hex[:6]}@example.org"
    card = anchors.partner.user(bob_email)
    anchors.entry(bob_email, listed=[card])
    reply, _ = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert reply.status == 201, reply.body[:300]
    issued = reply.json()
    assert issued["email"] == bob_email and issued["escrowed"] is True
    published = eventually(lambda: (v := records.ldap_values(anchors.slapd.url, bob_email)) and
                           len(v) == 2 and v, timeout=30, what="the new certificate in LDAP")
    assert card.der in published  # the partner's certificate stays, untouched

    # Bob's escrowed key does not come back to the partner's certificate: that needs one of ours.
    for path, payload in (("recover", {"all": True, "password": "pw-of-bob"}), ("certificates", {})):
        refused, before = post(anchors, path, as_user(card), payload)
        assert_refused(anchors, before, refused, 403, "own_ca_required")
        assert "needs a signature certificate from this server's CA" in refused.json()["detail"]


def test_an_anchor_limited_to_a_mail_domain_vouches_for_that_domain_only(anchors):
    carol_email = f"carol-{uuid.uuid4().hex[:6]}@example.org"
    card = anchors.eid.user(carol_email)
    anchors.entry(carol_email, listed=[card])
    refused, before = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert_refused(anchors, before, refused, 403, "anchor_not_allowed")

    dora_email = f"dora-{uuid.uuid4().hex[:6]}@eid.example"
    card = anchors.eid.user(dora_email)
    anchors.entry(dora_email, listed=[card])
    reply, _ = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert reply.status == 201, reply.body[:300]


def test_a_partner_certificate_revoked_in_its_crl_no_longer_authenticates(anchors):
    erin_email = f"erin-{uuid.uuid4().hex[:6]}@example.org"
    card = anchors.partner.user(erin_email)
    anchors.entry(erin_email, listed=[card])
    reply, _ = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert reply.status == 201, reply.body[:300]

    anchors.partner.revoke(card)
    anchors.partner.publish(anchors.crls)
    fetched = anchors.crls.fetches(anchors.partner.path)
    time.sleep(PARTNER_MAX_AGE + 0.5)  # every worker's cached CRL is now older than max_crl_age_seconds
    refused, before = post(anchors, "enroll", as_user(card), {**PAYLOAD, "replace": True})
    assert_refused(anchors, before, refused, 401, "certificate_revoked")
    assert anchors.crls.fetches(anchors.partner.path) > fetched  # the stale CRL was fetched again


def test_no_answer_from_the_crl_server_refuses(anchors):
    email = f"frank-{uuid.uuid4().hex[:6]}@example.org"
    card = anchors.dead.user(email)
    anchors.entry(email, listed=[card])
    refused, before = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert_refused(anchors, before, refused, 503, "revocation_unavailable")
    assert "try again later" in refused.json()["detail"] and refused.headers.get("retry-after")


def test_an_anchor_with_revocation_none_is_not_checked(anchors):
    email = f"gina-{uuid.uuid4().hex[:6]}@example.org"
    card = anchors.unchecked.user(email)  # its distribution point does not answer either
    anchors.entry(email, listed=[card])
    reply, _ = post(anchors, "enroll", as_user(card), PAYLOAD)
    assert reply.status == 201, reply.body[:300]
