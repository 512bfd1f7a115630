"""A small world for auth tests: a user PKI, an agent PKI, a nonce store, and JWS builders.

Hypothesis tests cannot use function-scoped fixtures, so the world is built once per session here and
the conftest hands it out; the mutable parts (nonces) are created fresh per test.
"""

from __future__ import annotations

import base64
import functools
import hmac
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

from registration_app.agent.jws import mac_bootstrap_request, sign_user_request
from registration_app.auth.agent import AgentPolicy, identify_agent
from registration_app.auth.anchors import AnchorPolicy
from registration_app.auth.chain import UserTrust
from registration_app.core.model import AgentIdentity
from bench import pki

URL = "https://ra.example.org/api/v1/enroll"
BOOTSTRAP_URL = "https://ra.example.org/api/v1/bootstrap"
CODE_ID = "code-1"
CODE_SECRET = b"0123456789abcdef0123456789abcdef"


class Nonces:
    """The nonce store's contract: consume returns True once per issued nonce."""

    def __init__(self) -> None:
        self.issued: set[str] = set()
        self.consumed: list[str] = []  # every call, in order, even refused ones

    def new(self) -> str:
        nonce = secrets.token_urlsafe(16)
        self.issued.add(nonce)
        return nonce

    def consume(self, nonce: str) -> bool:
        self.consumed.append(nonce)
        if nonce in self.issued:
            self.issued.remove(nonce)
            return True
        return False


@dataclass(frozen=True)
class World:
    root: pki.Issued
    intermediate: pki.Issued
    user: pki.Issued  # EC P-256, issued by the intermediate (ours)
    rsa_user: pki.Issued  # RSA-2048, issued by the root directly
    agent_ca: pki.Issued
    agent_cert: pki.Issued
    agent: AgentIdentity
    trust: UserTrust

    @property
    def user_chain(self) -> list[x509.Certificate]:
        return [self.user.cert, self.intermediate.cert]


@functools.lru_cache(maxsize=1)
def world() -> World:
    root = pki.make_ca("User Root")
    intermediate = pki.make_intermediate(root, "User Issuing CA", eku=(pki.EMAIL_PROTECTION,))
    agent_ca = pki.make_ca("Agent CA")
    agent_cert = pki.make_agent_cert(agent_ca, "mail.example.org")
    agent = identify_agent(
        agent_cert.der, AgentPolicy(anchors=(agent_ca.cert,), allowed=frozenset({"mail.example.org"})), pki.NOW
    )
    return World(
        root=root,
        intermediate=intermediate,
        user=pki.make_user_cert(intermediate, "Alice@Example.org"),
        rsa_user=pki.make_user_cert(root, "bob@example.org", key_type="rsa"),
        agent_ca=agent_ca,
        agent_cert=agent_cert,
        agent=agent,
        # The root's own users (rsa_user) are another anchor's; their revocation is not what these tests show.
        trust=UserTrust(anchors=(root.cert,), our_issuers=(intermediate.cert,),
                        external=(AnchorPolicy(name="test root", certificates=(root.cert,), revocation="none"),)),
    )


def never_revoked(cert: x509.Certificate) -> bool:
    return False


def signed_request(w: World, nonce: str, *, payload: dict | None = None, url: str = URL, **kwargs: Any) -> bytes:
    """A genuine request, as the agent code builds it."""
    args = dict(key=w.user.key, chain=w.user_chain, nonce=nonce, url=url, agent_thumbprint=w.agent.thumbprint)
    args.update(kwargs)
    return sign_user_request(payload if payload is not None else {"profile": "encryption"}, **args)


def bootstrap_request(w: World, nonce: str, *, secret: bytes = CODE_SECRET, code_id: str = CODE_ID,
                      url: str = BOOTSTRAP_URL, payload: dict | None = None) -> bytes:
    return mac_bootstrap_request(
        payload if payload is not None else {"profile": "signature"},
        code_id=code_id,
        secret=secret,
        nonce=nonce,
        url=url,
        agent_thumbprint=w.agent.thumbprint,
    )


# --- hand-built JWS, for what the agent code would never produce -------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64std(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def user_header(w: World, nonce: str, **overrides: Any) -> dict[str, Any]:
    header = {
        "alg": "ES256",
        "x5c": [b64std(w.user.der), b64std(w.intermediate.der)],
        "nonce": nonce,
        "url": URL,
        "x5t#S256": w.agent.thumbprint,
    }
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not _DROP}


_DROP = object()
DROP = _DROP  # use as an override value to leave a header parameter out


def raw_jws(header: Any, payload: bytes | str, sign: Callable[[bytes], bytes]) -> bytes:
    """Encode header and payload, sign `protected.payload` with `sign`, return the flattened JSON body."""
    protected = b64url(header if isinstance(header, bytes) else json.dumps(header).encode())
    payload_b64 = b64url(payload.encode() if isinstance(payload, str) else payload)
    signature = sign(f"{protected}.{payload_b64}".encode("ascii"))
    return json.dumps({"protected": protected, "payload": payload_b64, "signature": b64url(signature)}).encode()


def es256_signer(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    def sign(data: bytes) -> bytes:
        r, s = utils.decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def rs256_signer(key) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def hs256_signer(secret: bytes) -> Callable[[bytes], bytes]:
    return lambda data: hmac.new(secret, data, "sha256").digest()
