"""Escrow blobs round-trip, and any change to the blob, the aad or the storage key is detected."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from registration_app.authorities.escrow_crypto import (
    ALG_RSA_OAEP_SHA1_AES256GCM,
    ALG_RSA_OAEP_SHA256_AES256GCM,
    MAGIC,
    EscrowIntegrityError,
    escrow_aad,
    open_private_key,
    seal_private_key,
    storage_key_id,
)
from registration_app.core.errors import AutoenrollError
from registration_app.core.model import KeyType
from registration_app.web.status import status_of

AAD = escrow_aad(0x1234567890ABCDEF12345, "alice@example.org", "smime-encryption")


@pytest.fixture(scope="module")
def storage_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_3072])
def test_seal_and_open_round_trip(storage_key, user_keys, key_type):
    key = user_keys[key_type]
    blob = seal_private_key(key, storage_key.public_key(), AAD)
    assert blob.startswith(MAGIC + b"\x01\x02" + storage_key_id(storage_key.public_key()))  # OAEP-SHA1
    assert der(key) not in blob
    assert der(open_private_key(blob, storage_key, AAD)) == der(key)
    # A fresh data key and nonce every time.
    assert seal_private_key(key, storage_key.public_key(), AAD) != blob


def test_every_flipped_byte_is_detected(storage_key, user_keys):
    blob = seal_private_key(user_keys[KeyType.EC_P256], storage_key.public_key(), AAD)
    # Header, key id, wrapped key length and body, nonce, ciphertext, tag: flip a byte in each region.
    positions = [0, 6, 7, 8, 39, 40, 41, 42, 42 + 200, 42 + 384, 42 + 384 + 11, 42 + 384 + 12, len(blob) - 17,
                 len(blob) - 1]
    for pos in positions:
        damaged = bytearray(blob)
        damaged[pos] ^= 0x01
        with pytest.raises(EscrowIntegrityError):
            open_private_key(bytes(damaged), storage_key, AAD)
    for cut in (0, 10, 41, 100, 42 + 384 + 5, len(blob) - 1):
        with pytest.raises(EscrowIntegrityError):
            open_private_key(blob[:cut], storage_key, AAD)
    with pytest.raises(EscrowIntegrityError):
        open_private_key(blob + b"\x00", storage_key, AAD)


def test_wrong_aad_or_storage_key_is_detected(storage_key, user_keys):
    blob = seal_private_key(user_keys[KeyType.EC_P256], storage_key.public_key(), AAD)
    for other in (
        escrow_aad(0x1234567890ABCDEF12346, "alice@example.org", "smime-encryption"),
        escrow_aad(0x1234567890ABCDEF12345, "mallory@example.org", "smime-encryption"),
        escrow_aad(0x1234567890ABCDEF12345, "alice@example.org", "smime-signature"),
        b"",
    ):
        with pytest.raises(EscrowIntegrityError):
            open_private_key(blob, storage_key, other)
    other_storage = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(EscrowIntegrityError, match="another storage key"):
        open_private_key(blob, other_storage, AAD)


def test_error_is_in_the_project_tree():
    err = EscrowIntegrityError()
    assert isinstance(err, AutoenrollError)
    assert (err.code, status_of(err)) == ("escrow_integrity", 500)


def test_aad_is_canonical():
    assert escrow_aad(10, " Alice@Example.ORG ", "p") == escrow_aad(10, "alice@example.org", "p")
    assert escrow_aad(10, "alice@example.org", "p") == (
        b'autoenroll-escrow-v1\x00{"email":"alice@example.org","profile":"p","serial":"10"}'
    )
    # A separator inside one field cannot be mistaken for a field boundary.
    assert escrow_aad(1, "a@b.org", 'x","serial":"2') != escrow_aad(1, "a@b.org", "x")


def test_a_weak_storage_key_is_refused(user_keys):
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError):
        seal_private_key(user_keys[KeyType.EC_P256], small.public_key(), AAD)


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_3072])
def test_an_escrow_sealed_with_the_older_algorithm_still_opens(storage_key, user_keys, key_type):
    key = user_keys[key_type]
    old = seal_private_key(key, storage_key.public_key(), AAD, algorithm=ALG_RSA_OAEP_SHA256_AES256GCM)
    assert old.startswith(MAGIC + b"\x01\x01")
    assert der(open_private_key(old, storage_key, AAD)) == der(key)
    # The algorithm is in the authenticated header: naming the other one is detected, not tried.
    renamed = bytearray(old)
    renamed[7] = ALG_RSA_OAEP_SHA1_AES256GCM
    with pytest.raises(EscrowIntegrityError):
        open_private_key(bytes(renamed), storage_key, AAD)
    with pytest.raises(EscrowIntegrityError, match="unknown format"):
        open_private_key(old, storage_key, AAD, algorithms=(ALG_RSA_OAEP_SHA1_AES256GCM,))
