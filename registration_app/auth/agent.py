"""The connected user server (agent), from its TLS client certificate.

gunicorn verified the handshake already, but behind a TLS-terminating proxy the certificate arrives in a
header, so it is verified again here, against the agent anchors, at `now`. The agent presents its *server*
certificate as TLS client certificate: its EKU must contain clientAuth or serverAuth.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from registration_app.core.errors import (
    AgentNotAllowed,
    AgentRevoked,
    BadClientCertificate,
    ConfigError,
    NoClientCertificate,
)
from registration_app.core.model import AgentIdentity
from registration_app.core.thumbprint import thumbprint

from .keypolicy import check_certificate_key

__all__ = ["AgentPolicy", "identify_agent", "thumbprint", "ANY_AGENT"]

VERIFIED_CACHE_SIZE = 1024
ANY_AGENT = "*"  # in `allowed`: any certificate that chains to the anchors
_TLS_EKUS = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)


@dataclass(frozen=True)
class AgentPolicy:
    """Which user servers may connect.

    anchors: CA certificates that issue agent certificates (an intermediate may be an anchor: the TLS
    layer gives us only the peer certificate, no chain).
    allowed: subject CN, DNS SAN (both case-insensitive), full RFC 4514 subject, or "*" for any.
    """

    anchors: tuple[x509.Certificate, ...]
    allowed: frozenset[str]
    # "agent-name=domain" entries: that agent may act only for users of those mail domains (an agent
    # with no entry acts for anyone its certificate and the allow-list admit).
    scopes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if not self.anchors:
            raise ConfigError("no agent trust anchors are configured")
        for entry in self.scopes:
            name, sep, domain = entry.partition("=")
            if not sep or not name.strip() or not domain.strip():
                raise ConfigError(f"agent scope {entry!r} must read agent-name=mail-domain")

    def check_user(self, agent: AgentIdentity, email: str) -> None:
        """Refuse a user outside the agent's mail domains (AgentNotAllowed)."""
        domains: set[str] = set()
        names = {n.casefold() for n in agent.names} | {agent.subject.casefold()}
        for entry in self.scopes:
            name, _, domain = entry.partition("=")
            if name.strip().casefold() in names:
                domains.add(domain.strip().casefold().lstrip("@"))
        if not domains:
            return
        user_domain = email.rpartition("@")[2].casefold()
        if user_domain not in domains:
            raise AgentNotAllowed(f"this user server may act only for users of {', '.join(sorted(domains))}")

    @functools.cached_property
    def verified(self) -> dict:
        """Certificates whose chain verified: DER → (not_before, not_after, subject, names, thumbprint)."""
        return {}

    @functools.cached_property
    def store(self) -> Store:
        # cached_property writes the instance __dict__ directly, so it works on a frozen dataclass
        return Store(list(self.anchors))

    def permits(self, names: frozenset[str], subject: str) -> bool:
        allowed = {a.casefold() for a in self.allowed}
        return ANY_AGENT in allowed or subject.casefold() in allowed or any(n.casefold() in allowed for n in names)


def identify_agent(peer_der: bytes | None, policy: AgentPolicy, now: datetime,
                   is_revoked: Callable[[str], bool] | None = None) -> AgentIdentity:
    """Raises NoClientCertificate, BadClientCertificate (not parseable or not trusted), WeakKey, AgentRevoked
    (`is_revoked(thumbprint)`, asked on every request: a revocation cuts kept-alive connections too),
    AgentNotAllowed."""
    identity = _identify(peer_der, policy, now)
    if is_revoked is not None and is_revoked(identity.thumbprint):
        raise AgentRevoked(f"the TLS client certificate of the user server {identity.subject!r} has been "
                           "revoked; issue it a new one (autoenroll client-cert)")
    return identity


def _identify(peer_der: bytes | None, policy: AgentPolicy, now: datetime) -> AgentIdentity:
    if not peer_der:
        raise NoClientCertificate("this endpoint requires the user server's TLS client certificate")
    peer_der = bytes(peer_der)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    known = policy.verified.get(peer_der)
    if known is not None and known[0] <= now <= known[1]:
        # A keep-alive agent presents the same certificate on every request: the chain was verified
        # already; only the clock can have changed, and that is checked again here.
        subject, names = known[2], known[3]
        if not policy.permits(names, subject):
            raise AgentNotAllowed(f"the user server {subject!r} is not on the allow list")
        return AgentIdentity(subject=subject, names=names, certificate_der=peer_der, thumbprint=known[4])
    try:
        cert = x509.load_der_x509_certificate(peer_der)
        subject = cert.subject.rfc4514_string()
        names = _names(cert)
    except Exception:  # whatever a proxy header or a peer sends, a parse failure is the client's
        raise BadClientCertificate("the TLS client certificate is not a valid DER certificate") from None
    # The TLS layer may be configured to accept weaker keys (and a proxy forwards whatever it got).
    check_certificate_key(cert, f"the key of the TLS client certificate {subject!r}")

    verifier = (
        PolicyBuilder()
        .store(policy.store)
        .time(now)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
        .build_client_verifier()
    )
    try:
        verifier.verify(cert, [])
    except VerificationError as error:
        text = str(error).removeprefix("validation failed: ")[:300]
        raise BadClientCertificate(f"the TLS client certificate {subject!r} is not trusted: {text}") from None

    if not policy.permits(names, subject):
        raise AgentNotAllowed(f"the user server {subject!r} is not on the allow list")
    print_ = thumbprint(peer_der)
    if len(policy.verified) >= VERIFIED_CACHE_SIZE:
        policy.verified.clear()  # a handful of user servers is the normal case; never grow unbounded
    policy.verified[peer_der] = (cert.not_valid_before_utc, cert.not_valid_after_utc, subject, names, print_)
    return AgentIdentity(subject=subject, names=names, certificate_der=peer_der, thumbprint=print_)


def _names(cert: x509.Certificate) -> frozenset[str]:
    names: set[str] = {
        attr.value for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME) if isinstance(attr.value, str)
    }
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset(names)
    names.update(san.get_values_for_type(x509.DNSName))
    names.update(san.get_values_for_type(x509.RFC822Name))
    names.update(san.get_values_for_type(x509.UniformResourceIdentifier))
    return frozenset(names)


def _leaf_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage) -> None:
    if not any(oid in eku for oid in _TLS_EKUS):
        raise ValueError("the certificate's extended key usage has neither clientAuth nor serverAuth")


def _ca_eku(policy: Policy, cert: x509.Certificate, eku: x509.ExtendedKeyUsage | None) -> None:
    if eku is None or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in eku:
        return
    if not any(oid in eku for oid in _TLS_EKUS):
        raise ValueError("a CA in the chain restricts its extended key usage and excludes TLS")


_EE_POLICY = ExtensionPolicy.webpki_defaults_ee().require_present(
    x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _leaf_eku
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ca_eku)
