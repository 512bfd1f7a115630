"""The key authority: key pair (or CSR) → escrow → signature → PKCS#12.

With a local CA and KRA (the server platform, `LocalKeyAuthority`), the sealed key, the certificate, its
outbox row, the audit rows and the request's nonce are committed in ONE transaction, after the key is
sealed and the certificate signed in memory: either all of it is durable or none, so no certificate can
exist without its escrowed key, and an enrollment costs one commit (one fsync, one turn of the SQLite
writer lock). With a remote KRA and CA (split deployment, `SplitKeyAuthority`) escrow comes first and is
committed before the CA signs: a failure at any later step leaves an escrowed key for a certificate that
never existed (harmless, audited) rather than a certificate whose key cannot be recovered. Either way
nothing is returned to the caller before both are durable.

Bulk provisioning uses the same pipeline for many users at once (`LocalKeyAuthority.issue_batch`): keys,
sealed escrows and certificates made in memory, then the whole batch in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from ..core.batch import BatchIssued, BatchOrder, IssuedInBatch
from ..core.errors import AutoenrollError, BadNonce, BadRequest, ConfigError, Conflict, EscrowFailed
from ..core.model import Profile, Subject, UserEntry
from ..core.ports import CertificateAuthority, KeyAuthority, RecoveryAuthority
from ..store import audit
from ..store.batch import insert_escrows
from ..store.repos import NonceToken, certificates_of, record_nonce
from .ca import LocalCA, ToRecord, lost_renewal_race, serial_hex
from .certs import random_serial
from .keys import KeyPool
from .kra import LocalKRA
from .pkcs12 import DEFAULT_ITERATIONS, to_pkcs12

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
    # The request's nonce, checked but not yet used: recorded in the issuance's transaction (so a
    # replay racing the original issues nothing); only when `records_audit_events`.
    nonce: NonceToken | None = None
    # Hold the outbox row back from the worker this long: the caller publishes inline right after.
    publish_after: timedelta = timedelta(0)
    # More of the caller's statements for the issuance's one transaction (marking outbox rows that
    # earlier requests published); returns audit events to append with the issuance's. Local only.
    more_work: Callable[[Connection], list[dict]] | None = None


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    serial: str
    pkcs12: bytes | None
    escrowed: bool
    outbox: object | None = None  # the certificate's outbox row (local CA)
    user_certificates: list | None = None  # the user's certificate rows, read in the issuing transaction


class SplitKeyAuthority:
    """The key authority of a split deployment (role ra): the CA and the KRA are reached through their
    Protocols, so escrow is committed before the CA signs."""

    # Whether `IssueRequest.audit_events` and `nonce` can ride in the issuance's transaction: only when
    # the CA and the KRA write to this process's database (LocalKeyAuthority). A RemoteCA/RemoteKRA
    # keeps its own audit log, so the RA appends its rows itself.
    records_audit_events = False
    ca: CertificateAuthority
    kra: RecoveryAuthority

    def __init__(self, ca: CertificateAuthority, kra: RecoveryAuthority, pool: KeyPool, *,
                 pkcs12_iterations: int = DEFAULT_ITERATIONS):
        self.ca = ca
        self.kra = kra
        self.pool = pool
        self.pkcs12_iterations = pkcs12_iterations

    def issue(self, req: IssueRequest, now: datetime | None = None) -> Issued:
        now = now or datetime.now(timezone.utc)
        if req.audit_events:
            raise ConfigError("audit events cannot be recorded with a remote CA or KRA")
        if req.nonce is not None:
            raise ConfigError("a nonce cannot be recorded with a remote CA or KRA")
        if req.csr is None and not req.password:
            raise BadRequest("a password for the PKCS#12 is required when the server generates the key")
        key, public_key, source = self._key_for(req)
        serial = random_serial()
        subject = Subject(email=req.user.email, common_name=req.user.common_name)
        if req.profile.escrowed:
            self.kra.escrow(serial_hex(serial), key, email=req.user.email, profile=req.profile.name,
                            actor=req.actor, now=now)
        cert = self.ca.sign(public_key, req.profile, subject, user_dn=req.user.dn, serial=serial,
                            replaces=req.replaces, key_source=source, actor=req.actor, now=now,
                            entry_id=req.user.entry_id or None)
        p12 = self._pkcs12(req, key, cert)
        return Issued(certificate=cert, chain=self.ca.chain, serial=serial_hex(serial), pkcs12=p12,
                      escrowed=req.profile.escrowed)

    def _key_for(self, req: IssueRequest):
        """(private key or None, public key, key source): the CSR's key, or one from the pool."""
        if req.csr is not None:
            return None, req.csr.public_key(), "client"
        key = self.pool.take(req.profile.key_type)
        return key, key.public_key(), "server"

    def _pkcs12(self, req: IssueRequest, key, cert: x509.Certificate) -> bytes | None:
        if key is None:
            return None
        assert req.password is not None, "issue() refuses a server-generated key without a password"
        return to_pkcs12(key=key, cert=cert, chain=self.ca.chain, password=req.password,
                         friendly_name=f"{req.user.email} {req.profile.name}", legacy=req.legacy_pkcs12,
                         iterations=self.pkcs12_iterations)


class LocalKeyAuthority(SplitKeyAuthority):
    """The key authority of the server platform (role all): the CA and the KRA are in this process and
    write to one database, so an issuance is ONE transaction (the module's docstring)."""

    records_audit_events = True
    ca: LocalCA
    kra: LocalKRA

    def __init__(self, ca: LocalCA, kra: LocalKRA, pool: KeyPool, *, pkcs12_iterations: int = DEFAULT_ITERATIONS):
        if kra.db is not ca.db:
            raise ConfigError("an in-process CA and KRA must share one database")
        super().__init__(ca, kra, pool, pkcs12_iterations=pkcs12_iterations)

    def issue(self, req: IssueRequest, now: datetime | None = None) -> Issued:
        now = now or datetime.now(timezone.utc)
        if req.csr is None and not req.password:
            self._audit_alone(req.audit_events, now)
            raise BadRequest("a password for the PKCS#12 is required when the server generates the key")
        return self._issue_in_one_transaction(req, now)

    def _issue_in_one_transaction(self, req: IssueRequest, now: datetime) -> Issued:
        key, public_key, source = self._key_for(req)
        serial = random_serial()
        serial_text = serial_hex(serial)
        subject = Subject(email=req.user.email, common_name=req.user.common_name)
        try:
            blob = self.kra.seal(serial_text, key, email=req.user.email, profile=req.profile.name) \
                if req.profile.escrowed else None
            cert = self.ca.build_certificate(public_key, req.profile, subject, serial=serial, now=now)
        except BaseException:
            self._audit_alone(req.audit_events, now)
            raise

        def work(conn):
            if req.nonce is not None and not record_nonce(conn, req.nonce, now, savepoint=False):
                raise BadNonce("the nonce was used by another request meanwhile; get a new one")
            events = list(req.audit_events)
            if blob is not None:
                events.append(self.kra.insert_sealed(conn, serial_text, blob, email=req.user.email,
                                                     profile=req.profile.name, actor=req.actor, now=now))
            outbox = self.ca.record_issued(conn, cert, req.profile, subject, user_dn=req.user.dn,
                                           replaces=req.replaces, key_source=source, actor=req.actor, now=now,
                                           deferred_audit=events, publish_after=req.publish_after,
                                           entry_id=req.user.entry_id or None)
            if req.more_work is not None:
                events.extend(req.more_work(conn))
            audit.append_many(conn, events, now)
            return outbox, certificates_of(conn, req.user.dn)

        try:
            outbox, user_certificates = self.ca.db.run(work, core=True)
        except IntegrityError as exc:
            self._audit_alone(req.audit_events, now)
            if lost_renewal_race(exc):
                raise Conflict("another request already replaced this certificate; "
                               "list your certificates and try again") from exc
            if blob is not None:
                raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc
            raise
        except BadNonce:
            raise
        except BaseException as exc:
            self._audit_alone(req.audit_events, now)
            if blob is not None and not isinstance(exc, AutoenrollError):
                raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc
            raise
        p12 = self._pkcs12(req, key, cert)
        return Issued(certificate=cert, chain=self.ca.chain, serial=serial_text, pkcs12=p12,
                      escrowed=req.profile.escrowed, outbox=outbox, user_certificates=user_certificates)

    def _audit_alone(self, events, now: datetime) -> None:
        """The caller's rows in a transaction of their own, when the issuance failed before committing
        them; the issuance's own error is what the caller sees, so a failure here is only logged."""
        if not events:
            return
        try:
            self.ca.db.run(lambda session: audit.append_many(session, list(events), now))
        except Exception:
            log.exception("event=audit.write_failed events=%s", ",".join(e["event"] for e in events))

    # -- batch issuance (bulk provisioning) -------------------------------------------------------
    def issue_batch(self, order: BatchOrder, now: datetime | None = None) -> BatchIssued:
        """generate → escrow → sign → store for every user of the order: keys generated, sealed for the
        KRA and certificates signed in memory (`sign_batch`), then the escrow rows, certificate rows,
        outbox rows and audit rows of the whole batch committed in ONE transaction (`record_batch`)."""
        now = now or datetime.now(timezone.utc)
        return self.record_batch(order, self.sign_batch(order, now), now)

    def sign_batch(self, order: BatchOrder, now: datetime) -> SignedBatch:
        """The batch's keys sealed for the KRA and its certificates signed, in memory: nothing is
        recorded, nothing is returned that could be used before `record_batch` commits it."""
        profile = order.profile
        if not profile.escrowed:  # a key nobody receives now must be recoverable later
            raise BadRequest(f"profile {profile.name!r} is not an escrowed encryption profile: signature keys "
                             "are generated by their owners, and nobody else may hold them")
        serials, certificates, sealed = [], [], []
        for user in order.users:
            key = self.pool.take(profile.key_type)
            serial = random_serial()
            sealed.append(self.kra.seal(serial_hex(serial), key, email=user.email, profile=profile.name))
            cert = self.ca.build_certificate(key.public_key(), profile, Subject(
                email=user.email, common_name=user.common_name or None), serial=serial, now=now)
            serials.append(serial)
            certificates.append(cert.public_bytes(Encoding.DER))
        return SignedBatch(tuple(serials), tuple(certificates), tuple(sealed))

    def record_batch(self, order: BatchOrder, signed: SignedBatch, now: datetime) -> BatchIssued:
        """Commit a signed batch in one transaction; if a concurrent enrollment collides (the renewal
        key of a user), record the users one by one and refuse those who got a certificate meanwhile."""
        items = [(user, order.replaced_by(i), signed.serials[i], x509.load_der_x509_certificate(signed.certificates[i]),
                  signed.sealed[i]) for i, user in enumerate(order.users)]
        try:
            outbox_ids = self.ca.db.run(lambda conn: self._record_signed(conn, order, items, now), core=True)
            return BatchIssued(tuple(IssuedInBatch(user, serial_hex(serial), cert, outbox_id)
                                     for (user, _, serial, cert, _), outbox_id in zip(items, outbox_ids)))
        except IntegrityError:
            pass
        issued, refused = [], []
        for item in items:
            try:
                (outbox_id,) = self.ca.db.run(lambda conn, i=item: self._record_signed(conn, order, [i], now),
                                              core=True)
            except IntegrityError:
                refused.append((item[0], "a certificate was issued meanwhile"))
                continue
            issued.append(IssuedInBatch(item[0], serial_hex(item[2]), item[3], outbox_id))
        return BatchIssued(tuple(issued), tuple(refused))

    def _record_signed(self, conn, order: BatchOrder, items: list, now: datetime) -> list[int | None]:
        """Escrow rows, then certificate + outbox rows, then one audit row per certificate (escrow id in
        its detail), all in the caller's transaction: committed together or not at all."""
        profile = order.profile
        escrow_ids = insert_escrows(conn, [dict(serial=serial_hex(serial), email=user.email, profile=profile.name,
                                                blob=blob, created_at=now)
                                           for user, _, serial, _, blob in items])
        outboxes, events = self.ca.record_issued_many(conn, [ToRecord(
            cert, profile, Subject(email=user.email, common_name=user.common_name or None), user.dn, replaces,
            "server", {"escrowed": True, "escrow_id": escrow_id, **order.detail}, user.entry_id or None)
            for (user, replaces, _, cert, _), escrow_id in zip(items, escrow_ids)], actor=order.actor, now=now)
        audit.append_many(conn, events, now)
        return [outbox.id for outbox in outboxes]


@dataclass(frozen=True)
class SignedBatch:
    """A batch built by `LocalKeyAuthority.sign_batch` and not yet recorded: serials, certificates
    (DER) and the keys sealed for the KRA, in the order of the batch's users."""

    serials: tuple[int, ...]
    certificates: tuple[bytes, ...]
    sealed: tuple[bytes, ...]


if TYPE_CHECKING:
    def _is_key_authority(implementation: LocalKeyAuthority) -> KeyAuthority:
        return implementation
