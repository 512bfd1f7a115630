"""The user server's side of request authentication: sign (or MAC) a request body as a flattened JWS.

The server side is registration_app/auth/jws.py; the two must agree on the header:
`alg`, `x5c` (user chain, standard base64 DER), `nonce`, `url`, `x5t#S256` (this agent's TLS certificate),
and for bootstrap `kid` (enrollment code id) with HS256.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jws as joserfc_jws
from joserfc.jwk import ECKey, OctKey, RSAKey
from joserfc.registry import HeaderParameter

from ..core.thumbprint import thumbprint

__all__ = ["sign_user_request", "mac_bootstrap_request", "thumbprint"]

_EXTRA_HEADERS = {
    "nonce": HeaderParameter("Anti-replay nonce", "str"),
    "url": HeaderParameter("Request URL", "str"),
}


def sign_user_request(
    payload: dict,
    *,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    chain: list[x509.Certificate],
    nonce: str,
    url: str,
    agent_thumbprint: str,
) -> bytes:
    """The request body, signed with the user's signature key: ES256 for EC P-256 keys, PS256 for RSA."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        alg, jwk = "ES256", ECKey.import_key(key)
    elif isinstance(key, rsa.RSAPrivateKey):
        alg, jwk = "PS256", RSAKey.import_key(key)
    else:
        raise ValueError("the user's key must be EC P-256 or RSA")
    if not chain:
        raise ValueError("the chain must contain at least the user's certificate")
    header = {
        "alg": alg,
        "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii") for cert in chain],
        "nonce": nonce,
        "url": url,
        "x5t#S256": agent_thumbprint,
    }
    return _serialize(header, payload, jwk)


def mac_bootstrap_request(
    payload: dict,
    *,
    code_id: str,
    secret: bytes,
    nonce: str,
    url: str,
    agent_thumbprint: str,
) -> bytes:
    """The first-enrollment request body, MACed (HS256) with the enrollment code's secret."""
    header = {"alg": "HS256", "kid": code_id, "nonce": nonce, "url": url, "x5t#S256": agent_thumbprint}
    return _serialize(header, payload, OctKey.import_key(secret))


def _serialize(header: dict[str, Any], payload: dict, key: Any) -> bytes:
    registry = joserfc_jws.JWSRegistry(header_registry=_EXTRA_HEADERS, algorithms=[header["alg"]])
    registry.max_header_length = 64 * 1024  # joserfc's 512-byte default does not fit an x5c chain
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    flattened = joserfc_jws.serialize_json({"protected": header}, body, key, registry=registry)
    return json.dumps(flattened, separators=(",", ":")).encode("ascii")
