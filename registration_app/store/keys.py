"""The server's secrets as the store uses them: kept out of the database (README, Server secrets).

- `nonce`: the MAC key of the stateless nonces (repos.py);
- `codes`: seals each enrollment code's MAC key (AES-256-GCM), so an `enrollment_codes` row alone cannot
  MAC a bootstrap request;
- `audit`: the HMAC-SHA256 key of the audit chain (audit.py) and of its checkpoint (anchor.py), so a
  consistent rewrite by someone who can write the database but lacks the key is detected.

The files are read by `authorities/pki_files.py` (`read_server_keys`); a process that lacks a key it is
asked to use refuses with a ConfigError that names the file, rather than writing something unverifiable.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.errors import ConfigError

# The files of the data folder, one key each, so that a split deployment copies to each host only the
# keys its role uses (wiring.py ROLE_KEYS).
KEY_FILES = {"nonce": "nonce.secret", "codes": "codes.secret", "audit": "audit.secret"}
CHECKPOINT_FILE = "audit.checkpoint"
KEY_BYTES = 32
_CODE_AAD = b"autoenroll enrollment code v1\0"
_GCM_NONCE = 12


@dataclass(frozen=True)
class StoreKeys:
    nonce: bytes | None = None
    codes: bytes | None = None
    audit: bytes | None = None
    checkpoint: Path | None = None  # where appends anchor the audit chain's head (anchor.py)

    def need(self, name: str) -> bytes:
        key = getattr(self, name)
        if key is None:
            raise ConfigError(f"this process has no {name} key ({KEY_FILES[name]} in the data folder): "
                              "run `autoenroll init`, or copy the file from where it ran (README, Server secrets)")
        return key


def seal_code_key(keys: StoreKeys, code_id: str, mac_key: bytes) -> bytes:
    nonce = secrets.token_bytes(_GCM_NONCE)
    return nonce + AESGCM(keys.need("codes")).encrypt(nonce, mac_key, _CODE_AAD + code_id.encode())


def unseal_code_key(keys: StoreKeys, code_id: str, sealed: bytes) -> bytes | None:
    """The MAC key, or None when the row was not sealed by us for this code id."""
    try:
        return AESGCM(keys.need("codes")).decrypt(sealed[:_GCM_NONCE], sealed[_GCM_NONCE:],
                                                 _CODE_AAD + code_id.encode())
    except (InvalidTag, ValueError):
        return None
