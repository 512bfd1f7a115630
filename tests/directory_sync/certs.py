"""Small certificates for directory tests: only issuer, notBefore and KeyUsage matter here."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

_KEY = ec.generate_private_key(ec.SECP256R1())  # one key for every test certificate: speed, not realism
NOW = datetime.now(timezone.utc).replace(microsecond=0)


def cert(issuer: str, email: str, *, encryption: bool, age_days: int = 0) -> bytes:
    """DER of a certificate for `email` issued by `issuer`; younger certificates have larger notBefore."""
    not_before = NOW - timedelta(days=age_days)
    usage = dict(digital_signature=not encryption, content_commitment=False, key_encipherment=False,
                 data_encipherment=False, key_agreement=encryption, key_cert_sign=False, crl_sign=False,
                 encipher_only=False, decipher_only=False)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.EMAIL_ADDRESS, email)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=365))
        .add_extension(x509.KeyUsage(**usage), critical=True)
    )
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def crl(issuer: str) -> bytes:
    """DER of an empty CRL (slapd checks the certificateList syntax, so it must be a real one)."""
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .last_update(NOW)
        .next_update(NOW + timedelta(days=7))
    )
    return builder.sign(_KEY, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
