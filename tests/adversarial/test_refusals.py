"""Hostile requests against the real running platform (gunicorn, TLS, client certificates, slapd).

Each must be refused with a 4xx RFC 9457 problem document carrying a stable `code`, leave a
`request.denied` row in the audit log with that code, and issue nothing: no certificate row, no escrow row.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from tests import pki
from tests.adversarial.conftest import b64std, b64url, es256, jws
from tests.fault import records

PAYLOAD = {"profile": "smime-encryption-ec", "password": "adversarial-password"}
PROBLEM = "application/problem+json"


def assert_refused(adv, before: dict, reply, status: int, code: str) -> None:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.content_type.startswith(PROBLEM), reply.content_type
    problem = reply.json()
    assert problem["code"] == code and problem["status"] == status, problem
    assert problem["detail"] and problem["title"]
    after = records.counts(adv.platform)
    assert (after["certificates"], after["escrow"]) == (before["certificates"], before["escrow"]), (before, after)
    denials = [e for e in records.audit_since(adv.platform, before["audit"]) if e.event == "request.denied"]
    assert [e.detail.get("code") for e in denials] == [code], [(e.event, e.detail) for e in denials]
    assert denials[0].outcome == "denied"


def signed(adv, conn, user=None, payload=None, *, sign=None, chain=None, **header) -> bytes:
    user = user or adv.entitled
    h = adv.header(conn, chain or user.chain, **header)
    return jws(h, PAYLOAD if payload is None else payload, sign or es256(user.key))


def csr_for(email: str, *, key=None, extensions=()) -> x509.CertificateSigningRequest:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, email)]))
               .add_extension(x509.SubjectAlternativeName([x509.RFC822Name(email)]), critical=False))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


def pem(csr) -> str:
    return csr.public_bytes(Encoding.PEM).decode()


# --- each case: (build the body over `conn`) -> (path, body, content type) -----------------------------

def forged_signature(adv, conn):
    return signed(adv, conn, sign=lambda data: es256(adv.entitled.key)(data + b"forged"))


def alg_none(adv, conn):
    return signed(adv, conn, alg="none", sign=lambda data: b"\x00")


def hs256_with_public_key(adv, conn):
    public = adv.entitled.key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    return signed(adv, conn, alg="HS256", sign=lambda data: hmac.new(public, data, hashlib.sha256).digest())


def x5c_self_signed(adv, conn):
    me = pki.make_self_signed_user(adv.entitled.email)
    return signed(adv, conn, chain=[me.cert], sign=es256(me.key))


def x5c_leaf_as_intermediate(adv, conn):
    leaf, fake_intermediate = pki.make_leaf_signed_chain(adv.ca, adv.entitled.email)
    return signed(adv, conn, chain=[leaf.cert, fake_intermediate.cert, adv.ca.cert], sign=es256(leaf.key))


def x5c_untrusted_root(adv, conn):
    evil = pki.make_ca("Autoenroll CA")  # same name as ours, different key
    user = pki.make_user_cert(evil, adv.entitled.email)
    return signed(adv, conn, chain=[user.cert, evil.cert], sign=es256(user.key))


def user_cert_expired(adv, conn):
    user = pki.make_user_cert(adv.ca, adv.entitled.email, not_before=pki.NOW - 400 * pki.DAY,
                              not_after=pki.NOW - pki.DAY)
    return signed(adv, conn, chain=[user.cert, adv.ca.cert], sign=es256(user.key))


def user_cert_not_yet_valid(adv, conn):
    user = pki.make_user_cert(adv.ca, adv.entitled.email, not_before=pki.NOW + pki.DAY,
                              not_after=pki.NOW + 30 * pki.DAY)
    return signed(adv, conn, chain=[user.cert, adv.ca.cert], sign=es256(user.key))


def bound_to_another_tls_cert(adv, conn):
    other = pki.make_agent_cert(pki.make_ca("Other TLS CA"), "agent.example.org")
    from registration_app.agent.jws import thumbprint
    return signed(adv, conn, **{"x5t#S256": thumbprint(other.der)})


def url_of_another_endpoint(adv, conn):
    return signed(adv, conn, url=conn.url("bootstrap"))


def url_of_another_host(adv, conn):
    return signed(adv, conn, url="https://ra.evil.example/api/v1/enroll")


def csr_for_someone_else(adv, conn):
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": pem(csr_for("alice@example.org"))})


def csr_with_bad_signature(adv, conn):
    der = bytearray(csr_for(adv.entitled.email).public_bytes(Encoding.DER))
    der[-5] ^= 0x01  # inside the signature value
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": b64std(bytes(der))})


def csr_with_disallowed_extension(adv, conn):
    csr = csr_for(adv.entitled.email, extensions=[(x509.BasicConstraints(ca=True, path_length=None), True)])
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": pem(csr)})


def csr_truncated_der(adv, conn):
    der = csr_for(adv.entitled.email).public_bytes(Encoding.DER)
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": b64std(der[:-12])})


def oversized_body(adv, conn):
    return b'{"protected":"' + b"A" * (64 * 1024) + b'","payload":"","signature":"AA"}'


def deeply_nested_body(adv, conn):
    return b"[" * 20000 + b"]" * 20000


def deeply_nested_payload(adv, conn):
    return signed(adv, conn, payload=b'{"a":' * 3000 + b"1" + b"}" * 3000)


def non_utf8_body(adv, conn):
    return b'{"protected":"\xff\xfe\xfd","payload":"","signature":"AA"}'


def non_utf8_payload(adv, conn):
    return signed(adv, conn, payload=b'{"profile":"\xff\xfe"}')


def x5c_truncated_der(adv, conn):
    h = adv.header(conn, adv.entitled.chain)
    h["x5c"][0] = b64std(adv.entitled.chain[0].public_bytes(Encoding.DER)[:-16])
    return jws(h, PAYLOAD, es256(adv.entitled.key))


def x5c_truncated_base64(adv, conn):
    h = adv.header(conn, adv.entitled.chain)
    h["x5c"][0] = h["x5c"][0][:-3]
    return jws(h, PAYLOAD, es256(adv.entitled.key))


def protected_truncated_base64url(adv, conn):
    document = json.loads(signed(adv, conn))
    length = len(document["protected"])
    document["protected"] = document["protected"][:((length - 2) // 4) * 4 + 1]  # a length no base64 has
    return json.dumps(document).encode()


CASES = [
    (forged_signature, 401, "bad_signature"),
    (alg_none, 400, "bad_algorithm"),
    (hs256_with_public_key, 400, "bad_algorithm"),
    (x5c_self_signed, 401, "untrusted_chain"),
    (x5c_leaf_as_intermediate, 401, "untrusted_chain"),
    (x5c_untrusted_root, 401, "untrusted_chain"),
    (user_cert_expired, 401, "certificate_expired"),
    (user_cert_not_yet_valid, 401, "certificate_expired"),
    (bound_to_another_tls_cert, 401, "binding_mismatch"),
    (url_of_another_endpoint, 401, "url_mismatch"),
    (url_of_another_host, 401, "url_mismatch"),
    (csr_for_someone_else, 403, "csr_mismatch"),
    (csr_with_bad_signature, 400, "malformed_csr"),
    (csr_with_disallowed_extension, 400, "malformed_csr"),
    (csr_truncated_der, 400, "malformed_csr"),
    (oversized_body, 413, "body_too_large"),
    (deeply_nested_body, 400, "malformed_json"),
    (deeply_nested_payload, 400, "malformed_json"),
    (non_utf8_body, 400, "malformed_json"),
    (non_utf8_payload, 400, "malformed_json"),
    (x5c_truncated_der, 400, "malformed_jws"),
    (x5c_truncated_base64, 400, "malformed_jws"),
    (protected_truncated_base64url, 400, "malformed_jws"),
]


@pytest.mark.parametrize("build,status,code", CASES, ids=[c[0].__name__ for c in CASES])
def test_refused_audited_and_nothing_issued(adversary, build, status, code):
    conn = adversary.connection()
    try:
        body = build(adversary, conn)
        before = records.counts(adversary.platform)
        reply = conn.post("enroll", body)
    finally:
        conn.close()
    assert_refused(adversary, before, reply, status, code)
    if code == "certificate_expired":  # the refusal says how to start again
        assert "enrollment code" in reply.json()["detail"]


def test_wrong_content_type_is_415(adversary):
    conn = adversary.connection()
    body = signed(adversary, conn)
    before = records.counts(adversary.platform)
    reply = conn.post("enroll", body, {"Content-Type": "text/plain"})
    conn.close()
    assert_refused(adversary, before, reply, 415, "wrong_content_type")


def test_replayed_nonce(adversary):
    """The first sending is refused late (not entitled: the nonce was consumed); the replay dies early."""
    conn = adversary.connection()
    body = signed(adversary, conn, user=adversary.unentitled)
    before = records.counts(adversary.platform)
    first = conn.post("enroll", body)
    assert_refused(adversary, before, first, 403, "not_entitled")
    before = records.counts(adversary.platform)
    replay = conn.post("enroll", body)
    conn.close()
    assert_refused(adversary, before, replay, 401, "bad_nonce")


def test_revoked_user_certificate(adversary):
    """A genuine signature certificate (invite + bootstrap through the agent), revoked by the operator."""
    user = adversary.user()
    code = adversary.platform.autoenroll("invite", user.email).stdout.strip()
    adversary.platform.agent("bootstrap", "--email", user.email, "--code", code)
    folder = adversary.platform.data / "agent-store" / user.email
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    key = load_pem_private_key((folder / "signature.key").read_bytes(), None)
    chain = x509.load_pem_x509_certificates((folder / "signature.pem").read_bytes())
    adversary.platform.autoenroll("revoke", format(chain[0].serial_number, "x"), "--reason", "keyCompromise")
    conn = adversary.connection()
    body = signed(adversary, conn, chain=chain, sign=es256(key))
    before = records.counts(adversary.platform)
    reply = conn.post("enroll", body)
    conn.close()
    assert_refused(adversary, before, reply, 401, "certificate_revoked")
    assert "enrollment code" in reply.json()["detail"]  # says how to start again: bootstrap


@pytest.mark.parametrize("email", ["*@example.org", "a)(mail=*@example.org", "x\\00@example.org",
                                   "x\x00@example.org", "*"], ids=["star", "close-open", "escaped-nul", "nul", "bare-star"])
def test_ldap_filter_injection_in_the_certificate_email(adversary, email):
    """A genuine certificate from our CA whose SAN email carries filter syntax: the escaped filter
    matches nobody (404 user_not_found) or the address is refused outright (400); an unescaped `*` would
    have matched every user (409 ambiguous_user) or one of them."""
    user = pki.make_user_cert(adversary.ca, email)
    conn = adversary.connection()
    body = signed(adversary, conn, chain=[user.cert, adversary.ca.cert], sign=es256(user.key))
    before = records.counts(adversary.platform)
    reply = conn.post("enroll", body)
    conn.close()
    code = reply.json().get("code") if reply.content_type.startswith(PROBLEM) else None
    assert code in {"user_not_found", "bad_request"}, (reply.status, reply.body[:300])
    assert_refused(adversary, before, reply, reply.status, code)


def test_no_client_certificate_over_tls(adversary):
    conn = adversary.connection(anonymous=True)
    before = records.counts(adversary.platform)
    reply = conn.post("enroll", b"{}")
    conn.close()
    assert_refused(adversary, before, reply, 401, "no_client_certificate")


def test_agent_certificate_from_another_ca_fails_the_tls_handshake(adversary, tmp_path):
    """gunicorn verifies client certificates against the TLS CA (cert_reqs optional): a certificate
    from another CA never gets an HTTP answer. The application refuses it too (next test)."""
    rogue = pki.make_agent_cert(pki.make_ca("Rogue TLS CA"), "agent.example.org")
    cert, key = tmp_path / "rogue.pem", tmp_path / "rogue.key"
    cert.write_bytes(rogue.pem)
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    key.write_bytes(rogue.key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    conn = adversary.connection(cert=cert, key=key)
    before = records.counts(adversary.platform)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        conn.nonce()
    conn.close()
    after = records.counts(adversary.platform)
    assert (after["certificates"], after["escrow"]) == (before["certificates"], before["escrow"])


def _in_process_enroll(adversary, in_process, agent_der: bytes, *, app=None):
    from registration_app.agent.jws import sign_user_request, thumbprint
    from registration_app.store.repos import issue_nonce
    flask_app, services = in_process
    app = app or flask_app
    base = adversary.platform.url
    body = sign_user_request(PAYLOAD, key=adversary.entitled.key, chain=list(adversary.entitled.chain),
                             nonce=issue_nonce(services.db, timedelta(minutes=5)), url=f"{base}/api/v1/enroll",
                             agent_thumbprint=thumbprint(agent_der))
    return app.test_client().post("/api/v1/enroll", data=body, base_url=base,
                                  environ_base={"autoenroll.peer_certificate": agent_der},
                                  headers={"Content-Type": "application/jose+json"})


class _Reply:
    """A Flask test response shaped like bench.client.Reply for assert_refused."""

    def __init__(self, response):
        self.status, self.body, self.content_type = response.status_code, response.data, response.content_type

    def json(self):
        return json.loads(self.body)


def test_agent_certificate_from_another_ca_is_refused_by_the_app(adversary, in_process):
    rogue = pki.make_agent_cert(pki.make_ca("Rogue TLS CA"), "agent.example.org")
    before = records.counts(adversary.platform)
    reply = _Reply(_in_process_enroll(adversary, in_process, rogue.der))
    assert_refused(adversary, before, reply, 401, "bad_client_certificate")


def test_agent_not_on_the_allow_list(adversary, in_process):
    """Same platform data, allow-list restricted to another agent: the genuine agent certificate is refused."""
    import dataclasses

    from registration_app.auth.agent import AgentPolicy
    from registration_app.web.app import create_app
    _app, services = in_process
    restricted = dataclasses.replace(services, agent_policy=AgentPolicy(
        anchors=services.agent_policy.anchors, allowed=frozenset({"other-agent.example.org"})))
    app = create_app(dataclasses.replace(services.settings, agents_allowed=frozenset({"other-agent.example.org"})),
                     restricted)
    agent_der = x509.load_pem_x509_certificate(adversary.platform.agent_cert.read_bytes()).public_bytes(Encoding.DER)
    before = records.counts(adversary.platform)
    reply = _Reply(_in_process_enroll(adversary, in_process, agent_der, app=app))
    assert_refused(adversary, before, reply, 403, "agent_not_allowed")


def test_control_a_genuine_request_is_issued(adversary):
    """The harness is right: the same construction, unmodified, gets a certificate."""
    user = adversary.user()
    conn = adversary.connection()
    reply = conn.post("enroll", signed(adversary, conn, user=user))
    conn.close()
    assert reply.status == 201, reply.body[:300]
    assert base64.b64decode(reply.json()["pkcs12"])
