"""The key authority: key pair (or CSR) → escrow → signature → PKCS#12.

Escrow comes first and is committed before the CA signs: a failure at any later step leaves an
escrowed key for a certificate that never existed (harmless, audited) rather than a certificate
whose key cannot be recovered. Nothing is returned to the caller before both are durable.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509

import logging

from ..core.errors import BadRequest, ConfigError
from ..core.model import Profile, Subject, UserEntry
from ..store import audit
from .ca import LocalCA, serial_hex
from .keys import KeyPool
from .kra import LocalKRA
from .pkcs12 import to_pkcs12

log = logging.getLogger("autoenroll.key_authority")


@dataclass(frozen=True)
class IssueRequest:
    user: UserEntry
    profile: Profile
    actor: str  # the agent acting for the user, for the audit log
    password: str | None = None  # protects the PKCS#12 of a server-generated key
    csr: x509.CertificateSigningRequest | None = None
    replaces: str | None = None
    legacy_pkcs12: bool = False
    # Audit rows of the caller's decision (the RA's enrollment.allowed), committed in the first
    # transaction of the issuance instead of one of their own; only when `records_audit_events`.
    audit_events: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    serial: str
    pkcs12: bytes | None
    escrowed: bool


def new_serial() -> int:
    """159 random bits with the top one set: positive, 20 octets, ≥ 64 bits of CSPRNG output."""
    return secrets.randbits(158) | (1 << 158)


class LocalKeyAuthority:
    def __init__(self, ca: LocalCA, kra: LocalKRA, pool: KeyPool, *, pkcs12_iterations: int = 20000):
        self.ca = ca
        self.kra = kra
        self.pool = pool
        self.pkcs12_iterations = pkcs12_iterations

    @property
    def records_audit_events(self) -> bool:
        """Whether `IssueRequest.audit_events` can ride in the escrow or certificate transaction: only
        when the CA and the KRA write to this process's database. A RemoteCA/RemoteKRA (split
        deployment) keeps its own audit log, so the RA appends its rows itself, as before."""
        return isinstance(self.ca, LocalCA) and isinstance(self.kra, LocalKRA) and self.kra.db is self.ca.db

    def issue(self, req: IssueRequest, now: datetime | None = None) -> Issued:
        now = now or datetime.now(timezone.utc)
        if req.audit_events and not self.records_audit_events:
            raise ConfigError("audit events cannot be recorded with a remote CA or KRA")
        if req.csr is None and not req.password:
            self._audit_alone(req.audit_events, now)
            raise BadRequest("a password for the PKCS#12 is required when the server generates the key")
        events = list(req.audit_events)
        try:
            if req.csr is not None:
                key, public_key, source = None, req.csr.public_key(), "client"
            else:
                key = self.pool.take(req.profile.key_type)
                public_key, source = key.public_key(), "server"
            serial = new_serial()
            subject = Subject(email=req.user.email, common_name=req.user.common_name)
            # The caller's rows ride in the first transaction: the escrow's (which commits before the
            # CA signs; audit order stays allowed, escrowed, issued), else the certificate's. Only
            # passed when there are some: a RemoteKRA/RemoteCA takes no extra_audit.
            if req.profile.escrowed:
                self.kra.escrow(serial_hex(serial), key, email=req.user.email, profile=req.profile.name,
                                actor=req.actor, now=now, **({"extra_audit": events} if events else {}))
                events = []
            cert = self.ca.sign(public_key, req.profile, subject, user_dn=req.user.dn, serial=serial,
                                replaces=req.replaces, key_source=source, actor=req.actor, now=now,
                                **({"extra_audit": events} if events else {}))
        except BaseException:
            self._audit_alone(events, now)  # the transaction that would have carried them did not commit
            raise
        p12 = None
        if key is not None:
            p12 = to_pkcs12(key=key, cert=cert, chain=self.ca.chain, password=req.password,
                            friendly_name=f"{req.user.email} {req.profile.name}",
                            legacy=req.legacy_pkcs12, iterations=self.pkcs12_iterations)
        return Issued(certificate=cert, chain=self.ca.chain, serial=serial_hex(serial), pkcs12=p12,
                      escrowed=req.profile.escrowed)

    def _audit_alone(self, events, now: datetime) -> None:
        """The caller's rows in a transaction of their own, when the issuance failed before committing
        them; the issuance's own error is what the caller sees, so a failure here is only logged."""
        if not events:
            return
        try:
            self.ca.db.run(lambda session: audit.append_many(session, list(events), now))
        except Exception:
            log.exception("event=audit.write_failed events=%s", ",".join(e["event"] for e in events))
