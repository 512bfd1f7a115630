"""Certificate builders: the S/MIME subscriber profile, the CA root and TLS certificates.

The S/MIME profile follows the CA/Browser Forum S/MIME Baseline Requirements (BR), mailbox-validated
*strict* generation (policy 2.23.140.1.5.1.3):

- subject: `commonName` and `emailAddress`, both the mailbox address (BR 7.1.4.2.2: for mailbox-validated
  certificates only these two (and serialNumber) may appear, and a commonName must be a mailbox address, not a
  display name, so `Subject.common_name` is deliberately not used). The commonName is left out when the
  address is longer than the 64 characters X.520 allows; the SAN is what clients use anyway.
- subjectAltName: one rfc822Name, not critical (the subject is never empty).
- keyUsage (critical): signature → digitalSignature; RSA encryption → keyEncipherment; EC encryption →
  keyAgreement (encipherOnly/decipherOnly unset). nonRepudiation is not set (BR: MAY).
- extKeyUsage: emailProtection only (strict). basicConstraints: CA:FALSE, critical.
- certificatePolicies: the strict mailbox OID; cRLDistributionPoints: one HTTP URL; AIA: caIssuers HTTP URL.
- AKI (from the CA's SKI), SKI; serial: 159 random bits from a CSPRNG (always positive, ≤ 20 octets).
- validity ≤ 825 days counted inclusively (RFC 5280), notBefore 5 minutes in the past for clock skew,
  never outside the CA certificate's own validity.
- signature: ECDSA with SHA-256 or RSA PKCS#1 v1.5 with SHA-256. Subject keys: RSA ≥ 2048 bits (modulus a
  multiple of 8) or ECDSA P-256/P-384/P-521 (BR 6.1.5).
"""

from __future__ import annotations

import functools
import ipaddress
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

from ..core.errors import BadRequest, ConfigError
from ..core.model import Profile, Subject, Usage

SMIME_MAILBOX_STRICT_OID = x509.ObjectIdentifier("2.23.140.1.5.1.3")
MAX_SMIME_VALIDITY_DAYS = 825  # BR 6.3.2, strict generation
CLOCK_SKEW = timedelta(minutes=5)
SERIAL_BITS = 159  # 20 DER octets at most, and the top bit clear so the INTEGER stays positive
_MIN_SERIAL = 1 << 64
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_UB_COMMON_NAME = 64


@dataclass(frozen=True)
class CaUrls:
    """Where relying parties fetch the CRL and the issuing CA certificate (HTTP, per the BR)."""

    crl_url: str
    ca_issuers_url: str

    def __post_init__(self) -> None:
        for url in (self.crl_url, self.ca_issuers_url):
            if not url.startswith("http://"):
                # BR 7.1.2.3: CRL and caIssuers must be reachable over plain HTTP (no TLS bootstrap loop).
                raise ConfigError("CRL and caIssuers URLs must be http:// URLs")


def random_serial(rng=secrets) -> int:
    """A positive serial number with 159 bits from a CSPRNG (BR 7.1: at least 64 random bits)."""
    while True:
        serial = rng.randbits(SERIAL_BITS)
        if serial >= _MIN_SERIAL:  # rejects a negligible fraction; keeps every serial ≥ 65 bits long
            return serial


def build_smime_certificate(
    *,
    ca_cert: x509.Certificate,
    ca_key,
    public_key,
    profile: Profile,
    subject: Subject,
    now: datetime,
    urls: CaUrls,
    serial: int | None = None,
    rng=secrets,
) -> x509.Certificate:
    """Sign `public_key` for `subject.email` under `profile` (mailbox-validated strict S/MIME)."""
    email = _mailbox(subject.email)
    _check_subject_key(public_key)
    if serial is None:
        serial = random_serial(rng)
    elif not 0 < serial < (1 << SERIAL_BITS):
        raise ValueError("serial must be positive and fit in 159 bits")
    not_before, not_after = _validity(ca_cert, now, min(profile.validity_days, MAX_SMIME_VALIDITY_DAYS))

    attributes = []
    if len(email) <= _UB_COMMON_NAME:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, email))
    attributes.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))

    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    before_san, after_san, aki = _fixed_extensions(urls, ca_cert)
    for extension, critical in (
        *before_san,
        (_smime_key_usage(profile.usage, public_key), True),
        (_EMAIL_PROTECTION_ONLY, False),
        (x509.SubjectAlternativeName([x509.RFC822Name(email)]), False),
        *after_san,
        (x509.SubjectKeyIdentifier.from_public_key(public_key), False),
        aki,
    ):
        builder = builder.add_extension(extension, critical=critical)
    return _sign(builder, ca_key)


def build_ca_certificate(key, name: x509.Name, now: datetime, days: int = 3650) -> x509.Certificate:
    """A self-signed root that issues end-entity certificates only (pathlen 0)."""
    now = _utc(now)
    not_before = now - CLOCK_SKEW
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days) - timedelta(seconds=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _sign(builder, key)


def build_tls_certificate(
    ca_cert: x509.Certificate,
    ca_key,
    public_key,
    *,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    common_name: str,
    client: bool = True,
    server: bool = True,
    now: datetime,
    days: int = 825,
) -> x509.Certificate:
    """A TLS certificate for the registration server (serverAuth) or a user server/agent (clientAuth)."""
    if not (client or server):
        raise ValueError("a TLS certificate needs clientAuth, serverAuth or both")
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
    if not names:
        raise ValueError("a TLS certificate needs at least one DNS name or IP address")
    ekus = []
    if server:
        ekus.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        ekus.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    not_before, not_after = _validity(ca_cert, now, days)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=is_rsa,  # RSA key transport in TLS 1.2 static-RSA suites
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(ekus), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(authority_key_identifier(ca_cert), critical=False)
    )
    return _sign(builder, ca_key)


def authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    """The AKI of anything `ca_cert` signs: its SKI when it has one (so chains match byte for byte)."""
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def sign_with_ca_key(builder, ca_key):
    """Sign a certificate or CRL builder with SHA-256 (ECDSA, or RSA PKCS#1 v1.5)."""
    return _sign(builder, ca_key)


# --- internals ---------------------------------------------------------------------------------


def _sign(builder, ca_key):
    if isinstance(ca_key, ec.EllipticCurvePrivateKey):
        return builder.sign(ca_key, hashes.SHA256())
    if isinstance(ca_key, rsa.RSAPrivateKey):
        return builder.sign(ca_key, hashes.SHA256(), rsa_padding=padding.PKCS1v15())
    raise ConfigError("the CA key must be an EC or RSA key")


_EMAIL_PROTECTION_ONLY = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION])


@functools.lru_cache(maxsize=32)
def _fixed_extensions(urls: CaUrls, ca_cert: x509.Certificate) -> tuple[tuple, tuple, tuple]:
    """The extensions (and criticality) every end-entity certificate of this CA carries whoever it is
    for: basic constraints; policy, CRL distribution point, AIA; AKI. Immutable values, built once
    instead of once per certificate (about a third of the time a certificate took to build)."""
    before_san = ((x509.BasicConstraints(ca=False, path_length=None), True),)
    after_san = (
        (x509.CertificatePolicies([x509.PolicyInformation(SMIME_MAILBOX_STRICT_OID, None)]), False),
        (x509.CRLDistributionPoints([
            x509.DistributionPoint(full_name=[x509.UniformResourceIdentifier(urls.crl_url)],
                                   relative_name=None, reasons=None, crl_issuer=None)]), False),
        (x509.AuthorityInformationAccess([
            x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                                   x509.UniformResourceIdentifier(urls.ca_issuers_url))]), False),
    )
    return before_san, after_san, (authority_key_identifier(ca_cert), False)


def _smime_key_usage(usage: Usage, public_key) -> x509.KeyUsage:
    signature = usage is Usage.SIGNATURE
    return _key_usage(signature, not signature and isinstance(public_key, rsa.RSAPublicKey),
                      not signature and isinstance(public_key, ec.EllipticCurvePublicKey))


@functools.lru_cache(maxsize=8)
def _key_usage(signature: bool, rsa_encryption: bool, ec_encryption: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=signature, content_commitment=False, key_encipherment=rsa_encryption,
        data_encipherment=False, key_agreement=ec_encryption, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False,
    )


def _check_subject_key(public_key) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048 or public_key.key_size % 8:
            raise BadRequest("RSA keys must have at least 2048 bits, a multiple of 8")
        return
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, _ALLOWED_CURVES):
            raise BadRequest("EC keys must be on P-256, P-384 or P-521")
        return
    raise BadRequest("the key must be an RSA or EC key")


def _mailbox(email: str) -> str:
    """The rfc822Name as it will be certified: ASCII (IA5String), one @, nothing odd."""
    local, at, domain = email.rpartition("@")
    if (
        not at or not local or not domain or not email.isascii() or not email.isprintable()
        or any(c.isspace() for c in email) or "@" in local or domain.startswith(".")
        or domain.endswith(".") or "." not in domain
    ):
        # Non-ASCII local parts need the SmtpUTF8Mailbox otherName, which this CA does not issue.
        raise BadRequest("the email address is not a valid ASCII mailbox address")
    return f"{local}@{domain.lower()}"


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return now.astimezone(timezone.utc).replace(microsecond=0)


def _validity(ca_cert: x509.Certificate, now: datetime, days: int) -> tuple[datetime, datetime]:
    """notBefore/notAfter for `days` inclusive (RFC 5280 counts both ends), inside the CA's validity."""
    if days < 1:
        raise ValueError("validity must be at least one day")
    not_before = _utc(now) - CLOCK_SKEW
    not_after = not_before + timedelta(days=days) - timedelta(seconds=1)
    not_before = max(not_before, ca_cert.not_valid_before_utc)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    if not_after <= _utc(now):
        raise ConfigError("the CA certificate has expired; no certificate can be issued")
    return not_before, not_after
