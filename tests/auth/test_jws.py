import base64
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from registration_app.auth.chain import UserTrust
from registration_app.auth.jws import verify_bootstrap_request, verify_user_request
from registration_app.core.errors import (
    BadEnrollmentCode,
    BadNonce,
    BadSignature,
    BindingMismatch,
    CertificateExpired,
    CertificateRevoked,
    CertificateSuperseded,
    ConfigError,
    MalformedJSON,
    MalformedJWS,
    UnsupportedAlgorithm,
    UntrustedChain,
    UrlMismatch,
    WeakKey,
)
from registration_app.web.status import status_of
from bench import pki
from tests.auth.helpers import (
    BOOTSTRAP_URL,
    CODE_ID,
    CODE_SECRET,
    DROP,
    URL,
    b64std,
    b64url,
    bootstrap_request,
    es256_signer,
    hs256_signer,
    never_revoked,
    raw_jws,
    rs256_signer,
    signed_request,
    user_header,
)


def verify(w, nonces, body, *, url=URL, trust=None, is_revoked=never_revoked, now=pki.NOW):
    return verify_user_request(
        body,
        url=url,
        agent=w.agent,
        trust=trust or w.trust,
        consume_nonce=nonces.consume,
        is_revoked=is_revoked,
        now=now,
    )


def code_secret(code_id):
    return CODE_SECRET if code_id == CODE_ID else None


def verify_bootstrap(w, nonces, body, *, url=BOOTSTRAP_URL, secrets=code_secret):
    return verify_bootstrap_request(body, url=url, agent=w.agent, code_secret=secrets, consume_nonce=nonces.consume)


def replace_member(body: bytes, **members) -> bytes:
    document = json.loads(body)
    document.update(members)
    return json.dumps(document).encode()


# --- the happy paths -------------------------------------------------------------------------


def test_es256_request_from_the_agent_code(w, nonces):
    nonce = nonces.new()
    result = verify(w, nonces, signed_request(w, nonce, payload={"profile": "encryption", "n": [1, 2.5]}))
    assert result.payload == {"profile": "encryption", "n": [1, 2.5]}
    assert result.user.email == "Alice@Example.org"
    assert result.user.issuer_is_ours
    assert result.agent == w.agent
    assert result.protected["nonce"] == nonce
    assert nonces.consumed == [nonce]


def test_ps256_request_with_an_rsa_certificate(w, nonces):
    body = signed_request(w, nonces.new(), key=w.rsa_user.key, chain=[w.rsa_user.cert])
    assert json.loads(base64.urlsafe_b64decode(json.loads(body)["protected"] + "=="))["alg"] == "PS256"
    result = verify(w, nonces, body)
    assert result.user.email == "bob@example.org"
    assert result.user.issuer_is_ours is False


def test_rs256_request(w, nonces):
    header = user_header(w, nonces.new(), alg="RS256", x5c=[b64std(w.rsa_user.der)])
    assert verify(w, nonces, raw_jws(header, '{"a":1}', rs256_signer(w.rsa_user.key))).payload == {"a": 1}


def test_unknown_header_parameters_are_ignored(w, nonces):
    header = user_header(w, nonces.new(), typ="autoenroll+jws", future="x")
    result = verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))
    assert result.payload == {} and result.user.email == "Alice@Example.org"


def test_body_may_be_bytearray(w, nonces):
    result = verify(w, nonces, bytearray(signed_request(w, nonces.new())))
    assert result.payload == {"profile": "encryption"} and result.user.email == "Alice@Example.org"


# --- 1. JSON ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xff\xfe{}",
        b'{"protected": "\xc3"}',
        b"{",
        b"not json",
        b"[]",
        b'"a string"',
        b"42",
        b"null",
        b"\xef\xbb\xbf{}",  # a BOM
        b'{"a": NaN}',
        b'{"a": Infinity}',
        b'{"a": 1e999}',
        b'{"a": 1, "a": 2}',
        b'{"a": "\\ud800"}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a":' * 40 + b"1" + b"}" * 40,
        b'{"a": ' + b"1" * 5000 + b"}",
    ],
)
def test_malformed_json(w, nonces, body):
    with pytest.raises(MalformedJSON):
        verify(w, nonces, body)
    with pytest.raises(MalformedJSON):
        verify_bootstrap(w, nonces, body)


# --- 1. JWS shape ----------------------------------------------------------------------------


@pytest.fixture
def good(w, nonces):
    return signed_request(w, nonces.new())


@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_missing_member(w, nonces, good, member):
    document = json.loads(good)
    del document[member]
    with pytest.raises(MalformedJWS, match=member):
        verify(w, nonces, json.dumps(document).encode())


@pytest.mark.parametrize("value", [None, 1, ["x"], {"a": "b"}, True])
@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_member_is_not_a_string(w, nonces, good, member, value):
    with pytest.raises(MalformedJWS, match=member):
        verify(w, nonces, replace_member(good, **{member: value}))


@pytest.mark.parametrize("mutate", [
    lambda s: s + "=",  # padding
    lambda s: s + "==",
    lambda s: s[:5] + "+" + s[6:],  # standard alphabet
    lambda s: s[:5] + "/" + s[6:],
    lambda s: s[:5] + "." + s[6:],
    lambda s: s[:5] + " " + s[6:],
    lambda s: s[:5] + "é" + s[6:],
    lambda s: s + "A" * ((1 - len(s)) % 4 or 4),  # a length of 4n+1 is no base64 at all
])
@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_bad_base64url(w, nonces, good, member, mutate):
    document = json.loads(good)
    with pytest.raises(MalformedJWS, match=member):
        verify(w, nonces, replace_member(good, **{member: mutate(document[member])}))


def test_non_canonical_base64url_is_refused(w, nonces, good):
    """Stray bits in the last character would give a second encoding of the same signature."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    signature = json.loads(good)["signature"]  # 64 bytes: 86 characters, the last one has 4 stray bits
    assert len(signature) == 86 and alphabet.index(signature[-1]) % 16 == 0
    tweaked = signature[:-1] + alphabet[alphabet.index(signature[-1]) + 1]
    assert base64.urlsafe_b64decode(tweaked + "==") == base64.urlsafe_b64decode(signature + "==")
    with pytest.raises(MalformedJWS, match="canonical"):
        verify(w, nonces, replace_member(good, signature=tweaked))


def test_general_serialization_is_refused(w, nonces, good):
    document = json.loads(good)
    general = {"payload": document["payload"],
               "signatures": [{"protected": document["protected"], "signature": document["signature"]}]}
    with pytest.raises(MalformedJWS, match="flattened"):
        verify(w, nonces, json.dumps(general).encode())


def test_unprotected_header_is_refused(w, nonces, good):
    with pytest.raises(MalformedJWS, match="header"):
        verify(w, nonces, replace_member(good, header={"nonce": "x"}))


def test_empty_signature(w, nonces, good):
    with pytest.raises(MalformedJWS, match="signature"):
        verify(w, nonces, replace_member(good, signature=""))


@pytest.mark.parametrize("protected", [b"[]", b'"ES256"', b"null", b"{", b"\xff", b'{"alg":"ES256","alg":"ES256"}'])
def test_protected_header_must_be_a_json_object(w, nonces, good, protected):
    with pytest.raises(MalformedJWS, match="protected header"):
        verify(w, nonces, replace_member(good, protected=b64url(protected)))


# --- 2. algorithm ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "HS256", "HS384", "HS512", "ES384", "ES512", "RS512", "PS512",
                                 "EdDSA", "", "es256", 256, None, ["ES256"]])
def test_algorithm_not_allowed(w, nonces, alg):
    header = user_header(w, nonces.new(), alg=alg)
    with pytest.raises(UnsupportedAlgorithm) as caught:
        verify(w, nonces, raw_jws(header, "{}", lambda data: b"x"))
    for allowed in ("ES256", "PS256", "RS256"):
        assert allowed in caught.value.detail
    assert nonces.consumed == []


def test_missing_alg(w, nonces):
    header = user_header(w, nonces.new(), alg=DROP)
    with pytest.raises(MalformedJWS, match="alg"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


def test_alg_none_with_empty_signature(w, nonces):
    header = user_header(w, nonces.new(), alg="none")
    document = json.loads(raw_jws(header, "{}", lambda data: b"x"))
    document["signature"] = ""
    with pytest.raises((UnsupportedAlgorithm, MalformedJWS)):
        verify(w, nonces, json.dumps(document).encode())


def test_hs256_keyed_with_the_public_key_is_refused(w, nonces):
    """The classic confusion attack: MAC with the (public) certificate key as HMAC secret."""
    header = user_header(w, nonces.new(), alg="HS256")
    for public in (
        w.user.cert.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        w.user.cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        w.user.der,
    ):
        with pytest.raises(UnsupportedAlgorithm):
            verify(w, nonces, raw_jws(header, "{}", hs256_signer(public)))
    assert nonces.consumed == []


def test_es256_with_an_rsa_certificate(w, nonces):
    header = user_header(w, nonces.new(), alg="ES256", x5c=[b64std(w.rsa_user.der)])
    with pytest.raises(UnsupportedAlgorithm, match="RSA"):
        verify(w, nonces, raw_jws(header, "{}", lambda data: b"\x00" * 64))


@pytest.mark.parametrize("alg", ["RS256", "PS256"])
def test_rsa_algorithms_with_an_ec_certificate(w, nonces, alg):
    header = user_header(w, nonces.new(), alg=alg)
    with pytest.raises(UnsupportedAlgorithm, match="P-256|secp256r1"):
        verify(w, nonces, raw_jws(header, "{}", lambda data: b"\x00" * 256))


def test_es256_with_a_p384_certificate(w, nonces):
    p384_user = pki.make_user_cert(w.root, "eve@example.org", key_type="ec384")
    header = user_header(w, nonces.new(), x5c=[b64std(p384_user.der)])
    with pytest.raises(UnsupportedAlgorithm, match="secp384r1"):
        verify(w, nonces, raw_jws(header, "{}", lambda data: b"\x00" * 96))


# --- 2. required header fields ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["x5c", "nonce", "url", "x5t#S256"])
@pytest.mark.parametrize("value", [DROP, "", 7, None, {"a": 1}])
def test_required_header_field(w, nonces, name, value):
    if name == "x5c" and value == "":
        value = []
    header = user_header(w, nonces.new())
    header[name] = value
    if value is DROP:
        del header[name]
    with pytest.raises(MalformedJWS, match=name.replace("#", ".")):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))
    assert nonces.consumed == []


@pytest.mark.parametrize("x5c", [
    "single string",
    [7],
    ["not base64!"],
    ["QUJD"],  # base64 of "ABC": not a certificate
    [""],
])
def test_malformed_x5c(w, nonces, x5c):
    header = user_header(w, nonces.new(), x5c=x5c)
    with pytest.raises(MalformedJWS, match="x5c"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


def test_x5c_in_base64url_is_refused(w, nonces):
    # find a certificate whose base64 differs between the two alphabets
    der = w.user.der
    assert b64std(der) != b64url(der)
    header = user_header(w, nonces.new(), x5c=[b64url(der), b64std(w.intermediate.der)])
    with pytest.raises(MalformedJWS, match=r"x5c\[0\]"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


def test_x5c_limited_to_five_certificates(w, nonces):
    header = user_header(w, nonces.new(), x5c=[b64std(w.user.der)] + [b64std(w.intermediate.der)] * 5)
    with pytest.raises(MalformedJWS, match="at most 5"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


@pytest.mark.parametrize("extra", [{"crit": ["b64"], "b64": False}, {"b64": False}, {"crit": ["nonce"]}])
def test_processing_extensions_are_refused(w, nonces, extra):
    header = user_header(w, nonces.new(), **extra)
    with pytest.raises(MalformedJWS, match="crit|b64"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


@pytest.mark.parametrize("extra", [{"jku": "file:///etc/passwd"}, {"jwk": "x"}, {"kid": 5}, {"typ": ["a"]}])
def test_registered_parameters_need_their_registered_types(w, nonces, extra):
    header = user_header(w, nonces.new(), **extra)
    with pytest.raises(MalformedJWS):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))


# --- 3. chain --------------------------------------------------------------------------------


def test_untrusted_chain(w, nonces):
    mallory = pki.make_self_signed_user("alice@example.org")
    body = signed_request(w, nonces.new(), key=mallory.key, chain=[mallory.cert])
    with pytest.raises(UntrustedChain):
        verify(w, nonces, body)
    assert nonces.consumed == []


def test_expired_certificate(w, nonces):
    old = pki.make_user_cert(w.intermediate, "alice@example.org", not_before=pki.NOW - 400 * pki.DAY,
                             not_after=pki.NOW - pki.DAY)
    body = signed_request(w, nonces.new(), key=old.key, chain=[old.cert, w.intermediate.cert])
    with pytest.raises(CertificateExpired, match="enrollment code"):
        verify(w, nonces, body)
    assert nonces.consumed == []


def test_revoked_certificate(w, nonces):
    with pytest.raises(CertificateRevoked):
        verify(w, nonces, signed_request(w, nonces.new()), is_revoked=lambda cert: True)
    assert nonces.consumed == []


def test_leaf_signed_intermediate(w, nonces):
    leaf, fake = pki.make_leaf_signed_chain(w.root, "mallory@example.org")
    with pytest.raises(UntrustedChain):
        verify(w, nonces, signed_request(w, nonces.new(), key=leaf.key, chain=[leaf.cert, fake.cert]))


def test_other_trust_store(w, nonces):
    with pytest.raises(UntrustedChain):
        verify(w, nonces, signed_request(w, nonces.new()), trust=UserTrust(anchors=(pki.make_ca("Other").cert,)))


# --- 4. signature ----------------------------------------------------------------------------


def test_forged_signature_with_another_key(w, nonces):
    nonce = nonces.new()
    forger = pki.new_key("ec")
    body = raw_jws(user_header(w, nonce), '{"profile":"encryption"}', es256_signer(forger))
    with pytest.raises(BadSignature):
        verify(w, nonces, body)
    assert nonces.consumed == []  # a forged request cannot burn the nonce
    assert nonce in nonces.issued


def test_payload_swapped_after_signing(w, nonces, good):
    with pytest.raises(BadSignature):
        verify(w, nonces, replace_member(good, payload=b64url(b'{"profile":"admin"}')))
    assert nonces.consumed == []


def test_header_swapped_after_signing(w, nonces, good):
    header = json.loads(base64.urlsafe_b64decode(json.loads(good)["protected"] + "=="))
    header["url"] = "https://ra.example.org/api/v1/recover"
    with pytest.raises(BadSignature):
        verify(w, nonces, replace_member(good, protected=b64url(json.dumps(header).encode())),
               url="https://ra.example.org/api/v1/recover")
    assert nonces.consumed == []


@pytest.mark.parametrize("signature", [b"\x00", b"\x00" * 64, b"\x01" * 63, b"\xff" * 64, b"\x00" * 65, b"\x30" * 72])
def test_garbage_signature_bytes(w, nonces, good, signature):
    with pytest.raises(BadSignature):
        verify(w, nonces, replace_member(good, signature=b64url(signature)))
    assert nonces.consumed == []


def test_rsa_pkcs1_signature_is_not_a_pss_signature(w, nonces):
    header = user_header(w, nonces.new(), alg="PS256", x5c=[b64std(w.rsa_user.der)])
    body = raw_jws(header, "{}", rs256_signer(w.rsa_user.key))
    with pytest.raises(BadSignature):
        verify(w, nonces, body)


def test_pss_signature_is_not_a_pkcs1_signature(w, nonces):
    header = user_header(w, nonces.new(), alg="RS256", x5c=[b64std(w.rsa_user.der)])
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    body = raw_jws(header, "{}", lambda data: w.rsa_user.key.sign(data, pss, hashes.SHA256()))
    with pytest.raises(BadSignature):
        verify(w, nonces, body)


# --- 5. payload ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", ["", "[]", '"x"', "1", "null", "{", '{"a":1,"a":2}', b"\xff"])
def test_signed_payload_must_be_a_json_object(w, nonces, payload):
    body = raw_jws(user_header(w, nonces.new()), payload, es256_signer(w.user.key))
    with pytest.raises(MalformedJSON, match="payload"):
        verify(w, nonces, body)
    assert nonces.consumed == []


# --- 6. url and channel binding --------------------------------------------------------------


@pytest.mark.parametrize("url", [
    "https://ra.example.org/api/v1/recover",
    "https://ra.example.org/api/v1/enroll/",
    "http://ra.example.org/api/v1/enroll",
    "https://evil.example.org/api/v1/enroll",
])
def test_url_mismatch(w, nonces, url):
    with pytest.raises(UrlMismatch):
        verify(w, nonces, signed_request(w, nonces.new()), url=url)
    assert nonces.consumed == []


def test_bound_to_another_agent(w, nonces):
    other = pki.make_agent_cert(w.agent_ca, "other.example.org")
    from registration_app.agent.jws import thumbprint

    body = signed_request(w, nonces.new(), agent_thumbprint=thumbprint(other.der))
    with pytest.raises(BindingMismatch):
        verify(w, nonces, body)
    assert nonces.consumed == []


# --- 7. nonce --------------------------------------------------------------------------------


def test_replay_is_refused(w, nonces):
    body = signed_request(w, nonces.new())
    verify(w, nonces, body)
    with pytest.raises(BadNonce):
        verify(w, nonces, body)


def test_unknown_nonce(w, nonces):
    with pytest.raises(BadNonce, match="nonce"):
        verify(w, nonces, signed_request(w, "never-issued"))


def test_nonce_survives_a_rejected_request(w, nonces):
    nonce = nonces.new()
    with pytest.raises(UrlMismatch):
        verify(w, nonces, signed_request(w, nonce), url="https://ra.example.org/other")
    verify(w, nonces, signed_request(w, nonce))  # the same nonce still works for a genuine request


# --- bootstrap (enrollment code, HS256) ------------------------------------------------------


def test_bootstrap(w, nonces):
    nonce = nonces.new()
    payload, code_id = verify_bootstrap(w, nonces, bootstrap_request(w, nonce, payload={"csr": "x"}))
    assert (payload, code_id) == ({"csr": "x"}, CODE_ID)
    assert nonces.consumed == [nonce]


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "HS384", "HS512", "none", 1])
def test_bootstrap_only_hs256(w, nonces, alg):
    header = {"alg": alg, "kid": CODE_ID, "nonce": nonces.new(), "url": BOOTSTRAP_URL, "x5t#S256": w.agent.thumbprint}
    with pytest.raises(UnsupportedAlgorithm, match="HS256"):
        verify_bootstrap(w, nonces, raw_jws(header, "{}", hs256_signer(CODE_SECRET)))


def test_user_request_is_not_a_bootstrap_request(w, nonces):
    with pytest.raises(UnsupportedAlgorithm):
        verify_bootstrap(w, nonces, signed_request(w, nonces.new()))


def test_bootstrap_request_is_not_a_user_request(w, nonces):
    with pytest.raises(UnsupportedAlgorithm):
        verify(w, nonces, bootstrap_request(w, nonces.new()))


@pytest.mark.parametrize("name", ["kid", "nonce", "url", "x5t#S256"])
def test_bootstrap_required_fields(w, nonces, name):
    header = {"alg": "HS256", "kid": CODE_ID, "nonce": nonces.new(), "url": BOOTSTRAP_URL,
              "x5t#S256": w.agent.thumbprint}
    del header[name]
    with pytest.raises(MalformedJWS, match=name):
        verify_bootstrap(w, nonces, raw_jws(header, "{}", hs256_signer(CODE_SECRET)))


def test_unknown_enrollment_code(w, nonces):
    with pytest.raises(BadEnrollmentCode):
        verify_bootstrap(w, nonces, bootstrap_request(w, nonces.new(), code_id="code-2"))
    assert nonces.consumed == []


def test_wrong_enrollment_secret(w, nonces):
    nonce = nonces.new()
    with pytest.raises(BadEnrollmentCode):
        verify_bootstrap(w, nonces, bootstrap_request(w, nonce, secret=b"guessed-secret-guessed-secret!!!"))
    assert nonces.consumed == []
    assert nonce in nonces.issued


def test_bootstrap_mac_over_tampered_payload(w, nonces):
    body = bootstrap_request(w, nonces.new())
    with pytest.raises(BadEnrollmentCode):
        verify_bootstrap(w, nonces, replace_member(body, payload=b64url(b'{"profile":"admin"}')))


def test_bootstrap_replay(w, nonces):
    body = bootstrap_request(w, nonces.new())
    verify_bootstrap(w, nonces, body)
    with pytest.raises(BadNonce):
        verify_bootstrap(w, nonces, body)


def test_bootstrap_url_and_binding(w, nonces):
    with pytest.raises(UrlMismatch):
        verify_bootstrap(w, nonces, bootstrap_request(w, nonces.new()), url=URL)
    other = pki.make_agent_cert(w.agent_ca, "other.example.org")
    from registration_app.agent.jws import mac_bootstrap_request, thumbprint

    body = mac_bootstrap_request({}, code_id=CODE_ID, secret=CODE_SECRET, nonce=nonces.new(), url=BOOTSTRAP_URL,
                                 agent_thumbprint=thumbprint(other.der))
    with pytest.raises(BindingMismatch):
        verify_bootstrap(w, nonces, body)
    assert nonces.consumed == []


def test_short_code_secret_is_a_server_bug(w, nonces):
    body = raw_jws({"alg": "HS256", "kid": CODE_ID, "nonce": nonces.new(), "url": BOOTSTRAP_URL,
                    "x5t#S256": w.agent.thumbprint}, "{}", hs256_signer(b"short"))
    with pytest.raises(ConfigError):
        verify_bootstrap(w, nonces, body, secrets=lambda code_id: b"short")


# --- only x5c names the key -----------------------------------------------


def _another_jwk() -> dict:
    from joserfc.jwk import ECKey
    return ECKey.import_key(pki.new_key("ec").public_key()).as_dict()


@pytest.mark.parametrize("name,value", [
    ("jwk", None),  # a genuine JWK of another key, filled in below
    ("jku", "https://keys.evil.example/jwks.json"),
    ("x5u", "https://keys.evil.example/alice.pem"),
    ("x5t", "q3SOtFP4lKWyxvs-sJ9l-Wqw1Yc"),
    ("kid", "alice-other-key"),
])
def test_header_members_naming_another_key_are_refused(w, nonces, name, value):
    header = user_header(w, nonces.new(), **{name: value if value is not None else _another_jwk()})
    with pytest.raises(MalformedJWS, match=f"'{name}' is refused: the signing key is named by 'x5c' only"):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(w.user.key)))
    assert nonces.consumed == []


def test_the_channel_binding_thumbprint_is_not_a_key_member(w, nonces):
    """x5t#S256 names the agent's TLS certificate, not a signing key: it stays required and allowed."""
    result = verify(w, nonces, signed_request(w, nonces.new()))
    assert result.protected["x5t#S256"] == w.agent.thumbprint


@pytest.mark.parametrize("name", ["x5c", "jwk", "x5t"])
def test_a_bootstrap_names_its_key_by_kid_only(w, nonces, name):
    value = {"x5c": [b64std(w.user.der)], "jwk": _another_jwk(), "x5t": "q3SOtFP4lKWyxvs-sJ9l-Wqw1Yc"}[name]
    header = {"alg": "HS256", "kid": CODE_ID, "nonce": nonces.new(), "url": BOOTSTRAP_URL,
              "x5t#S256": w.agent.thumbprint, name: value}
    with pytest.raises(MalformedJWS, match=f"'{name}' is refused: the signing key is named by 'kid' only"):
        verify_bootstrap(w, nonces, raw_jws(header, "{}", hs256_signer(CODE_SECRET)))
    assert nonces.consumed == []


# --- the key policy ---------------------------------------------------------


def ps256_signer(key):
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
    return lambda data: key.sign(data, pss, hashes.SHA256())


class Counting:
    """A revocation (or successor) lookup that records what it was asked: how the tests see that no
    lookup happened. The answer is fixed; the lookup itself is a parameter of verify_user_request."""

    def __init__(self, answer=False) -> None:
        self.answer, self.asked = answer, []

    def __call__(self, item):
        self.asked.append(item)
        return self.answer


@pytest.mark.parametrize("alg,signer", [("RS256", rs256_signer), ("PS256", ps256_signer)])
def test_an_rsa_1024_user_certificate_is_refused(w, nonces, alg, signer):
    weak = pki.make_user_cert(w.root, "bob@example.org", key_type="rsa1024")
    revoked = Counting()
    header = user_header(w, nonces.new(), alg=alg, x5c=[b64std(weak.der)])
    with pytest.raises(WeakKey, match="RSA-1024"):
        verify(w, nonces, raw_jws(header, "{}", signer(weak.key)), is_revoked=revoked)
    assert revoked.asked == [] and nonces.consumed == []


@pytest.mark.parametrize("curve", [ec.SECP192R1(), ec.SECP256K1()], ids=["p192", "secp256k1"])
def test_a_user_certificate_on_a_weak_or_unknown_curve_is_refused(w, nonces, curve):
    weak = pki.make_user_cert(w.root, "bob@example.org", key=ec.generate_private_key(curve))
    header = user_header(w, nonces.new(), x5c=[b64std(weak.der)])
    with pytest.raises(WeakKey, match=curve.name):
        verify(w, nonces, raw_jws(header, "{}", lambda data: b"\x00" * 64))
    assert nonces.consumed == []


def test_a_weak_intermediate_in_x5c_is_refused(w, nonces):
    weak_ca = pki.make_intermediate(w.root, "Weak Issuing CA", key_type="rsa1024")
    user = pki.make_user_cert(weak_ca, "alice@example.org")
    body = signed_request(w, nonces.new(), key=user.key, chain=[user.cert, weak_ca.cert])
    with pytest.raises(WeakKey, match=r"x5c\[1\] is RSA-1024"):
        verify(w, nonces, body)
    assert nonces.consumed == []


# --- the signature first ----------------------------------------------------


def test_a_forged_signature_costs_no_revocation_lookup(w, nonces):
    """Anyone holding a user's public certificate (it is in LDAP) can send it: the signature is
    checked with its key before the chain is built or revocation is looked up (a database query, or
    an HTTP call to the CA in a split deployment)."""
    revoked, successor = Counting(), Counting(None)
    body = raw_jws(user_header(w, nonces.new()), '{"profile":"encryption"}', es256_signer(pki.new_key("ec")))
    with pytest.raises(BadSignature):
        verify_user_request(body, url=URL, agent=w.agent, trust=w.trust, consume_nonce=nonces.consume,
                            is_revoked=revoked, now=pki.NOW, successor_of=successor)
    assert revoked.asked == [] and successor.asked == [] and nonces.consumed == []


def test_a_forged_signature_over_an_untrusted_chain_is_a_bad_signature(w, nonces):
    mallory = pki.make_self_signed_user("alice@example.org")
    header = user_header(w, nonces.new(), x5c=[b64std(mallory.der)])
    with pytest.raises(BadSignature):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(pki.new_key("ec"))))


def test_revocation_is_asked_once_about_the_leaf_after_the_signature(w, nonces):
    revoked = Counting()
    verify(w, nonces, signed_request(w, nonces.new()), is_revoked=revoked)
    assert [cert.serial_number for cert in revoked.asked] == [w.user.cert.serial_number]


# --- a superseded certificate stops authenticating -------------------------


def test_a_superseded_certificate_no_longer_authenticates(w, nonces):
    successor = Counting("5eed")
    body = signed_request(w, nonces.new())
    with pytest.raises(CertificateSuperseded, match="superseded by serial 5eed") as refused:
        verify_user_request(body, url=URL, agent=w.agent, trust=w.trust, consume_nonce=nonces.consume,
                            is_revoked=never_revoked, now=pki.NOW, successor_of=successor)
    assert status_of(refused.value) == 401 and refused.value.extra == {"successor": "5eed"}
    assert successor.asked == [w.user.cert.serial_number]
    assert nonces.consumed == []  # refused before the nonce: the agent retries with the new key


def test_a_certificate_not_yet_superseded_authenticates(w, nonces):
    """`successor_of` answers None while the certificate is current or inside the grace period."""
    result = verify_user_request(signed_request(w, nonces.new()), url=URL, agent=w.agent, trust=w.trust,
                                 consume_nonce=nonces.consume, is_revoked=never_revoked, now=pki.NOW,
                                 successor_of=Counting(None))
    assert result.user.email == "Alice@Example.org"


def test_successors_are_looked_up_only_for_our_own_certificates(w, nonces):
    successor = Counting("5eed")
    body = signed_request(w, nonces.new(), key=w.rsa_user.key, chain=[w.rsa_user.cert])  # an external issuer
    verify_user_request(body, url=URL, agent=w.agent, trust=w.trust, consume_nonce=nonces.consume,
                        is_revoked=never_revoked, now=pki.NOW, successor_of=successor)
    assert successor.asked == []


def _with_crl_distribution_point(issued: pki.Issued, issuer: pki.Issued, url: str) -> pki.Issued:
    cert = issued.cert
    builder = (x509.CertificateBuilder().subject_name(cert.subject).issuer_name(cert.issuer)
               .public_key(cert.public_key()).serial_number(cert.serial_number)
               .not_valid_before(cert.not_valid_before_utc).not_valid_after(cert.not_valid_after_utc))
    for extension in cert.extensions:
        builder = builder.add_extension(extension.value, extension.critical)
    builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier(url)], None, None, None)]), critical=False)
    return pki.Issued(builder.sign(issuer.key, hashes.SHA256()), issued.key)


def test_a_forged_signature_costs_no_crl_download_for_an_external_anchor(w, nonces):
    """A partner CA's certificate is checked against its CRL over HTTP (chain.py): a forged request
    must not make the server download anything; the genuine one does, once."""
    from registration_app.auth.revocation import CrlChecker
    partner = pki.make_ca("Partner CA")
    url = "http://crl.partner.example/partner.crl"
    user = _with_crl_distribution_point(pki.make_user_cert(partner, "carol@example.org"), partner, url)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(partner.cert.subject)
           .last_update(pki.NOW - pki.DAY).next_update(pki.NOW + pki.DAY)
           .sign(partner.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    fetched = []

    def fetch(address: str, timeout: float) -> bytes:
        fetched.append(address)
        return crl

    trust = UserTrust(anchors=(w.root.cert, partner.cert), our_issuers=w.trust.our_issuers,
                      revocation=CrlChecker(fetch=fetch))
    header = user_header(w, nonces.new(), x5c=[b64std(user.der)])
    with pytest.raises(BadSignature):
        verify(w, nonces, raw_jws(header, "{}", es256_signer(pki.new_key("ec"))), trust=trust)
    assert fetched == []
    verify(w, nonces, signed_request(w, nonces.new(), key=user.key, chain=[user.cert]), trust=trust)
    assert fetched == [url]
