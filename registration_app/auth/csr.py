"""A user's certificate signing request (client-generated signature keys).

The CSR proves possession of the key and nothing else: the CA takes only its public key and builds the
subject from the directory. We still refuse a CSR that asks for something else (another mailbox, extra
extensions, CA rights), so that a confused or malicious agent gets a clear 4xx instead of a surprise.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from registration_app.core.errors import CsrMismatch, MalformedCSR
from registration_app.core.model import KeyType

from .keypolicy import MAX_RSA_BITS, check_public_key

__all__ = ["verify_csr", "ALLOWED_CSR_EXTENSIONS", "MAX_RSA_BITS"]

ALLOWED_CSR_EXTENSIONS = frozenset(
    {ExtensionOID.SUBJECT_ALTERNATIVE_NAME, ExtensionOID.KEY_USAGE, ExtensionOID.EXTENDED_KEY_USAGE}
)
MAX_CSR_CHARS = 64 * 1024
_MIN_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}
_BASE64 = re.compile(r"[A-Za-z0-9+/=_\-\s]*")


def verify_csr(
    pem_or_der: str | bytes,
    *,
    email: str,
    allowed_key_types: Collection[KeyType] = (KeyType.EC_P256, KeyType.RSA_2048, KeyType.RSA_3072),
) -> x509.CertificateSigningRequest:
    """Parse and check a CSR for the authenticated `email`.

    Accepts PEM, DER, or base64/base64url of DER (text). The key must meet the key policy
    (keypolicy.py: WeakKey) and then the profile's key types: EC_P256 allows EC P-256; RSA_2048
    allows RSA of at least 2048 bits, RSA_3072 at least 3072 (up to MAX_RSA_BITS).
    Raises MalformedCSR (unparseable, bad signature, forbidden extension or key type), WeakKey or
    CsrMismatch (another email address).
    """
    csr = _parse(pem_or_der)
    check_public_key(csr.public_key(), "the CSR key")  # before the signature check costs anything
    try:
        signature_ok = csr.is_signature_valid
    except Exception:  # e.g. a signature algorithm cryptography does not know
        signature_ok = False
    if not signature_ok:
        raise MalformedCSR("the CSR signature does not verify (no proof of possession of the key)")

    _check_key(csr, allowed_key_types)
    _check_extensions(csr)
    _check_email(csr, email)
    return csr


def _parse(data: str | bytes) -> x509.CertificateSigningRequest:
    if isinstance(data, str):
        if len(data) > MAX_CSR_CHARS:
            raise MalformedCSR("the CSR is too long")
        text = data.strip()
        if text.startswith("-----BEGIN"):
            raw = text.encode("utf-8", "replace")
            pem = True
        else:
            raw = _from_base64(text)
            pem = False
    elif isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data)
        pem = raw.lstrip().startswith(b"-----BEGIN")
    else:
        raise MalformedCSR("the CSR must be PEM text, base64 text or DER bytes")
    try:
        csr = x509.load_pem_x509_csr(raw) if pem else x509.load_der_x509_csr(raw)
        # Parsing is lazy: read every field we use now, so a malformed one is reported as such.
        csr.subject  # noqa: B018
        csr.extensions  # noqa: B018
        csr.public_key()
    except Exception:  # truncated DER, garbage, unsupported key algorithm, duplicate extensions, ...
        raise MalformedCSR("the CSR is not a valid PKCS#10 request (PEM or DER)") from None
    return csr


def _from_base64(text: str) -> bytes:
    """Standard or url-safe base64 of DER, padding optional, line breaks allowed."""
    if not _BASE64.fullmatch(text):
        raise MalformedCSR("the CSR is neither PEM nor base64 of DER")
    compact = "".join(text.split()).rstrip("=").replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (ValueError, binascii.Error):
        raise MalformedCSR("the CSR is neither PEM nor base64 of DER") from None


def _check_key(csr: x509.CertificateSigningRequest, allowed: Collection[KeyType]) -> None:
    key = csr.public_key()
    names = ", ".join(k.value for k in allowed) or "none"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1) and KeyType.EC_P256 in allowed:
            return
        raise MalformedCSR(f"the CSR key is EC {key.curve.name}; allowed key types: {names}")
    if isinstance(key, rsa.RSAPublicKey):
        minimum = min((bits for kt, bits in _MIN_RSA_BITS.items() if kt in allowed), default=None)
        if minimum is None or key.key_size < minimum:
            raise MalformedCSR(f"the CSR key is RSA-{key.key_size}; allowed key types: {names}")
        return
    raise MalformedCSR(f"the CSR key type is not supported; allowed key types: {names}")


def _check_extensions(csr: x509.CertificateSigningRequest) -> None:
    for extension in csr.extensions:
        if extension.oid not in ALLOWED_CSR_EXTENSIONS:
            name = getattr(extension.oid, "_name", None) or "unknown"
            raise MalformedCSR(
                f"the CSR requests extension {extension.oid.dotted_string} ({name}); only "
                "subjectAltName, keyUsage and extendedKeyUsage may be requested"
            )
        value = extension.value
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise MalformedCSR("the CSR requests CA key usages (keyCertSign/cRLSign)")
        if isinstance(value, x509.ExtendedKeyUsage) and any(
            oid != ExtendedKeyUsageOID.EMAIL_PROTECTION for oid in value
        ):
            raise MalformedCSR("the CSR may request only the emailProtection extended key usage")


def _check_email(csr: x509.CertificateSigningRequest, email: str) -> None:
    wanted = email.casefold()
    for attribute in csr.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        if not isinstance(attribute.value, str) or attribute.value.casefold() != wanted:
            raise CsrMismatch(f"the CSR subject names another email address than {email}")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    for name in san:
        if not isinstance(name, x509.RFC822Name):
            raise MalformedCSR("the CSR subjectAltName may contain only the user's email address")
        if name.value.casefold() != wanted:
            raise CsrMismatch(f"the CSR subjectAltName names another email address than {email}")
