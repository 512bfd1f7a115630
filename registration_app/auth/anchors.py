"""Trust anchors other than our CA (a partner CA, a national eID), and what their certificates may do.

Our CA vouches for the mail address it put in a certificate: it checked the directory when it issued it.
Another anchor vouches only for its own idea of who owns an address, so its certificate authenticates
just the directory entry that lists that very certificate: its DER among the entry's certificates
(`userCertificate`), or a strong mapping in a configured attribute such as Active Directory's
`altSecurityIdentities`. An anchor may also be limited to mail domains. Recovering escrowed keys
needs a certificate from our CA (or the officers' m-of-n path): an outside CA that can issue a
certificate for an address must not be able to obtain that address's private keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from registration_app.core.errors import (
    AnchorNotAllowed,
    CertificateNotListed,
    ConfigError,
    OwnCaRequired,
    UserNotFound,
)
from registration_app.core.model import UserEntry, UserIdentity

__all__ = [
    "AnchorPolicy",
    "CERTIFICATE_ATTRIBUTE",
    "REVOCATION_MODES",
    "entry_lists_certificate",
    "require_own_ca",
    "user_entry",
]

# The attribute our publisher writes (`userCertificate;binary` on OpenLDAP, `userCertificate` on AD):
# the entry's `certificates` as the directory read them, no extra search needed.
CERTIFICATE_ATTRIBUTE = "userCertificate"
REVOCATION_MODES = ("crl", "none")  # "none" is the explicitly insecure choice: no revocation check


@dataclass(frozen=True)
class AnchorPolicy:
    """One external trust anchor: its CA certificates and what their certificates may authenticate."""

    name: str
    certificates: tuple[x509.Certificate, ...]
    domains: frozenset[str] = frozenset()  # lower-case mail domains; empty: any domain
    revocation: str = "crl"
    max_crl_age: timedelta = timedelta(hours=1)
    match_attribute: str = CERTIFICATE_ATTRIBUTE
    _fingerprints: frozenset[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.revocation not in REVOCATION_MODES:
            raise ConfigError(f"trust anchor {self.name!r}: revocation must be one of "
                              f"{', '.join(REVOCATION_MODES)}, not {self.revocation!r}")
        if self.max_crl_age <= timedelta(0):
            raise ConfigError(f"trust anchor {self.name!r}: max_crl_age_seconds must be positive")
        if not self.match_attribute:
            raise ConfigError(f"trust anchor {self.name!r}: match_attribute must name an attribute")
        object.__setattr__(self, "domains", frozenset(d.strip().lower().lstrip("@") for d in self.domains))
        object.__setattr__(self, "_fingerprints", frozenset(_fingerprint(c) for c in self.certificates))

    def holds(self, certificate: x509.Certificate) -> bool:
        return _fingerprint(certificate) in self._fingerprints

    def check_email(self, email: str) -> None:
        """Refuse an address outside the anchor's domains (AnchorNotAllowed)."""
        domain = email.rpartition("@")[2].lower()
        if self.domains and domain not in self.domains:
            raise AnchorNotAllowed(
                f"certificates of the trust anchor {self.name!r} may authenticate addresses in "
                f"{', '.join(sorted(self.domains))} only, not {email!r}", anchor=self.name)


def _fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def require_own_ca(user: UserIdentity, what: str) -> None:
    """Refuse (403 own_ca_required) a user authenticated by another anchor's certificate."""
    if not user.issuer_is_ours:
        raise OwnCaRequired(
            f"{what} needs a signature certificate from this server's CA; the certificate used "
            f"(serial {user.serial:x}) is from the trust anchor {user.anchor or 'of another CA'!r}. "
            "Bootstrap a signature certificate of ours, or ask the recovery officers", anchor=user.anchor)


def user_entry(directory, user: UserIdentity) -> UserEntry:
    """The directory entry `user` authenticates: the one entry with the certificate's mail address
    and, for another anchor's certificate, only if that entry lists this very certificate."""
    entry = directory.find_user(user.email)
    if entry is None:
        raise UserNotFound(f"no directory entry has the email address {user.email!r}")
    if user.issuer_is_ours:
        return entry
    attribute = user.match_attribute or CERTIFICATE_ATTRIBUTE
    if attribute.lower().partition(";")[0] == CERTIFICATE_ATTRIBUTE.lower():
        values: Iterable[bytes] = entry.certificates
    else:
        values = directory.attribute_values(entry.dn, attribute)
    if not entry_lists_certificate(values, x509.load_der_x509_certificate(user.certificate_der)):
        raise CertificateNotListed(
            f"the certificate (serial {user.serial:x}, trust anchor {user.anchor!r}) is not listed in the "
            f"{attribute} of the directory entry for {user.email}: a certificate of a CA other than ours "
            "authenticates only the entry that lists it; ask an administrator to add it",
            anchor=user.anchor)
    return entry


# --- the entry's values ---------------------------------------------------------------------------


def entry_lists_certificate(values: Iterable[bytes | str], certificate: x509.Certificate) -> bool:
    """Whether one of `values` is `certificate` (its DER) or a strong AD mapping of it.

    Strong `altSecurityIdentities` forms (Microsoft KB5014754): `X509:<I>issuer<SR>serial` (issuer
    DN, serial number bytes in reverse order, hex) and `X509:<SKI>hex`. The weak forms (<S> subject
    only, <I><S> issuer and subject, <RFC822> mail) name no particular certificate and never match.
    """
    der = certificate.public_bytes(Encoding.DER)
    for value in values:
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if raw == der:
            return True
        if raw[:5].upper() == b"X509:" and _strong_mapping_matches(raw, certificate):
            return True
    return False


def _strong_mapping_matches(raw: bytes, certificate: x509.Certificate) -> bool:
    try:
        text = raw.decode("utf-8")[5:]
    except UnicodeDecodeError:
        return False
    upper = text.upper()
    if upper.startswith("<SKI>"):
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            return False
        return text[5:].strip().lower() == ski.hex()
    if upper.startswith("<I>") and "<SR>" in upper:
        at = upper.index("<SR>")
        issuer, serial = text[3:at], text[at + 4:].strip().lower()
        number = certificate.serial_number
        reversed_hex = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")[::-1].hex()
        return serial == reversed_hex and _same_name(issuer, certificate.issuer)
    return False


def _same_name(text: str, name: x509.Name) -> bool:
    """AD writes DNs most significant RDN first (DC=org,DC=example,CN=CA); RFC 4514 the other way round."""
    try:
        parsed = x509.Name.from_rfc4514_string(text.strip())
    except ValueError:
        return False
    wanted = {parsed.rfc4514_string().lower(), x509.Name(list(reversed(parsed.rdns))).rfc4514_string().lower()}
    return name.rfc4514_string().lower() in wanted
