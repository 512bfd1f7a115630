"""A throw-away PKI for tests and benchmarks (tests import it from bench, never the other way): roots, intermediates, S/MIME user certificates, agent certificates.

Everything here is deliberately shaped like the real thing (AKI/SKI, critical KeyUsage, SAN rfc822Name,
EKU emailProtection for users, serverAuth+clientAuth for agents) so that tests exercise the same
verifier paths as production. The odd shapes that attacks use (self-signed leaves, a leaf posing as an
intermediate, wrong EKU, expired, not yet valid) are built with the same helpers by changing one knob.

Time: `NOW` is fixed at import so that every certificate and every `now=` in one test run agree.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOW = datetime.now(timezone.utc).replace(microsecond=0)
DAY = timedelta(days=1)

EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH

PrivateKey = CertificateIssuerPrivateKeyTypes


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key (a CA, a user or an agent)."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def new_key(key_type: str = "ec") -> PrivateKey:
    """"ec" (P-256), "ec384", "rsa" (2048), "rsa3072", "rsa1024" (too small on purpose)."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa"):
        return _rsa_key(int(key_type[3:] or 2048), secrets.randbelow(4))
    raise ValueError(f"unknown key type {key_type!r}")


@functools.lru_cache(maxsize=None)
def _rsa_key(bits: int, slot: int) -> rsa.RSAPrivateKey:
    # RSA generation costs ~40 ms (2048) to ~150 ms (3072): a few cached keys per size keep the suite fast
    # while still giving different keys to different certificates most of the time.
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _name(common_name: str, *, email: str | None = None, org: str = "Autoenroll Test") -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org), x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if email is not None:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, email))
    return x509.Name(attrs)


def _hash_for(key: PrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA256()


def _builder(
    subject: x509.Name,
    issuer_name: x509.Name,
    public_key,
    *,
    not_before: datetime,
    not_after: datetime,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1 | 1 << 64)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _aki(issuer: Issued | None, public_key) -> x509.AuthorityKeyIdentifier:
    if issuer is None:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
        issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    )


def make_ca(
    name: str,
    *,
    key_type: str = "ec",
    issuer: Issued | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    path_len: int | None = None,
    eku: tuple[x509.ObjectIdentifier, ...] | None = None,
    key: PrivateKey | None = None,
) -> Issued:
    """A root (issuer=None, self-signed) or an intermediate CA signed by `issuer`.

    Pass the `key` of an existing CA (and its name) to re-issue that CA's certificate.
    """
    key = key or new_key(key_type)
    subject = _name(name)
    not_before = not_before or NOW - 30 * DAY
    not_after = not_after or NOW + 3650 * DAY
    builder = (
        _builder(
            subject,
            issuer.cert.subject if issuer else subject,
            key.public_key(),
            not_before=not_before,
            not_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(_aki(issuer, key.public_key()), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, _hash_for(signer)), key)


def make_intermediate(issuer: Issued, name: str, **kwargs) -> Issued:
    return make_ca(name, issuer=issuer, **kwargs)


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False, key_agreement: bool = False):
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def make_user_cert(
    ca: Issued,
    email: str | None,
    *,
    key_type: str = "ec",
    key: PrivateKey | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    eku: tuple[x509.ObjectIdentifier, ...] | None = (EMAIL_PROTECTION,),
    key_usage: str | None = "digitalSignature",
    is_ca: bool = False,
    extra_emails: tuple[str, ...] = (),
    common_name: str | None = None,
) -> Issued:
    """An S/MIME user certificate, mailbox-validated strict profile.

    key_usage: "digitalSignature", "keyEncipherment", "keyAgreement" or None (extension left out).
    eku: None leaves the extension out. is_ca=True makes a leaf that claims CA rights (for odd-chain tests).
    email: None gives a certificate without any rfc822Name.
    """
    key = key or new_key(key_type)
    emails = ([email] if email else []) + list(extra_emails)
    builder = _builder(
        _name(common_name or (email or "no email"), org="Autoenroll Users"),
        ca.cert.subject,
        key.public_key(),
        not_before=not_before or NOW - DAY,
        not_after=not_after or NOW + 365 * DAY,
    ).add_extension(_aki(ca, key.public_key()), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    if key_usage is not None:
        builder = builder.add_extension(
            _key_usage(
                digital_signature=key_usage == "digitalSignature",
                key_encipherment=key_usage == "keyEncipherment",
                key_agreement=key_usage == "keyAgreement",
            ),
            critical=True,
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if emails:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails]), critical=False
        )
    return Issued(builder.sign(ca.key, _hash_for(ca.key)), key)


def make_self_signed_user(email: str, *, key_type: str = "ec") -> Issued:
    """A leaf that signs itself: looks like a user certificate, chains to nothing."""
    key = new_key(key_type)
    me = Issued(
        x509.CertificateBuilder()  # placeholder so make_user_cert can read our SKI and subject
        .subject_name(_name(email, org="Autoenroll Users"))
        .issuer_name(_name(email, org="Autoenroll Users"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - DAY)
        .not_valid_after(NOW + DAY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256()),
        key,
    )
    return make_user_cert(me, email, key=key)


def make_leaf_signed_chain(ca: Issued, email: str) -> tuple[Issued, Issued]:
    """(leaf, fake_intermediate): a genuine user certificate from `ca` used as an issuer.

    The fake intermediate has no CA rights (BasicConstraints cA=false, no keyCertSign), so a correct
    verifier must refuse the chain leaf → fake_intermediate → ca.
    """
    fake_intermediate = make_user_cert(ca, "intermediate@example.org")
    leaf = make_user_cert(fake_intermediate, email)
    return leaf, fake_intermediate


def make_agent_cert(
    ca: Issued,
    dns_name: str,
    *,
    eku: tuple[x509.ObjectIdentifier, ...] | None = (SERVER_AUTH, CLIENT_AUTH),
    key_type: str = "ec",
    key: PrivateKey | None = None,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """A user server's TLS certificate (it presents its server certificate as TLS client certificate)."""
    key = key or new_key(key_type)
    builder = (
        _builder(
            _name(dns_name, org="Autoenroll Agents"),
            ca.cert.subject,
            key.public_key(),
            not_before=not_before or NOW - DAY,
            not_after=not_after or NOW + 365 * DAY,
        )
        .add_extension(_aki(ca, key.public_key()), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True, key_encipherment=key_type.startswith("rsa")), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    return Issued(builder.sign(ca.key, _hash_for(ca.key)), key)


def chain_der(*issued: Issued) -> list[bytes]:
    """DER list in x5c order (leaf first)."""
    return [i.der for i in issued]
