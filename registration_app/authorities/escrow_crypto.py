"""Envelope encryption of escrowed private keys for the key recovery authority (KRA).

Each private key is serialised as PKCS#8 DER and encrypted with a fresh AES-256-GCM data key; the data key
is wrapped with the KRA storage key (RSA-OAEP, SHA-256, MGF1-SHA-256). The blob is self-describing:

    offset  size  field
    0       6     magic  b"AEKRA\\x00"
    6       1     version (1)
    7       1     algorithm (1 = RSA-OAEP-SHA256 key wrap + AES-256-GCM)
    8       32    storage key id: SHA-256 of the storage public key's SubjectPublicKeyInfo DER
    40      2     length n of the wrapped data key, big-endian
    42      n     wrapped data key
    42+n    12    GCM nonce
    54+n    ...   ciphertext || 16-byte GCM tag

The GCM associated data is the blob header (bytes 0..40) followed by the caller's `aad` (see
`escrow_aad`), so a blob cannot be moved to another certificate, user or profile, nor have its header
rewritten, without `open_private_key` failing. The key id lets the KRA rotate its storage key: old blobs
name the key that can open them.
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
ALG_RSA_OAEP_SHA256_AES256GCM = 1
_HEADER = struct.Struct(">6sBB32s")
_NONCE_BYTES = 12
_OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


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


def seal_private_key(private_key, storage_public_key: rsa.RSAPublicKey, aad: bytes) -> bytes:
    """Encrypt `private_key` for the KRA storage key, bound to `aad`."""
    if not isinstance(storage_public_key, rsa.RSAPublicKey) or storage_public_key.key_size < 2048:
        raise ValueError("the KRA storage key must be an RSA key of at least 2048 bits")
    plaintext = private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    data_key = AESGCM.generate_key(bit_length=256)
    nonce = os.urandom(_NONCE_BYTES)
    wrapped = storage_public_key.encrypt(data_key, _OAEP)
    header = _HEADER.pack(MAGIC, VERSION, ALG_RSA_OAEP_SHA256_AES256GCM, storage_key_id(storage_public_key))
    ciphertext = AESGCM(data_key).encrypt(nonce, plaintext, header + aad)
    return header + struct.pack(">H", len(wrapped)) + wrapped + nonce + ciphertext


def open_private_key(blob: bytes, storage_private_key: rsa.RSAPrivateKey, aad: bytes):
    """Decrypt a blob from `seal_private_key`; any change to the blob or the aad raises EscrowIntegrityError."""
    blob = bytes(blob)
    if len(blob) < _HEADER.size + 2:
        raise EscrowIntegrityError("the escrow blob is truncated")
    magic, version, alg, key_id = _HEADER.unpack_from(blob)
    if magic != MAGIC or version != VERSION or alg != ALG_RSA_OAEP_SHA256_AES256GCM:
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
        data_key = storage_private_key.decrypt(wrapped, _OAEP)
        plaintext = AESGCM(data_key).decrypt(nonce, ciphertext, blob[:_HEADER.size] + aad)
    except (ValueError, InvalidTag):
        # One message for every failure: the caller learns nothing about which part was wrong.
        raise EscrowIntegrityError("the escrowed key failed its integrity check") from None
    try:
        return serialization.load_der_private_key(plaintext, password=None)
    except ValueError:
        raise EscrowIntegrityError("the escrowed key could not be parsed") from None
