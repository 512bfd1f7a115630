"""Envelope encryption of escrowed private keys for the key recovery authority (KRA).

Each private key is serialised as PKCS#8 DER and encrypted with a fresh AES-256-GCM data key; the data key
is wrapped with the KRA storage key (RSA-OAEP). The blob is self-describing:

    offset  size  field
    0       6     magic  b"AEKRA\\x00"
    6       1     version (1)
    7       1     algorithm: 2 = RSA-OAEP with SHA-1 and MGF1-SHA-1 key wrap + AES-256-GCM (every new
                  escrow); 1 = the same with SHA-256 and MGF1-SHA-256 (escrows sealed before; still opened)
    8       32    storage key id: SHA-256 of the storage public key's SubjectPublicKeyInfo DER
    40      2     length n of the wrapped data key, big-endian
    42      n     wrapped data key
    42+n    12    GCM nonce
    54+n    ...   ciphertext || 16-byte GCM tag

The GCM associated data is the blob header (bytes 0..40) followed by the caller's `aad` (see
`escrow_aad`), so a blob cannot be moved to another certificate, user or profile, nor have its header
rewritten, without `open_private_key` failing. The key id lets the KRA rotate its storage key: old blobs
name the key that can open them.

Why OAEP with SHA-1 for new escrows: it is the parameter set of CKM_RSA_PKCS_OAEP that every PKCS#11 module
implements (SoftHSM 2.6.1 implements no other), so a KRA key in a token unwraps inside the token, in the
module's own constant-time code. It is still sound for encryption: OAEP's security rests on the hash as a
random oracle (RFC 8017 keeps SHA-1 as its default), not on collision resistance, the only property of
SHA-1 that is broken.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..core.errors import AutoenrollError

MAGIC = b"AEKRA\x00"
VERSION = 1
ALG_RSA_OAEP_SHA256_AES256GCM = 1  # escrows sealed before algorithm 2
ALG_RSA_OAEP_SHA1_AES256GCM = 2
SEAL_ALGORITHM = ALG_RSA_OAEP_SHA1_AES256GCM  # what seal_private_key writes
ALGORITHMS = (ALG_RSA_OAEP_SHA256_AES256GCM, ALG_RSA_OAEP_SHA1_AES256GCM)  # what open_private_key reads
_HEADER = struct.Struct(">6sBB32s")
_NONCE_BYTES = 12
_OAEP = {
    ALG_RSA_OAEP_SHA256_AES256GCM: padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                                                label=None),
    ALG_RSA_OAEP_SHA1_AES256GCM: padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None),
}


class EscrowIntegrityError(AutoenrollError):
    code, title = "escrow_integrity", "The escrowed key is damaged or does not belong here"


def storage_key_id(storage_public_key: rsa.RSAPublicKey) -> bytes:
    """SHA-256 of the storage key's SubjectPublicKeyInfo: names the key that can open a blob."""
    spki = storage_public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def escrow_aad(serial: int, email: str, profile: str) -> bytes:
    """The canonical associated data of one escrowed key.

    The email is compared case-insensitively, as the directory's `mail` attribute is; the serial is a
    decimal string so that no JSON reader rounds it.
    """
    fields = {"email": email.strip().lower(), "profile": profile, "serial": str(int(serial))}
    return b"autoenroll-escrow-v1\x00" + json.dumps(
        fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    ).encode("ascii")


def seal_private_key(private_key, storage_public_key: rsa.RSAPublicKey, aad: bytes, *,
                     algorithm: int = SEAL_ALGORITHM) -> bytes:
    """Encrypt `private_key` for the KRA storage key, bound to `aad` (`algorithm`: SEAL_ALGORITHM; the
    older one only to show that such escrows still open)."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown escrow algorithm {algorithm}")
    if not isinstance(storage_public_key, rsa.RSAPublicKey) or storage_public_key.key_size < 2048:
        raise ValueError("the KRA storage key must be an RSA key of at least 2048 bits")
    plaintext = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(_NONCE_BYTES)
    wrapped = storage_public_key.encrypt(data_key, _OAEP[algorithm])
    header = _HEADER.pack(MAGIC, VERSION, algorithm, storage_key_id(storage_public_key))
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, header + aad)
    return header + struct.pack(">H", len(wrapped)) + wrapped + nonce + ciphertext


def escrow_algorithm(blob: bytes) -> int | None:
    """The algorithm byte a blob names (None if it is too short to name one)."""
    return blob[7] if len(blob) > 7 else None


def open_private_key(blob: bytes, storage_private_key: rsa.RSAPrivateKey, aad: bytes, *,
                     algorithms: tuple[int, ...] = ALGORITHMS):
    """Decrypt a blob from `seal_private_key` (of an algorithm among `algorithms`); any change to the blob
    or the aad raises EscrowIntegrityError."""
    blob = bytes(blob)
    if len(blob) < _HEADER.size + 2:
        raise EscrowIntegrityError("the escrow blob is truncated")
    magic, version, alg, key_id = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or alg not in algorithms:
        raise EscrowIntegrityError("the escrow blob has an unknown format")
    if key_id != storage_key_id(storage_private_key.public_key()):
        raise EscrowIntegrityError("the escrow blob was sealed for another storage key")
    offset = _HEADER.size
    (wrapped_len,) = struct.unpack_from(">H", blob, offset)
    offset += 2
    wrapped = blob[offset:offset + wrapped_len]
    offset += wrapped_len
    nonce = blob[offset:offset + _NONCE_BYTES]
    ciphertext = blob[offset + _NONCE_BYTES:]
    if len(wrapped) != wrapped_len or len(nonce) != _NONCE_BYTES or len(ciphertext) < 16:
        raise EscrowIntegrityError("the escrow blob is truncated")
    try:
        data_key = storage_private_key.decrypt(wrapped, _OAEP[alg])
        plaintext = AESGCM(data_key).decrypt(nonce, ciphertext, blob[:_HEADER.size] + aad)
    except (ValueError, InvalidTag):
        # One message for every failure: the caller learns nothing about which part was wrong.
        raise EscrowIntegrityError("the escrowed key failed its integrity check") from None
    try:
        return serialization.load_der_private_key(plaintext, password=None)
    except ValueError:
        raise EscrowIntegrityError("the escrowed key could not be parsed") from None
