"""The CRL verifies with openssl, lists the revoked serials with their reasons, and revokes in a chain check."""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from registration_app.authorities.certs import build_smime_certificate
from registration_app.authorities.crl import build_crl
from registration_app.core.model import KeyType, Profile, Subject, Usage

from .conftest import NOW, URLS, openssl, write_pem

KEY_COMPROMISE_SERIAL = 0x1234567890ABCDEF1234
UNSPECIFIED_SERIAL = 0x0FEDCBA987654321
NO_REASON_SERIAL = 0x0A0B0C0D0E0F1011


def crl_for(ca, extra=(), number=7):
    revoked = [
        (KEY_COMPROMISE_SERIAL, NOW - timedelta(hours=2), x509.ReasonFlags.key_compromise),
        (UNSPECIFIED_SERIAL, NOW - timedelta(hours=1), x509.ReasonFlags.unspecified),
        (NO_REASON_SERIAL, NOW - timedelta(minutes=1), None),
        *extra,
    ]
    return build_crl(
        ca_cert=ca.cert, ca_key=ca.key, revoked=revoked, number=number, now=NOW,
        next_update=NOW + timedelta(days=7),
    )


def test_crl_has_number_aki_reasons_and_a_valid_signature(ca):
    crl = crl_for(ca)
    assert crl.issuer == ca.cert.subject
    assert crl.is_signature_valid(ca.cert.public_key())
    assert isinstance(crl.signature_hash_algorithm, hashes.SHA256)
    assert crl.last_update_utc == NOW and crl.next_update_utc == NOW + timedelta(days=7)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber)
    assert number.value.crl_number == 7 and not number.critical
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest

    entry = crl.get_revoked_certificate_by_serial_number(KEY_COMPROMISE_SERIAL)
    assert entry.revocation_date_utc == NOW - timedelta(hours=2)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is x509.ReasonFlags.key_compromise
    for serial in (UNSPECIFIED_SERIAL, NO_REASON_SERIAL):
        # RFC 5280 5.3.1: the reason code "unspecified" should be absent rather than present.
        assert len(crl.get_revoked_certificate_by_serial_number(serial).extensions) == 0


def test_openssl_verifies_the_crl_and_shows_serial_and_reason(tmp_path, ca):
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert)
    crl_pem = write_pem(tmp_path / "ca.crl", crl_for(ca))
    result = openssl("crl", "-CAfile", str(ca_pem), "-noout", "-in", str(crl_pem))
    assert b"verify OK" in result.stderr + result.stdout
    text = openssl("crl", "-noout", "-text", "-in", str(crl_pem)).stdout.decode()
    assert "X509v3 CRL Number: \n                7" in text or "X509v3 CRL Number:\n                7" in text
    assert f"Serial Number: {KEY_COMPROMISE_SERIAL:X}" in text
    assert "Key Compromise" in text
    assert text.count("CRL Reason Code") == 1


def test_a_revoked_certificate_fails_openssl_verify_with_crl_check(tmp_path, ca, user_keys):
    profile = Profile(name="smime-encryption", usage=Usage.ENCRYPTION, key_type=KeyType.RSA_2048)
    cert = build_smime_certificate(
        ca_cert=ca.cert, ca_key=ca.key, public_key=user_keys[KeyType.RSA_2048].public_key(), profile=profile,
        subject=Subject("bob@example.org"), now=NOW, urls=URLS,
    )
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert)
    cert_pem = write_pem(tmp_path / "cert.pem", cert)
    good = write_pem(tmp_path / "good.crl", crl_for(ca))
    bad = write_pem(
        tmp_path / "bad.crl",
        crl_for(ca, extra=[(cert.serial_number, NOW, x509.ReasonFlags.superseded)], number=8),
    )
    openssl("verify", "-crl_check", "-CAfile", str(ca_pem), "-CRLfile", str(good), str(cert_pem))
    result = openssl("verify", "-crl_check", "-CAfile", str(ca_pem), "-CRLfile", str(bad), str(cert_pem), check=False)
    assert result.returncode != 0 and b"certificate revoked" in result.stderr


def test_an_empty_crl_is_valid_and_bad_arguments_are_refused(ec_ca):
    crl = build_crl(ca_cert=ec_ca.cert, ca_key=ec_ca.key, revoked=[], number=0, now=NOW,
                    next_update=NOW + timedelta(days=1))
    assert len(crl) == 0 and crl.is_signature_valid(ec_ca.cert.public_key())
    with pytest.raises(ValueError):
        build_crl(ca_cert=ec_ca.cert, ca_key=ec_ca.key, revoked=[], number=1, now=NOW, next_update=NOW)
    with pytest.raises(ValueError):
        build_crl(ca_cert=ec_ca.cert, ca_key=ec_ca.key, revoked=[], number=-1, now=NOW,
                  next_update=NOW + timedelta(days=1))
