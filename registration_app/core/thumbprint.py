"""The certificate thumbprint both sides of a request compute: the agent when it signs, the server when it
checks that the signature was made for this TLS channel."""

from __future__ import annotations

import base64
import hashlib

__all__ = ["thumbprint"]


def thumbprint(cert_der: bytes) -> str:
    """base64url (no padding) SHA-256 of a certificate's DER: the JWS `x5t#S256` of the agent's TLS certificate."""
    return base64.urlsafe_b64encode(hashlib.sha256(cert_der).digest()).rstrip(b"=").decode("ascii")
