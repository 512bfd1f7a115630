"""One-time enrollment codes for the first signature certificate (like ACME external account binding).

The printed code is `<id>-<secret>`. Both sides derive the MAC key from the secret with HKDF; the
server stores only that derived key, so the printed code cannot be read back from the database.
"""

from __future__ import annotations

import base64
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import BadEnrollmentCode

_INFO = b"autoenroll enrollment code v1"


def _b32(data: bytes) -> str:
    return base64.b32encode(data).decode().rstrip("=").lower()


def new_code() -> tuple[str, str]:
    """Return (code id, printed code)."""
    code_id = _b32(secrets.token_bytes(5))
    return code_id, f"{code_id}-{_b32(secrets.token_bytes(20))}"


def parse_code(printed: str) -> tuple[str, bytes]:
    """Split a printed code into (id, MAC key)."""
    code_id, sep, secret = printed.strip().lower().partition("-")
    if not sep or len(code_id) != 8 or len(secret) != 32:
        raise BadEnrollmentCode("the enrollment code has the wrong form; copy it exactly as printed")
    return code_id, derive_mac_key(secret)


def derive_mac_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(secret.encode())
