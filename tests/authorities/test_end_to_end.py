"""A user's path through the crypto: key → certificate → PKCS#12 → someone encrypts mail → user decrypts."""

from __future__ import annotations

import pytest

from registration_app.authorities.certs import build_smime_certificate
from registration_app.authorities.escrow_crypto import escrow_aad, open_private_key, seal_private_key
from registration_app.authorities.keys import generate_private_key
from registration_app.authorities.pkcs12 import to_pkcs12
from registration_app.core.model import KeyType, Profile, Subject, Usage

from .conftest import NOW, URLS, openssl, write_pem

MESSAGE = b"Content-Type: text/plain\r\n\r\nThe quarterly numbers are attached.\r\n"


@pytest.mark.parametrize("key_type", [KeyType.RSA_3072, KeyType.EC_P256])
@pytest.mark.parametrize("legacy", [False, True], ids=["pbes2", "legacy"])
def test_mail_encrypted_to_the_certificate_decrypts_with_the_pkcs12_key(tmp_path, ca, key_type, legacy):
    key = generate_private_key(key_type)
    profile = Profile(name="smime-encryption", usage=Usage.ENCRYPTION, key_type=key_type)
    cert = build_smime_certificate(
        ca_cert=ca.cert, ca_key=ca.key, public_key=key.public_key(), profile=profile,
        subject=Subject("dave@example.org", "Dave"), now=NOW, urls=URLS,
    )
    # The key authority escrows first; what it delivers is the same key.
    storage = generate_private_key(KeyType.RSA_3072)
    aad = escrow_aad(cert.serial_number, "dave@example.org", profile.name)
    recovered = open_private_key(seal_private_key(key, storage.public_key(), aad), storage, aad)

    p12 = tmp_path / "dave.p12"
    p12.write_bytes(to_pkcs12(key=recovered, cert=cert, chain=[ca.cert], password="s3cret",
                              friendly_name="Dave", legacy=legacy, iterations=2048))
    cert_pem = write_pem(tmp_path / "dave.pem", cert)
    message = tmp_path / "message.txt"
    message.write_bytes(MESSAGE)

    # A correspondent encrypts to the published certificate...
    encrypted = tmp_path / "message.p7m"
    openssl("cms", "-encrypt", "-aes256", "-in", str(message), "-out", str(encrypted), str(cert_pem))
    # ...and the user decrypts with the key taken out of the PKCS#12 they received.
    key_pem = tmp_path / "dave.key"
    openssl("pkcs12", "-in", str(p12), "-nocerts", "-nodes", "-passin", "pass:s3cret", "-out", str(key_pem))
    decrypted = openssl("cms", "-decrypt", "-in", str(encrypted), "-recip", str(cert_pem), "-inkey", str(key_pem))
    assert decrypted.stdout.replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")


def test_a_signature_certificate_signs_mail_that_openssl_verifies(tmp_path, ca):
    key = generate_private_key(KeyType.EC_P256)
    cert = build_smime_certificate(
        ca_cert=ca.cert, ca_key=ca.key, public_key=key.public_key(),
        profile=Profile(name="smime-signature", usage=Usage.SIGNATURE), subject=Subject("erin@example.org"),
        now=NOW, urls=URLS,
    )
    cert_pem = write_pem(tmp_path / "erin.pem", cert)
    key_pem = write_pem(tmp_path / "erin.key", key)
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert)
    message = tmp_path / "message.txt"
    message.write_bytes(MESSAGE)
    signed = tmp_path / "signed.p7m"
    openssl("cms", "-sign", "-in", str(message), "-signer", str(cert_pem), "-inkey", str(key_pem),
            "-out", str(signed))
    verified = openssl("cms", "-verify", "-purpose", "smimesign", "-CAfile", str(ca_pem), "-in", str(signed),
                       "-out", str(tmp_path / "out.txt"))
    assert b"Verification successful" in verified.stderr
    assert (tmp_path / "out.txt").read_bytes().replace(b"\r\n", b"\n") == MESSAGE.replace(b"\r\n", b"\n")
