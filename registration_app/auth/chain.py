"""The user's identity from the certificate chain (`x5c`) of their JWS.

The chain is verified with `cryptography.x509.verification` against the configured user trust anchors.
S/MIME certificates carry the emailProtection EKU, not clientAuth, so the client verifier gets explicit
extension policies: the leaf must have emailProtection and digitalSignature; a CA that restricts its
EKU must allow emailProtection (or anyExtendedKeyUsage).

Checks that the verifier would also make (validity, EKU, key usage, an email SAN) are made first, by
hand, so that the caller gets a message that says what to do instead of a generic "chain failed".

Revocation: a certificate of our CA is looked up by the caller's `is_revoked` (our database); one of
another trust anchor is checked by CRL (revocation.py), fail closed, unless that anchor is configured
with the insecure `revocation = "none"`. Its anchor's mail domains are enforced here; which entry it
may authenticate is decided by anchors.py `user_entry`.

A chain that verified is remembered per exact `x5c` (`VerifiedChains`, one per `UserTrust`): its next
request skips parsing and path building, but validity (of every certificate of the path) and
revocation are checked again on every request.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from registration_app.core.errors import (
    CertificateExpired,
    CertificateRevoked,
    ConfigError,
    MalformedJWS,
    UntrustedChain,
    WrongKeyUsage,
)
from registration_app.core.model import UserIdentity

from .anchors import AnchorPolicy
from .keypolicy import check_certificate_key
from .revocation import CrlChecker

__all__ = ["UserTrust", "VerifiedChains", "verify_user_chain", "MAX_CHAIN_LENGTH"]

MAX_CHAIN_LENGTH = 5  # certificates in x5c, leaf included
VERIFIED_CHAINS_KEPT = 2048  # per process: a few MB (PERFORMANCE.md, "Authentication")

_EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION
_ANY_EKU = ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE
_BOOTSTRAP_HINT = "ask an administrator for an enrollment code and bootstrap a new certificate"


@dataclass(frozen=True)
class _Verified:
    """What verifying one `x5c` found, valid for any `now` within [valid_from, valid_until]."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # the verified path, leaf first, anchor last
    email: str
    ours: bool
    policy: AnchorPolicy | None
    valid_from: datetime  # the latest notBefore of the path
    valid_until: datetime  # the earliest notAfter of the path


class VerifiedChains:
    """The chains that verified, by their exact DER (leaf and intermediates), least recently used out
    first. Only what depends on nothing but the certificates and the trust anchors is kept; the caller
    checks the time window and revocation on every request."""

    def __init__(self, kept: int = VERIFIED_CHAINS_KEPT) -> None:
        self._kept = kept
        self._entries: OrderedDict[tuple[bytes, ...], _Verified] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[bytes, ...]) -> _Verified | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[bytes, ...], verified: _Verified) -> None:
        with self._lock:
            self._entries[key] = verified
            self._entries.move_to_end(key)
            while len(self._entries) > self._kept:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True)
class UserTrust:
    """Trust anchors for user certificates, and the CAs of this server (a subset, or their issuers).

    `external` describes the anchors other than ours (anchors.py); an anchor it does not describe gets
    the default policy: any mail domain, CRL checked, the entry must list the certificate."""

    anchors: tuple[x509.Certificate, ...]
    our_issuers: tuple[x509.Certificate, ...] = ()
    external: tuple[AnchorPolicy, ...] = ()
    revocation: CrlChecker = field(default_factory=CrlChecker, compare=False)
    verified: VerifiedChains = field(default_factory=VerifiedChains, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ConfigError("no user trust anchors are configured")

    def policy_for(self, anchor: x509.Certificate) -> AnchorPolicy:
        """The policy of the anchor a chain ended at (not one of ours)."""
        for policy in self.external:
            if policy.holds(anchor):
                return policy
        return AnchorPolicy(name=anchor.subject.rfc4514_string(), certificates=(anchor,))

    @functools.cached_property
    def store(self) -> Store:
        # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass
        return Store(list(self.anchors))


def verify_user_chain(
    x5c: Sequence[bytes],
    trust: UserTrust,
    now: datetime,
    is_revoked: Callable[[x509.Certificate], bool],
) -> UserIdentity:
    """Verify the DER chain (leaf first) and return who the user is.

    Raises MalformedJWS (not DER), CertificateExpired, UntrustedChain, CertificateRevoked; for another
    anchor's certificate also AnchorNotAllowed (outside its domains) and RevocationUnavailable (no CRL
    answered: fail closed). `is_revoked` is asked only about a leaf of our CA whose chain verified.
    """
    if not x5c:
        raise MalformedJWS("x5c must contain at least the user's certificate")
    if len(x5c) > MAX_CHAIN_LENGTH:
        raise MalformedJWS(f"x5c has {len(x5c)} certificates; at most {MAX_CHAIN_LENGTH} are accepted")
    now = _as_utc(now)
    key = tuple(bytes(der) for der in x5c)
    found = trust.verified.get(key)
    if found is None or not found.valid_from <= now <= found.valid_until:
        found = _verify_path(key, trust, now)
        trust.verified.put(key, found)

    leaf, policy = found.leaf, found.policy
    if policy is not None:
        _check_external_revocation(list(found.chain), policy, trust.revocation, now)
    elif is_revoked(leaf):
        raise CertificateRevoked(
            f"the user certificate (serial {leaf.serial_number:x}) has been revoked and can no longer "
            f"authenticate; {_BOOTSTRAP_HINT}"
        )

    return UserIdentity(
        email=found.email,
        certificate_der=key[0],
        serial=leaf.serial_number,
        not_after=leaf.not_valid_after_utc,
        issuer_is_ours=found.ours,
        anchor=policy.name if policy is not None else "",
        match_attribute=policy.match_attribute if policy is not None else "",
    )


def _verify_path(x5c: tuple[bytes, ...], trust: UserTrust, now: datetime) -> _Verified:
    """Parse and verify the chain at `now`: everything but revocation."""
    certs = [_load_certificate(x5c[0], 0)]
    certs += [_load_ca_certificate(der, index) for index, der in enumerate(x5c[1:], 1)]
    for index, cert in enumerate(certs):  # WeakKey before the verifier builds anything
        check_certificate_key(cert, f"the key of x5c[{index}]" if index else "the user certificate's key")
    leaf, intermediates = certs[0], certs[1:]

    _check_validity(leaf, now)
    _check_leaf_usage(leaf)
    email = _leaf_email(leaf)

    verifier = (
        PolicyBuilder()
        .store(trust.store)
        .time(now)
        .max_chain_depth(MAX_CHAIN_LENGTH)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, intermediates)
    except VerificationError as error:
        raise UntrustedChain(
            f"the user certificate does not chain to a trusted CA: {_short(error)}"
        ) from None

    ours = _issued_by_one_of(leaf, verified.chain[1:2], trust.our_issuers)
    policy = None if ours else trust.policy_for(verified.chain[-1])
    if policy is not None:
        policy.check_email(email)
    path = tuple(verified.chain)
    return _Verified(
        leaf=leaf, chain=path, email=email, ours=ours, policy=policy,
        valid_from=max(cert.not_valid_before_utc for cert in path),
        valid_until=min(cert.not_valid_after_utc for cert in path),
    )


def _check_external_revocation(chain: list[x509.Certificate], policy: AnchorPolicy, checker: CrlChecker,
                               now: datetime) -> None:
    """Every certificate of the verified chain below the anchor, on its issuer's CRL (fail closed)."""
    if policy.revocation == "none":  # explicitly configured as insecure
        return
    for index, cert in enumerate(chain[:-1]):
        if checker.is_revoked(cert, chain[index + 1], policy.max_crl_age, now):
            whose = "user certificate" if index == 0 else f"CA certificate {cert.subject.rfc4514_string()!r}"
            raise CertificateRevoked(
                f"the {whose} (serial {cert.serial_number:x}) is revoked by its issuer's CRL (trust anchor "
                f"{policy.name!r}) and can no longer authenticate"
            )


# --- extension policies -------------------------------------------------------------------


def _leaf_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
    if _EMAIL_PROTECTION not in eku:
        raise ValueError("the leaf's extended key usage lacks emailProtection")


def _leaf_key_usage(policy: Policy, cert: x509.Certificate, ku: x509.KeyUsage) -> None:
    if not ku.digital_signature:
        raise ValueError("the leaf's key usage lacks digitalSignature")


def _ca_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    # An intermediate without EKU is unrestricted; one with EKU must allow S/MIME.
    if eku is not None and _EMAIL_PROTECTION not in eku and _ANY_EKU not in eku:
        raise ValueError("a CA in the chain restricts its extended key usage and excludes emailProtection")


_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .require_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _leaf_eku)
    .require_present(x509.KeyUsage, Criticality.AGNOSTIC, _leaf_key_usage)
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_eku
)


# --- helpers ------------------------------------------------------------------------------


# The CA certificates that x5c chains carry after the leaf, parsed: every user's chain carries the same
# few, and each parse with its fields touched cost as much as the rest of the path's checks
# (PERFORMANCE.md, "Authentication"). A parse depends on nothing but the DER; what is verified of
# them (the path, validity) is not kept here.
_CA_CERTIFICATES_KEPT = 64
_parsed_ca_certificates: dict[bytes, x509.Certificate] = {}


def _load_ca_certificate(der: bytes, index: int) -> x509.Certificate:
    der = bytes(der)
    cert = _parsed_ca_certificates.get(der)
    if cert is None:
        cert = _load_certificate(der, index)
        if len(_parsed_ca_certificates) >= _CA_CERTIFICATES_KEPT:
            _parsed_ca_certificates.clear()  # a handful of issuing CAs is the normal case
        _parsed_ca_certificates[der] = cert
    return cert


class _LastLeaf(threading.local):
    der: bytes | None = None
    cert: x509.Certificate | None = None


_last_leaf = _LastLeaf()


def parse_leaf(der: bytes) -> x509.Certificate:
    """`x509.load_der_x509_certificate` of an x5c leaf, remembered for this thread's last DER: one
    request's checks parse its leaf three times (the read-ahead's serial, the JWS key, the chain).
    Raises what the parse raises; the caller says what that means for the request."""
    der = bytes(der)
    last = _last_leaf
    if last.cert is not None and last.der == der:
        return last.cert
    cert = x509.load_der_x509_certificate(der)
    last.der, last.cert = der, cert
    return cert


def _load_certificate(der: bytes, index: int) -> x509.Certificate:
    try:
        cert = parse_leaf(der) if index == 0 else x509.load_der_x509_certificate(bytes(der))
        # Parsing is lazy: touch what we read later so that a malformed field fails here, as a 400.
        cert.extensions  # noqa: B018
        cert.not_valid_before_utc  # noqa: B018
        cert.not_valid_after_utc  # noqa: B018
        cert.subject  # noqa: B018
        cert.issuer  # noqa: B018
    except Exception as error:  # any parse failure of attacker-supplied DER is a client error
        raise MalformedJWS(f"x5c[{index}] is not a valid DER certificate ({type(error).__name__})") from None
    return cert


def _as_utc(now: datetime) -> datetime:
    return now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)


def _check_validity(leaf: x509.Certificate, now: datetime) -> None:
    if now < leaf.not_valid_before_utc:
        raise CertificateExpired(
            f"the user certificate is not valid before {leaf.not_valid_before_utc.isoformat()} "
            f"(server time {now.isoformat()}); check the clocks, or {_BOOTSTRAP_HINT}"
        )
    if now > leaf.not_valid_after_utc:
        raise CertificateExpired(
            f"the user certificate expired on {leaf.not_valid_after_utc.isoformat()}; an expired "
            f"certificate cannot authenticate: {_BOOTSTRAP_HINT}"
        )


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise WrongKeyUsage("the user certificate has no extended key usage; emailProtection is required") from None
    if _EMAIL_PROTECTION not in eku:
        raise WrongKeyUsage("the user certificate is not an S/MIME certificate: its EKU lacks emailProtection")
    try:
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise WrongKeyUsage("the user certificate has no key usage; digitalSignature is required") from None
    if not ku.digital_signature:
        raise WrongKeyUsage(
            "the user certificate may not sign (key usage lacks digitalSignature): "
            "sign with the user's signature certificate"
        )


def _leaf_email(leaf: x509.Certificate) -> str:
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise UntrustedChain("the user certificate has no subjectAltName with an email address") from None
    emails = san.get_values_for_type(x509.RFC822Name)
    if len(emails) != 1:
        raise UntrustedChain(
            f"the user certificate must name exactly one email address (rfc822Name), it names {len(emails)}"
        )
    return emails[0]


def _issued_by_one_of(
    leaf: x509.Certificate,
    verified_issuer: list[x509.Certificate],
    our_issuers: tuple[x509.Certificate, ...],
) -> bool:
    if verified_issuer and verified_issuer[0] in our_issuers:
        return True
    # The same CA may be configured with another certificate for the same key (renewed, cross-signed).
    for ca in our_issuers:
        if ca.subject != leaf.issuer:
            continue
        try:
            leaf.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return True
    return False


def _short(error: Exception) -> str:
    text = str(error).removeprefix("validation failed: ")
    return text if len(text) <= 300 else text[:297] + "..."
