"""The S/MIME certificate is what a PKI person expects: every extension, its criticality, and openssl agrees."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from registration_app.authorities.certs import (
    MAX_SMIME_VALIDITY_DAYS,
    SMIME_MAILBOX_STRICT_OID,
    CaUrls,
    build_ca_certificate,
    build_smime_certificate,
    build_tls_certificate,
)
from registration_app.authorities.keys import generate_private_key
from registration_app.core.errors import BadRequest, ConfigError
from registration_app.core.model import KeyType, Profile, Subject, Usage

from .conftest import NOW, URLS, openssl, write_pem

EMAIL = "alice.smith@example.org"
CASES = {
    "encryption-rsa3072": (Usage.ENCRYPTION, KeyType.RSA_3072),
    "encryption-ec": (Usage.ENCRYPTION, KeyType.EC_P256),
    "signature-ec": (Usage.SIGNATURE, KeyType.EC_P256),
    "signature-rsa2048": (Usage.SIGNATURE, KeyType.RSA_2048),
}


def issue(ca, key, usage, *, email=EMAIL, validity_days=365, now=NOW, **kw) -> x509.Certificate:
    profile = Profile(name=f"smime-{usage.value}", usage=usage, validity_days=validity_days)
    return build_smime_certificate(
        ca_cert=ca.cert, ca_key=ca.key, public_key=key.public_key(), profile=profile,
        subject=Subject(email=email, common_name="Alice Smith"), now=now, urls=URLS, **kw,
    )


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


@pytest.mark.parametrize("case", CASES)
def test_smime_certificate_follows_the_strict_mailbox_profile(ca, user_keys, case):
    usage, key_type = CASES[case]
    key = user_keys[key_type]
    cert = issue(ca, key, usage)

    assert cert.version is x509.Version.v3
    assert cert.issuer == ca.cert.subject
    # Mailbox-validated: only the mailbox address in the subject, never the display name.
    assert [(a.oid, a.value) for a in cert.subject] == [
        (NameOID.COMMON_NAME, EMAIL), (NameOID.EMAIL_ADDRESS, EMAIL)
    ]
    assert {e.oid for e in cert.extensions} == {
        x509.BasicConstraints.oid, x509.KeyUsage.oid, x509.ExtendedKeyUsage.oid,
        x509.SubjectAlternativeName.oid, x509.CertificatePolicies.oid, x509.CRLDistributionPoints.oid,
        x509.AuthorityInformationAccess.oid, x509.SubjectKeyIdentifier.oid, x509.AuthorityKeyIdentifier.oid,
    }
    critical = {e.oid for e in cert.extensions if e.critical}
    assert critical == {x509.BasicConstraints.oid, x509.KeyUsage.oid}

    assert ext(cert, x509.BasicConstraints).value.ca is False
    ku = ext(cert, x509.KeyUsage).value
    set_bits = {
        name for name in ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                          "key_agreement", "key_cert_sign", "crl_sign")
        if getattr(ku, name)
    }
    if usage is Usage.SIGNATURE:
        assert set_bits == {"digital_signature"}
    elif key_type.is_rsa:
        assert set_bits == {"key_encipherment"}
    else:
        assert set_bits == {"key_agreement"}
        assert ku.encipher_only is False and ku.decipher_only is False
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    assert list(ext(cert, x509.SubjectAlternativeName).value) == [x509.RFC822Name(EMAIL)]
    policies = ext(cert, x509.CertificatePolicies).value
    assert [p.policy_identifier for p in policies] == [SMIME_MAILBOX_STRICT_OID]
    assert SMIME_MAILBOX_STRICT_OID.dotted_string == "2.23.140.1.5.1.3"
    (dp,) = ext(cert, x509.CRLDistributionPoints).value
    assert dp.full_name == [x509.UniformResourceIdentifier(URLS.crl_url)]
    assert dp.reasons is None and dp.crl_issuer is None and dp.relative_name is None
    (aia,) = ext(cert, x509.AuthorityInformationAccess).value
    assert aia.access_method == AuthorityInformationAccessOID.CA_ISSUERS
    assert aia.access_location == x509.UniformResourceIdentifier(URLS.ca_issuers_url)
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    ca_ski = ext(ca.cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    assert aki.authority_cert_issuer is None and aki.authority_cert_serial_number is None

    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    if isinstance(ca.key, rsa.RSAPrivateKey):
        assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSA_WITH_SHA256
    else:
        assert cert.signature_algorithm_oid == x509.SignatureAlgorithmOID.ECDSA_WITH_SHA256
    cert.verify_directly_issued_by(ca.cert)

    assert 1 << 64 <= cert.serial_number < 1 << 159
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    # RFC 5280 counts both ends: 365 days of validity end one second before notBefore + 365 days.
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=365, seconds=-1)


@pytest.mark.parametrize("case", CASES)
def test_openssl_reads_and_verifies_the_certificate_for_its_purpose(tmp_path, ca, user_keys, case):
    usage, key_type = CASES[case]
    cert = issue(ca, user_keys[key_type], usage)
    ca_pem = write_pem(tmp_path / "ca.pem", ca.cert)
    cert_pem = write_pem(tmp_path / "cert.pem", cert)

    text = openssl("x509", "-noout", "-text", "-in", str(cert_pem)).stdout.decode()
    assert "X509v3 Key Usage: critical" in text
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    assert "E-mail Protection" in text and "TLS Web Client" not in text
    assert f"email:{EMAIL}" in text
    assert "Policy: 2.23.140.1.5.1.3" in text
    assert f"URI:{URLS.crl_url}" in text
    assert f"CA Issuers - URI:{URLS.ca_issuers_url}" in text
    assert "sha256With" in text or "ecdsa-with-SHA256" in text

    verify = ["verify", "-x509_strict", "-CAfile", str(ca_pem)]
    if usage is Usage.SIGNATURE:
        openssl(*verify, "-purpose", "smimesign", str(cert_pem))
        refused = openssl(*verify, "-purpose", "smimeencrypt", str(cert_pem), check=False)
        assert refused.returncode != 0
    elif key_type.is_rsa:
        openssl(*verify, "-purpose", "smimeencrypt", str(cert_pem))
        assert openssl(*verify, "-purpose", "smimesign", str(cert_pem), check=False).returncode != 0
    else:
        # OpenSSL 3.0's smimeencrypt purpose demands keyEncipherment, which an EC key cannot use (BR and
        # RFC 5480: keyAgreement). The chain and the S/MIME EKU are checked with the generic purpose;
        # the CMS round trip in test_end_to_end proves that openssl encrypts to this certificate.
        openssl(*verify, "-purpose", "any", str(cert_pem))
        assert openssl(*verify, "-purpose", "sslclient", str(cert_pem), check=False).returncode != 0
    assert openssl(*verify, "-purpose", "sslserver", str(cert_pem), check=False).returncode != 0


def test_serial_numbers_come_from_the_rng_and_have_at_least_64_bits(ec_ca, user_keys):
    class ShortThenLong:
        calls = 0

        def randbits(self, k):
            assert k == 159
            self.calls += 1
            return 12345 if self.calls == 1 else (1 << 158) | 7

    rng = ShortThenLong()
    cert = issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE, rng=rng)
    assert cert.serial_number == (1 << 158) | 7 and rng.calls == 2
    serials = {issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE).serial_number for _ in range(20)}
    assert len(serials) == 20 and all(s.bit_length() > 64 for s in serials)
    assert issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE, serial=99 << 70).serial_number == 99 << 70
    for bad in (0, -1, 1 << 159):
        with pytest.raises(ValueError):
            issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE, serial=bad)


def test_validity_is_capped_at_825_days_and_clipped_to_the_ca(ec_ca, user_keys):
    key = user_keys[KeyType.EC_P256]
    long = issue(ec_ca, key, Usage.SIGNATURE, validity_days=2000)
    assert long.not_valid_after_utc - long.not_valid_before_utc == timedelta(days=MAX_SMIME_VALIDITY_DAYS, seconds=-1)

    # Nine years from now the CA (ten years) has less than a year left: the certificate ends with the CA.
    late = NOW + timedelta(days=9 * 365 + 200)
    clipped = issue(ec_ca, key, Usage.SIGNATURE, now=late)
    assert clipped.not_valid_after_utc == ec_ca.cert.not_valid_after_utc
    assert clipped.not_valid_before_utc == late - timedelta(minutes=5)

    # Right after the CA is made, notBefore does not precede the CA's own notBefore.
    assert issue(ec_ca, key, Usage.SIGNATURE).not_valid_before_utc >= ec_ca.cert.not_valid_before_utc

    with pytest.raises(ConfigError):
        issue(ec_ca, key, Usage.SIGNATURE, now=ec_ca.cert.not_valid_after_utc + timedelta(days=1))
    with pytest.raises(ValueError):
        issue(ec_ca, key, Usage.SIGNATURE, now=NOW.replace(tzinfo=None))


def test_long_addresses_drop_the_common_name_and_the_domain_is_lowercased(ec_ca, user_keys):
    local = "a" * 60
    cert = issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE, email=f"{local}@Example.ORG")
    email = f"{local}@example.org"
    assert [(a.oid, a.value) for a in cert.subject] == [(NameOID.EMAIL_ADDRESS, email)]
    assert list(ext(cert, x509.SubjectAlternativeName).value) == [x509.RFC822Name(email)]
    assert ext(cert, x509.SubjectAlternativeName).critical is False


@pytest.mark.parametrize(
    "email", ["", "alice", "@example.org", "alice@", "al ice@example.org", "jörg@example.org", "a@b@example.org",
              "alice@localhost", "alice@example.org."]
)
def test_malformed_mailboxes_are_refused(ec_ca, user_keys, email):
    with pytest.raises(BadRequest):
        issue(ec_ca, user_keys[KeyType.EC_P256], Usage.SIGNATURE, email=email)


def test_weak_or_unsupported_subject_keys_are_refused(ec_ca):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    odd_curve = ec.generate_private_key(ec.SECP256K1())
    for key in (weak, odd_curve):
        with pytest.raises(BadRequest):
            issue(ec_ca, key, Usage.ENCRYPTION)


def test_urls_must_be_plain_http():
    with pytest.raises(ConfigError):
        CaUrls(crl_url="https://pki.example.org/ca.crl", ca_issuers_url="http://pki.example.org/ca.cer")
    assert dataclasses.is_dataclass(URLS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        URLS.crl_url = "http://other"  # type: ignore[misc]


def test_ca_certificate_is_a_root_that_only_signs_certificates_and_crls(ca, tmp_path):
    cert = ca.cert
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is True and bc.value.path_length == 0
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    assert ext(cert, x509.SubjectKeyIdentifier).critical is False
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650, seconds=-1)
    pem = write_pem(tmp_path / "ca.pem", cert)
    openssl("verify", "-x509_strict", "-CAfile", str(pem), str(pem))


@pytest.mark.parametrize("client,server", [(True, True), (True, False), (False, True)])
def test_tls_certificates_carry_the_requested_purposes(tmp_path, ec_ca, user_keys, client, server):
    key = user_keys[KeyType.RSA_2048]
    cert = build_tls_certificate(
        ec_ca.cert, ec_ca.key, key.public_key(), dns_names=["ra.example.org", "localhost"],
        ip_addresses=["127.0.0.1", "::1"], common_name="ra.example.org", client=client, server=server, now=NOW,
    )
    ekus = list(ext(cert, x509.ExtendedKeyUsage).value)
    assert (ExtendedKeyUsageOID.CLIENT_AUTH in ekus) == client
    assert (ExtendedKeyUsageOID.SERVER_AUTH in ekus) == server
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["ra.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert ext(cert, x509.KeyUsage).critical and ext(cert, x509.KeyUsage).value.key_encipherment
    assert ext(cert, x509.BasicConstraints).critical

    ca_pem = write_pem(tmp_path / "ca.pem", ec_ca.cert)
    pem = write_pem(tmp_path / "tls.pem", cert)
    for purpose, wanted in (("sslclient", client), ("sslserver", server)):
        result = openssl("verify", "-x509_strict", "-purpose", purpose, "-CAfile", str(ca_pem), str(pem), check=False)
        assert (result.returncode == 0) == wanted, result.stderr
    result = openssl("verify", "-CAfile", str(ca_pem), "-verify_hostname", "localhost", str(pem), check=False)
    assert result.returncode == 0
    result = openssl("verify", "-CAfile", str(ca_pem), "-verify_ip", "127.0.0.1", str(pem), check=False)
    assert result.returncode == 0


def test_ca_names_can_come_from_any_key_type():
    key = generate_private_key(KeyType.EC_P256)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Short-lived")])
    cert = build_ca_certificate(key, name, NOW, days=30)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, seconds=-1)
