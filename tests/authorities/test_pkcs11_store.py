"""The token's keys as cryptography keys (authorities/pkcs11_store.py), against a real SoftHSM2 token."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from registration_app.authorities.certs import build_ca_certificate
from registration_app.authorities.crl import build_crl
from registration_app.authorities.escrow_crypto import (ALG_RSA_OAEP_SHA1_AES256GCM, ALG_RSA_OAEP_SHA256_AES256GCM,
                                                        EscrowIntegrityError, escrow_aad, escrow_algorithm,
                                                        open_private_key, seal_private_key)
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.pkcs11_store import Token, _oaep_decode
from registration_app.core.errors import AlreadyExists, ConfigError, KeyStoreUnavailable
from registration_app.core.model import KeyType
from tests.softhsm import MODULE

NOW = datetime(2026, 12, 1, tzinfo=timezone.utc)
OAEP = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


@pytest.fixture
def token(softhsm, tmp_path) -> Token:
    label = f"unit-{uuid.uuid4().hex[:8]}"
    softhsm.new_token(label, tmp_path / "token.pin")
    return Token(MODULE, label, tmp_path / "token.pin")


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_3072], ids=["EC CA", "RSA CA"])
def test_a_ca_key_generated_in_the_token_signs_certificates_and_crls_that_verify(token, key_type):
    key = token.generate("ca", key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Token CA")])
    ca = build_ca_certificate(key, name, NOW)
    ca.verify_directly_issued_by(ca)
    crl = build_crl(ca_cert=ca, ca_key=key, revoked=[(12345, NOW, x509.ReasonFlags.key_compromise)], number=1,
                    now=NOW, next_update=NOW + timedelta(hours=24))
    assert crl.is_signature_valid(ca.public_key())
    assert copy.deepcopy(key) is key and copy.copy(key) is key  # the builders copy keys: the same token key
    with pytest.raises(TypeError, match="never extractable"):
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())


def test_the_kra_key_unwraps_escrows_and_a_tampered_one_fails_like_any_other(token):
    kra = token.generate("kra", KeyType.RSA_3072)
    assert isinstance(kra, rsa.RSAPrivateKey)
    user_key = generate_private_key(KeyType.EC_P256)
    aad = escrow_aad(0xABC, "alice@example.org", "smime-encryption")
    blob = seal_private_key(user_key, kra.public_key(), aad)
    opened = open_private_key(blob, kra, aad)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert opened.public_key().public_bytes(*spki) == user_key.public_key().public_bytes(*spki)
    tampered = bytearray(blob)
    tampered[50] ^= 1  # inside the wrapped data key
    with pytest.raises(EscrowIntegrityError, match="failed its integrity check"):
        open_private_key(bytes(tampered), kra, aad)
    with pytest.raises(TypeError):
        kra.sign(b"x", padding.PKCS1v15(), hashes.SHA256())  # the KRA key signs nothing


def test_oaep_decoding_outside_the_token_matches_cryptography_and_refuses_any_change():
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = key.private_numbers()
    k = 256
    for message in (b"", os.urandom(32), os.urandom(190)):
        ciphertext = key.public_key().encrypt(message, OAEP)
        em = pow(int.from_bytes(ciphertext, "big"), numbers.d, numbers.public_numbers.n).to_bytes(k, "big")
        assert _oaep_decode(em) == message
        for position in (0, 1, 40, k - 1):
            changed = bytearray(em)
            changed[position] ^= 0x01
            with pytest.raises(ValueError, match="decryption failed"):
                _oaep_decode(bytes(changed))


def test_a_label_is_generated_once_and_a_missing_one_is_named(token, tmp_path):
    token.generate("tls_ca", KeyType.EC_P256)
    with pytest.raises(AlreadyExists, match="already holds a key labelled 'autoenroll-tls-ca'"):
        token.generate("tls_ca", KeyType.EC_P256)
    other = generate_private_key(KeyType.EC_P256)
    with pytest.raises(ConfigError, match="no private key labelled 'autoenroll-ca'"):
        with token.session(for_admin=True) as entry:
            token.private_key_object(entry, "ca")
    with pytest.raises(ConfigError, match="not the private half"):
        token.key("tls_ca", other.public_key()).check()


def test_two_tokens_of_one_label_are_refused_by_name_not_guessed(softhsm, tmp_path):
    """In a fresh process, as the server starts (a module loaded earlier sees only the tokens that existed
    then)."""
    label = f"twice-{uuid.uuid4().hex[:8]}"
    softhsm.new_token(label, tmp_path / "token.pin")
    (tmp_path / "second").mkdir()
    softhsm.new_token(label, tmp_path / "second" / "token.pin")
    opened = subprocess.run(
        [sys.executable, "-c", "import sys; from registration_app.authorities.pkcs11_store import Token\n"
         "with Token(sys.argv[1], sys.argv[2], sys.argv[3]).session(for_admin=True): pass",
         MODULE, label, str(tmp_path / "token.pin")], capture_output=True, text=True, timeout=60)
    assert opened.returncode != 0
    assert f"several PKCS#11 tokens are labelled '{label}'" in opened.stderr


def kra_key_allowed_only(token: Token, pin_file, *mechanisms: str):
    """A KRA key generated in the token by pkcs11-tool with CKA_ALLOWED_MECHANISMS: the token itself
    refuses every other mechanism with it, so what opens shows which mechanism the token ran."""
    pin = pin_file.read_text().strip()
    subprocess.run(["pkcs11-tool", "--module", MODULE, "--token-label", token.label, "--login", "--pin", pin,
                    "--keypairgen", "--key-type", "rsa:3072", "--label", "autoenroll-kra", "--id", "01",
                    "--usage-decrypt", "--allowed-mechanisms", ",".join(mechanisms)],
                   check=True, capture_output=True)
    from pkcs11 import Attribute, ObjectClass
    from registration_app.authorities.pkcs11_store import _public_key_of
    with token.session() as (session, _):
        [public] = session.get_objects({Attribute.LABEL: "autoenroll-kra", Attribute.CLASS: ObjectClass.PUBLIC_KEY})
        public_key = _public_key_of(public)
    return token.key("kra", public_key)


def test_a_new_escrow_unwraps_with_oaep_inside_a_token_that_allows_nothing_else(token, tmp_path):
    """SoftHSM 2.6.1 does CKM_RSA_PKCS_OAEP with SHA-1 only: new escrows are sealed so (escrow_crypto.py) and
    open with a key the token lets do nothing but OAEP; an escrow of the old algorithm (SHA-256) needs the
    token's raw RSA, which that key refuses: the refusal shows the new path never leaves the OAEP mechanism."""
    kra = kra_key_allowed_only(token, tmp_path / "token.pin", "RSA-PKCS-OAEP")
    user_key = generate_private_key(KeyType.EC_P256)
    aad = escrow_aad(0xABC, "alice@example.org", "smime-encryption")
    blob = seal_private_key(user_key, kra.public_key(), aad)
    assert escrow_algorithm(blob) == ALG_RSA_OAEP_SHA1_AES256GCM
    assert open_private_key(blob, kra, aad).private_numbers() == user_key.private_numbers()
    old = seal_private_key(user_key, kra.public_key(), aad, algorithm=ALG_RSA_OAEP_SHA256_AES256GCM)
    with pytest.raises(KeyStoreUnavailable):
        open_private_key(old, kra, aad)


def test_an_escrow_sealed_before_still_opens_with_a_kra_key_in_the_token(token):
    kra = token.generate("kra", KeyType.RSA_3072)
    user_key = generate_private_key(KeyType.RSA_2048)
    aad = escrow_aad(0xABD, "bob@example.org", "smime-encryption")
    old = seal_private_key(user_key, kra.public_key(), aad, algorithm=ALG_RSA_OAEP_SHA256_AES256GCM)
    assert open_private_key(old, kra, aad).private_numbers() == user_key.private_numbers()
    # and a KRA accepts new escrows of the current algorithm only
    with pytest.raises(EscrowIntegrityError, match="unknown format"):
        open_private_key(old, kra, aad, algorithms=(ALG_RSA_OAEP_SHA1_AES256GCM,))
