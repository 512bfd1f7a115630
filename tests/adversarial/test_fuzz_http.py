"""Property: whatever an agent sends to /api/v1/enroll, the answer is never a 5xx.

Over HTTP against the live server (AUTOENROLL_FUZZ_HTTP examples, default 150), and in-process through
create_app + Flask's test client with the agent's certificate in the WSGI environ (AUTOENROLL_FUZZ_APP,
default 1000). Inputs: raw bytes, arbitrary JSON, JWS-shaped objects with random members, and requests
correctly signed by an entitled user whose header fields or payload fields were replaced by random
values, so that the registration authority's own parsing (profile, password, replace, csr, ...) is
reached too.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.client import peer_environ
from tests.adversarial.conftest import es256, jws

HTTP_EXAMPLES = int(os.environ.get("AUTOENROLL_FUZZ_HTTP", "150"))
APP_EXAMPLES = int(os.environ.get("AUTOENROLL_FUZZ_APP", "1000"))
COMMON = dict(deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                     HealthCheck.data_too_large])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
payload_fields = st.fixed_dictionaries({}, optional={
    "profile": st.sampled_from(["smime-encryption-ec", "smime-signature", "smime-encryption", "nope"]) | json_values,
    "password": st.text(max_size=30) | json_values,
    "replace": st.booleans() | json_values,
    "pkcs12_legacy": st.booleans() | json_values,
    "csr": st.text(max_size=200) | json_values,
})
header_fields = st.fixed_dictionaries({}, optional={
    "alg": st.sampled_from(["ES256", "PS256", "RS256", "HS256", "none", "ES512"]) | json_values,
    "x5c": st.lists(st.text(max_size=60), max_size=3) | json_values,
    "nonce": st.text(max_size=40) | json_values,
    "url": st.text(max_size=60) | json_values,
    "x5t#S256": st.text(max_size=50) | json_values,
    "crit": json_values, "b64": json_values, "jwk": json_values, "kid": json_values,
})


@st.composite
def bodies(draw, signer):
    """(content type, body). `signer(header_overrides, payload) -> bytes` makes a correctly signed body."""
    kind = draw(st.integers(0, 4))
    if kind == 0:
        body = draw(st.binary(max_size=400))
    elif kind == 1:
        body = json.dumps(draw(json_values)).encode()
    elif kind == 2:
        members = draw(st.dictionaries(st.sampled_from(["protected", "payload", "signature", "header"]),
                                       st.text(alphabet="ABCDEFabcdef0123456789-_=+/", max_size=80) | json_values))
        body = json.dumps(members).encode()
    elif kind == 3:
        body = signer(draw(header_fields), {"profile": "smime-encryption-ec", "password": "fuzz-password"})
    else:
        body = signer({}, draw(payload_fields))
    content_type = draw(st.sampled_from(["application/jose+json", "application/jose+json", "application/json",
                                         "text/plain", ""]))
    return content_type, body


def _signer(adversary, nonce, url, thumbprint):
    user = adversary.entitled
    base = {"alg": "ES256", "x5c": [base64.b64encode(c.public_bytes(Encoding.DER)).decode()
                                    for c in user.chain]}

    def sign(overrides: dict, payload: dict) -> bytes:
        header = {**base, "nonce": nonce(), "url": url, "x5t#S256": thumbprint, **overrides}
        return jws(header, payload, es256(user.key))
    return sign


def check(status: int, content_type: str, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:
        assert content_type.startswith("application/problem+json"), content_type
        assert json.loads(body)["code"]


def test_fuzz_live_server_never_5xx(adversary):
    conn = adversary.connection()
    sign = _signer(adversary, conn.nonce, conn.url("enroll"), conn.thumbprint)

    @settings(max_examples=HTTP_EXAMPLES, **COMMON)
    @given(case=bodies(sign))
    def run(case):
        content_type, body = case
        reply = conn.post("enroll", body, {"Content-Type": content_type} if content_type else {})
        check(reply.status, reply.content_type, reply.body)

    try:
        run()
    finally:
        conn.close()


def test_fuzz_in_process_never_5xx(adversary, in_process):
    from registration_app.agent.jws import thumbprint
    from registration_app.store.repos import issue_nonce
    app, services = in_process
    client = app.test_client()
    base = adversary.platform.url
    agent_der = x509.load_pem_x509_certificate(adversary.platform.agent_cert.read_bytes()).public_bytes(Encoding.DER)
    environ = peer_environ(agent_der)
    sign = _signer(adversary, lambda: issue_nonce(services.db, timedelta(minutes=5)), f"{base}/api/v1/enroll",
                   thumbprint(agent_der))

    @settings(max_examples=APP_EXAMPLES, **COMMON)
    @given(case=bodies(sign))
    def run(case):
        content_type, body = case
        response = client.post("/api/v1/enroll", data=body, base_url=base, environ_base=environ,
                               headers={"Content-Type": content_type} if content_type else {})
        check(response.status_code, response.content_type or "", response.data)

    run()


pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
