"""Property: whatever the body, verification ends in an AutoenrollError with a 4xx status, never anything else.

Four families of input: raw bytes; arbitrary JSON; JWS-shaped objects with random members; and genuine
requests mutated byte-wise or re-signed (with the real key) after a header field was replaced, so that
the deep checks (chain, signature, url, binding, nonce) see hostile values too.
"""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from registration_app.auth.jws import verify_bootstrap_request, verify_user_request
from registration_app.core.errors import AutoenrollError
from registration_app.web.status import status_of
from bench import pki
from tests.auth.helpers import (
    BOOTSTRAP_URL,
    CODE_ID,
    CODE_SECRET,
    URL,
    Nonces,
    b64std,
    b64url,
    bootstrap_request,
    es256_signer,
    hs256_signer,
    never_revoked,
    raw_jws,
    signed_request,
    user_header,
    world,
)

FUZZ = settings(
    max_examples=1500,
    deadline=None,
    database=None,  # leave no .hypothesis folder behind in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

W = world()
GOOD_USER = signed_request(W, "fixed-nonce")
GOOD_BOOTSTRAP = bootstrap_request(W, "fixed-nonce")


def only_clean_errors(body) -> None:
    nonces = Nonces()
    nonces.issued.add("fixed-nonce")
    for verify in (_user, _bootstrap):
        try:
            verify(body, nonces)
        except AutoenrollError as error:
            assert 400 <= status_of(error) < 500, (type(error), status_of(error), error.detail)
            assert error.detail


def _user(body, nonces):
    verify_user_request(body, url=URL, agent=W.agent, trust=W.trust, consume_nonce=nonces.consume,
                        is_revoked=never_revoked, now=pki.NOW)


def _bootstrap(body, nonces):
    verify_bootstrap_request(body, url=BOOTSTRAP_URL, agent=W.agent,
                             code_secret=lambda kid: CODE_SECRET if kid == CODE_ID else None,
                             consume_nonce=nonces.consume)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=20,
)
b64_texts = st.binary(max_size=80).map(b64url)
member_values = st.one_of(json_values, b64_texts, json_values.map(lambda v: b64url(json.dumps(v).encode())))


@FUZZ
@given(st.binary(max_size=2000))
def test_random_bytes(body):
    only_clean_errors(body)


@FUZZ
@given(json_values)
def test_random_json(value):
    only_clean_errors(json.dumps(value).encode())


@FUZZ
@given(st.dictionaries(st.sampled_from(["protected", "payload", "signature", "header", "signatures"]),
                       member_values, max_size=5))
def test_random_jws_shapes(document):
    only_clean_errors(json.dumps(document).encode())


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, position, value in edits:
        if not buffer:
            break
        position %= len(buffer)
        if kind == 0:
            buffer[position] = value
        elif kind == 1:
            buffer.insert(position, value)
        else:
            del buffer[position]
    return bytes(buffer)


edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 1 << 16), st.integers(0, 255)), min_size=1, max_size=6)


@FUZZ
@given(st.sampled_from([GOOD_USER, GOOD_BOOTSTRAP]), edits)
def test_byte_mutations_of_genuine_requests(body, changes):
    only_clean_errors(_mutate(body, changes))


@FUZZ
@given(st.sampled_from(["protected", "payload", "signature"]), st.sampled_from([GOOD_USER, GOOD_BOOTSTRAP]), edits)
def test_member_mutations_of_genuine_requests(member, body, changes):
    """Mutate inside one decoded member and re-encode, so the base64 layer stays valid."""
    document = json.loads(body)
    raw = base64.urlsafe_b64decode(document[member] + "=" * (-len(document[member]) % 4))
    document[member] = b64url(_mutate(raw, changes))
    only_clean_errors(json.dumps(document).encode())


header_values = st.one_of(
    json_values,
    st.sampled_from(["ES256", "RS256", "PS256", "HS256", "none", "", URL, BOOTSTRAP_URL, "fixed-nonce", CODE_ID,
                     W.agent.thumbprint]),
    st.lists(st.sampled_from([b64std(W.user.der), b64std(W.intermediate.der), b64std(W.root.der),
                              b64std(W.rsa_user.der), "", "AAAA", b64url(W.user.der)]), max_size=7),
)
header_names = st.sampled_from(["alg", "x5c", "nonce", "url", "x5t#S256", "kid", "crit", "b64", "jku", "jwk",
                                "x5u", "x5t", "typ", "cty", "zip", "extra"])


@FUZZ
@given(st.dictionaries(header_names, header_values, max_size=4), st.sets(header_names, max_size=3),
       st.one_of(json_values.map(json.dumps), st.binary(max_size=40)))
def test_resigned_hostile_headers(replacements, removals, payload):
    """Genuinely signed (ES256 with the user's key, and HS256 with the code secret) but hostile headers."""
    header = user_header(W, "fixed-nonce", kid=CODE_ID)
    header.update(replacements)
    for name in removals:
        header.pop(name, None)
    only_clean_errors(raw_jws(header, payload, es256_signer(W.user.key)))
    only_clean_errors(raw_jws(header, payload, hs256_signer(CODE_SECRET)))


@pytest.mark.parametrize("body", [GOOD_USER, GOOD_BOOTSTRAP])
def test_the_genuine_requests_pass_one_of_the_two(body):
    nonces = Nonces()
    nonces.issued.add("fixed-nonce")
    outcomes = []
    for verify in (_user, _bootstrap):
        try:
            verify(body, nonces)
            outcomes.append("ok")
        except AutoenrollError as error:
            outcomes.append(error.code)
    assert outcomes.count("ok") == 1
