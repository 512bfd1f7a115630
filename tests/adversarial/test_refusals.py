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
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import NameOID

from bench.client import peer_environ
from bench import pki
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


def rs256(key):
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def ps256(key):
    return lambda data: key.sign(data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                                 hashes.SHA256())


# --- weak keys, a header naming another key, the signature checked first


def rsa_1024_user_certificate_rs256(adv, conn):
    weak = pki.make_user_cert(adv.ca, adv.entitled.email, key_type="rsa1024")
    return signed(adv, conn, chain=[weak.cert, adv.ca.cert], alg="RS256", sign=rs256(weak.key))


def rsa_1024_user_certificate_ps256(adv, conn):
    weak = pki.make_user_cert(adv.ca, adv.entitled.email, key_type="rsa1024")
    return signed(adv, conn, chain=[weak.cert, adv.ca.cert], alg="PS256", sign=ps256(weak.key))


def p192_user_certificate(adv, conn):
    weak = pki.make_user_cert(adv.ca, adv.entitled.email, key=ec.generate_private_key(ec.SECP192R1()))
    return signed(adv, conn, chain=[weak.cert, adv.ca.cert], sign=es256(weak.key))


def secp256k1_user_certificate(adv, conn):
    odd = pki.make_user_cert(adv.ca, adv.entitled.email, key=ec.generate_private_key(ec.SECP256K1()))
    return signed(adv, conn, chain=[odd.cert, adv.ca.cert], sign=es256(odd.key))


def rsa_1024_intermediate(adv, conn):
    weak_ca = pki.make_intermediate(adv.ca, "Weak Issuing CA", key_type="rsa1024")
    user = pki.make_user_cert(weak_ca, adv.entitled.email)
    return signed(adv, conn, chain=[user.cert, weak_ca.cert, adv.ca.cert], sign=es256(user.key))


def csr_with_an_rsa_1024_key(adv, conn):
    csr = csr_for(adv.entitled.email, key=pki.new_key("rsa1024"))
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": pem(csr)})


def csr_on_secp256k1(adv, conn):
    csr = csr_for(adv.entitled.email, key=ec.generate_private_key(ec.SECP256K1()))
    return signed(adv, conn, payload={"profile": "smime-signature", "csr": pem(csr)})


def jwk_of_another_key(adv, conn):
    from joserfc.jwk import ECKey
    other = ec.generate_private_key(ec.SECP256R1())
    return signed(adv, conn, jwk=ECKey.import_key(other.public_key()).as_dict())


def jku_pointing_elsewhere(adv, conn):
    return signed(adv, conn, jku="https://keys.evil.example/jwks.json")


def x5u_pointing_elsewhere(adv, conn):
    return signed(adv, conn, x5u="https://keys.evil.example/alice.pem")


def x5t_of_another_certificate(adv, conn):
    other = pki.make_user_cert(adv.ca, adv.entitled.email)
    return signed(adv, conn, x5t=b64url(hashlib.sha1(other.der).digest()))  # noqa: S324 (the header's hash)


def kid_naming_another_key(adv, conn):
    return signed(adv, conn, kid="alice-2019")


def forged_signature_over_an_untrusted_chain(adv, conn):
    """Checked with the leaf's key before the chain: bad_signature, not untrusted_chain."""
    evil = pki.make_ca("Autoenroll CA")
    user = pki.make_user_cert(evil, adv.entitled.email)
    return signed(adv, conn, chain=[user.cert, evil.cert], sign=es256(ec.generate_private_key(ec.SECP256R1())))


def forged_signature_over_an_expired_certificate(adv, conn):
    user = pki.make_user_cert(adv.ca, adv.entitled.email, not_before=pki.NOW - 400 * pki.DAY,
                              not_after=pki.NOW - pki.DAY)
    return signed(adv, conn, chain=[user.cert, adv.ca.cert], sign=es256(adv.entitled.key))


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
    (rsa_1024_user_certificate_rs256, 400, "weak_key"),
    (rsa_1024_user_certificate_ps256, 400, "weak_key"),
    (p192_user_certificate, 400, "weak_key"),
    (secp256k1_user_certificate, 400, "weak_key"),
    (rsa_1024_intermediate, 400, "weak_key"),
    (csr_with_an_rsa_1024_key, 400, "weak_key"),
    (csr_on_secp256k1, 400, "weak_key"),
    (jwk_of_another_key, 400, "malformed_jws"),
    (jku_pointing_elsewhere, 400, "malformed_jws"),
    (x5u_pointing_elsewhere, 400, "malformed_jws"),
    (x5t_of_another_certificate, 400, "malformed_jws"),
    (kid_naming_another_key, 400, "malformed_jws"),
    (forged_signature_over_an_untrusted_chain, 401, "bad_signature"),
    (forged_signature_over_an_expired_certificate, 401, "bad_signature"),
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
                                  environ_base=peer_environ(agent_der),
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


# --- a body over the limit is 413 whatever its framing ---------------------------

LIMIT = 64 * 1024  # max_body_bytes, the default


def post_chunked(conn, path: str, body: bytes, chunk: int = 4096):
    """http.client sends an iterable body with Transfer-Encoding: chunked and no Content-Length. A list,
    not a generator: when the server hangs up mid-body, the connection's one resend starts from the first
    chunk again (a spent generator sent the rest alone, a whitespace body that failed as malformed JSON)."""
    chunks = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    return conn.request("POST", f"/api/v1/{path}", chunks, {"Content-Type": "application/jose+json"})


def test_a_chunked_body_over_the_limit_is_413_and_never_acted_on(adversary):
    """The attack of the issue: a genuine signed enrollment padded past the limit with whitespace (so
    that its first 64 KiB are still a valid JWS) and sent chunked was cut at the limit and issued."""
    user = adversary.user()
    conn = adversary.connection()
    try:
        genuine = signed(adversary, conn, user=user)
        padded = genuine + b" " * (LIMIT + 1 - len(genuine))
        assert len(padded) == LIMIT + 1 and json.loads(padded[:LIMIT])  # what a truncating reader would act on
        ldap_before = records.ldap_values(adversary.ldap_url, user.email)
        before = records.counts(adversary.platform)
        reply = post_chunked(conn, "enroll", padded)
        assert_refused(adversary, before, reply, 413, "body_too_large")
        assert records.ldap_values(adversary.ldap_url, user.email) == ldap_before
        # The same connection goes on (gunicorn read past the refused body), and a chunked body of
        # exactly the limit is read whole and acted on: the limit is the only difference.
        exact = signed(adversary, conn, user=user)
        reply = post_chunked(conn, "enroll", exact + b" " * (LIMIT - len(exact)))
    finally:
        conn.close()
    assert reply.status == 201, reply.body[:300]
    assert records.ldap_values(adversary.ldap_url, user.email) != ldap_before


def test_a_chunked_body_far_over_the_limit_is_413(adversary):
    conn = adversary.connection()
    try:
        before = records.counts(adversary.platform)
        reply = post_chunked(conn, "enroll", signed(adversary, conn) + b" " * (4 * LIMIT), chunk=60000)
    finally:
        conn.close()
    assert_refused(adversary, before, reply, 413, "body_too_large")


# --- the key policy for agents' TLS certificates and officers -------------------


def tls_ca(platform) -> pki.Issued:
    from registration_app.authorities.pki_files import read_cert, read_private_key
    return pki.Issued(read_cert(platform.data / "tls-ca.pem"),
                      read_private_key(platform.data / "tls-ca.key", platform.passphrase))


@pytest.mark.parametrize("key", [pki.new_key("rsa1024"), ec.generate_private_key(ec.SECP192R1())],
                         ids=["rsa1024", "p192"])
def test_an_agent_certificate_with_a_weak_key_is_refused_by_the_app(adversary, in_process, key):
    """From the platform's own TLS CA, so that only its key is wrong. (A TLS stack at OpenSSL's default
    security level may refuse it in the handshake already; the application does not rely on that, and a
    proxy forwards whatever it received.)"""
    weak = pki.make_agent_cert(tls_ca(adversary.platform), "agent.example.org", key=key)
    before = records.counts(adversary.platform)
    reply = _Reply(_in_process_enroll(adversary, in_process, weak.der))
    assert_refused(adversary, before, reply, 400, "weak_key")


def test_an_officer_request_signed_with_a_weak_key_is_refused(adversary):
    weak = pki.make_user_cert(adversary.ca, adversary.entitled.email, key_type="rsa1024")
    conn = adversary.connection()
    try:
        body = signed(adversary, conn, chain=[weak.cert, adversary.ca.cert], alg="RS256", sign=rs256(weak.key),
                      path="recovery-requests", payload={"email": adversary.unentitled.email, "all": True,
                                                         "reason": "weak key test"})
        before = records.counts(adversary.platform)
        reply = conn.post("recovery-requests", body)
    finally:
        conn.close()
    assert_refused(adversary, before, reply, 400, "weak_key")


# --- the signed url is the configured public URL, not the Host header ---------


def test_a_request_signed_for_the_host_header_it_sends_is_refused(adversary):
    """Before, the signed url was compared with request.url, built from the client's Host header: a
    request signed for another server's URL passed when it also sent that server's Host."""
    conn = adversary.connection()
    try:
        body = signed(adversary, conn, url="https://ra.evil.example/api/v1/enroll")
        before = records.counts(adversary.platform)
        reply = conn.request("POST", "/api/v1/enroll", body,
                             {"Content-Type": "application/jose+json", "Host": "ra.evil.example"})
    finally:
        conn.close()
    assert_refused(adversary, before, reply, 401, "url_mismatch")
    assert adversary.platform.url in reply.json()["detail"]  # says which URL it expected


def test_the_host_header_does_not_matter_for_a_request_signed_for_the_public_url(adversary):
    user = adversary.user()
    conn = adversary.connection()
    try:
        reply = conn.request("POST", "/api/v1/enroll", signed(adversary, conn, user=user),
                             {"Content-Type": "application/jose+json", "Host": "127.0.0.1"})
    finally:
        conn.close()
    assert reply.status == 201, reply.body[:300]


# --- behind a trusted TLS-terminating proxy --------------------------------------


def forwarded(cert_pem: bytes) -> dict:
    from urllib.parse import quote
    return {"X-Client-Cert": quote(cert_pem.decode())}


def proxied_enroll(conn, user, headers: dict, *, thumbprint: str):
    from registration_app.agent.jws import sign_user_request
    nonce = conn.request("GET", "/api/v1/nonce", None, headers)
    assert nonce.status == 200, nonce.body[:300]
    body = sign_user_request(PAYLOAD, key=user.key, chain=list(user.chain), nonce=nonce.json()["nonce"],
                             url=conn.url("enroll"), agent_thumbprint=thumbprint)
    return conn.request("POST", "/api/v1/enroll", body, {"Content-Type": "application/jose+json", **headers})


def test_behind_the_proxy_the_forwarded_certificate_is_the_agent(behind_proxy):
    """The proxy's own connection is anonymous TLS; the agent's certificate comes in X-Client-Cert."""
    from registration_app.agent.jws import thumbprint
    agent_pem = behind_proxy.platform.agent_cert.read_bytes()
    agent_der = x509.load_pem_x509_certificate(agent_pem).public_bytes(Encoding.DER)
    user = behind_proxy.user()  # in the directory, certificate from this platform's CA
    conn = behind_proxy.connection(anonymous=True)
    try:
        reply = proxied_enroll(conn, user, forwarded(agent_pem), thumbprint=thumbprint(agent_der))
    finally:
        conn.close()
    assert reply.status == 201, reply.body[:300]


def test_behind_the_proxy_no_forwarded_certificate_means_none(behind_proxy):
    """The request comes from the proxy's address over TLS with a perfectly good client certificate
    (the agent's), but without X-Client-Cert: the socket's peer is the proxy, never the client."""
    conn = behind_proxy.connection()  # TLS with the agent certificate
    try:
        before = records.counts(behind_proxy.platform)
        reply = conn.request("GET", "/api/v1/nonce")
    finally:
        conn.close()
    assert_refused(behind_proxy, before, reply, 401, "no_client_certificate")


@pytest.mark.parametrize("header,code", [
    ("-----BEGIN CERTIFICATE-----%0Agarbage%0A-----END CERTIFICATE-----", "bad_client_certificate"),
    (None, "bad_client_certificate"),  # a certificate from another CA, filled in below
], ids=["unparseable", "other-ca"])
def test_behind_the_proxy_a_bad_forwarded_certificate_is_refused(behind_proxy, header, code):
    if header is None:
        header = forwarded(pki.make_agent_cert(pki.make_ca("Rogue TLS CA"), "agent.example.org").pem)["X-Client-Cert"]
    conn = behind_proxy.connection(anonymous=True)
    try:
        before = records.counts(behind_proxy.platform)
        reply = conn.request("GET", "/api/v1/nonce", None, {"X-Client-Cert": header})
    finally:
        conn.close()
    assert_refused(behind_proxy, before, reply, 401, code)


# --- a superseded signature certificate stops authenticating ---------------------


def test_a_renewed_signature_key_no_longer_authenticates(adversary):
    """Through the agent: bootstrap, then renew the signature certificate; the old key is refused with
    401 naming the successor (this platform has no grace period), and the new one works."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from registration_app.auth.request_checks import RequestChecks
    user = adversary.user()
    code = adversary.platform.autoenroll("invite", user.email).stdout.strip()
    adversary.platform.agent("bootstrap", "--email", user.email, "--code", code)
    folder = adversary.platform.data / "agent-store" / user.email
    old_key = load_pem_private_key((folder / "signature.key").read_bytes(), None)
    old_chain = x509.load_pem_x509_certificates((folder / "signature.pem").read_bytes())
    adversary.platform.agent("renew", "--email", user.email, "--profile", "smime-signature", "--force")
    new_serial = json.loads((folder / "state.json").read_text())["current"]["smime-signature"]
    assert new_serial != format(old_chain[0].serial_number, "x")

    conn = adversary.connection()
    try:
        body = signed(adversary, conn, chain=old_chain, sign=es256(old_key))
        before = records.counts(adversary.platform)
        reply = conn.post("enroll", body)
    finally:
        conn.close()
    assert_refused(adversary, before, reply, 401, "certificate_superseded")
    assert f"superseded by serial {new_serial}" in reply.json()["detail"]
    assert reply.json()["successor"] == new_serial
    adversary.platform.agent("enroll", "--email", user.email, "--profile", "smime-encryption-ec")  # the new key

    # With a grace period (production: superseded_grace_seconds), the old key keeps working until the
    # successor is that old: the same lookup, at chosen moments.
    (successor,) = [c for c in records.certificates(adversary.platform) if c.serial == new_serial]
    db = records.database(adversary.platform)
    try:
        old = old_chain[0].serial_number
        grace = timedelta(minutes=10)
        checks = RequestChecks.read(db, "", None, ca_is_revoked=lambda cert: False)
        assert checks.successor_of(successor.issued_at + grace - timedelta(seconds=1), grace)(old) is None
        assert checks.successor_of(successor.issued_at + grace, grace)(old) == new_serial
        assert checks.successor_of(successor.issued_at + grace, grace)(int(new_serial, 16)) is None
    finally:
        db.dispose()


# --- /health and the Replay-Nonce hook -----------------------------------------------


def test_health_tells_anonymous_callers_only_up_or_down(adversary):
    anonymous = adversary.connection(anonymous=True)
    agent = adversary.connection()
    try:
        public = anonymous.request("GET", "/health")
        detailed = agent.request("GET", "/health")
    finally:
        anonymous.close()
        agent.close()
    assert (public.status, public.json()) == (200, {"status": "up"})
    assert detailed.status == 200 and detailed.json()["status"] == "up"
    assert {k: v for k, v in detailed.json()["checks"].items() if k != "outbox"} == {
        "database": "ok", "directory": "ok", "key_store": "ok"}


class CountingDirectory:
    """The platform's real LDAP directory, counting the binds /health makes through it."""

    def __init__(self, directory) -> None:
        self.directory, self.searches = directory, 0

    def check_bind(self):
        self.searches += 1
        return self.directory.check_bind()

    def __getattr__(self, name):
        return getattr(self.directory, name)


def test_health_checks_are_cached_so_anonymous_calls_cost_no_ldap_bind(adversary, in_process):
    import dataclasses

    from registration_app.web.app import create_app
    _app, services = in_process
    directory = CountingDirectory(services.directory)
    app = create_app(services.settings, dataclasses.replace(services, directory=directory))
    clock = [1000.0]
    cache = app.extensions["autoenroll.health"]
    cache.clock = lambda: clock[0]
    client = app.test_client()
    answers = [client.get("/health") for _ in range(5)]
    assert [(a.status_code, a.get_json()) for a in answers] == [(200, {"status": "up"})] * 5
    assert directory.searches == 1
    clock[0] += cache.ttl - 0.1
    client.get("/health")
    assert directory.searches == 1
    clock[0] += 0.1
    client.get("/health")
    assert directory.searches == 2


def test_a_failing_replay_nonce_is_logged_once_and_the_answer_stands(adversary, in_process, caplog):
    """Issuing the next nonce fails (here: a nonce lifetime no date can hold); the refusal is still
    answered, and the failure is one structured log line instead of silence."""
    import dataclasses
    import logging

    from registration_app.web.app import create_app
    _app, services = in_process
    broken = dataclasses.replace(services.settings, nonce_ttl_seconds=10 ** 12)
    app = create_app(broken, dataclasses.replace(services, settings=broken))
    agent_der = x509.load_pem_x509_certificate(adversary.platform.agent_cert.read_bytes()).public_bytes(Encoding.DER)
    with caplog.at_level(logging.WARNING, logger="autoenroll.web"):
        response = app.test_client().post("/api/v1/enroll", data=b"{}", base_url=adversary.platform.url,
                                          environ_base=peer_environ(agent_der),
                                          headers={"Content-Type": "application/jose+json"})
    assert response.status_code == 400 and "Replay-Nonce" not in response.headers
    lines = [r for r in caplog.records if r.getMessage().startswith("event=replay_nonce.failed")]
    assert len(lines) == 1 and lines[0].exc_info is None
    assert "OverflowError" in lines[0].getMessage() and "request_id=" in lines[0].getMessage()


def test_behind_the_proxy_a_forwarded_agent_certificate_with_a_weak_key_is_refused(behind_proxy):
    """gunicorn's OpenSSL refuses an RSA-1024 client certificate in the handshake already, but a proxy
    forwards whatever its own TLS stack accepted: the key policy holds there too."""
    weak = pki.make_agent_cert(tls_ca(behind_proxy.platform), "agent.example.org", key_type="rsa1024")
    conn = behind_proxy.connection(anonymous=True)
    try:
        before = records.counts(behind_proxy.platform)
        reply = conn.request("GET", "/api/v1/nonce", None, forwarded(weak.pem))
    finally:
        conn.close()
    assert_refused(behind_proxy, before, reply, 400, "weak_key")
    assert "RSA-1024" in reply.json()["detail"]


def test_health_answers_down_when_the_database_does_not(adversary, in_process, tmp_path):
    """A database that cannot be opened (its folder does not exist): 503 down, for an agent too (its
    certificate cannot be checked against the revocation list), never a 500."""
    import dataclasses

    from registration_app.store.db import Database
    from registration_app.web.app import create_app
    _app, services = in_process
    unreachable = Database(f"sqlite:///{tmp_path / 'missing' / 'autoenroll.db'}")
    try:
        app = create_app(services.settings, dataclasses.replace(services, db=unreachable))
        agent_der = x509.load_pem_x509_certificate(adversary.platform.agent_cert.read_bytes()).public_bytes(
            Encoding.DER)
        anonymous = app.test_client().get("/health")
        agent = app.test_client().get("/health", environ_base=peer_environ(agent_der))
    finally:
        unreachable.dispose()
    assert (anonymous.status_code, anonymous.get_json()) == (503, {"status": "down", "failing": ["database"]})
    assert (agent.status_code, agent.get_json()) == (503, {"status": "down", "failing": ["database"]})


def test_a_malformed_chunked_body_is_a_400_problem(adversary):
    """A chunk size that is not hexadecimal: refused before any route runs, as a problem document and an
    audited refusal (it used to surface inside the route as a 500)."""
    import http.client

    from bench.client import Reply
    conn = http.client.HTTPSConnection("localhost", int(adversary.platform.url.rsplit(":", 1)[1]),
                                       context=adversary.connection().context, timeout=30)
    try:
        before = records.counts(adversary.platform)
        conn.putrequest("POST", "/api/v1/enroll")
        conn.putheader("Content-Type", "application/jose+json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        conn.send(b"zz\r\n" + b"{" * 16 + b"\r\n0\r\n\r\n")
        response = conn.getresponse()
        reply = Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read(), 0.0)
    finally:
        conn.close()
    assert_refused(adversary, before, reply, 400, "bad_request")
    assert "chunked request body is malformed" in reply.json()["detail"]
