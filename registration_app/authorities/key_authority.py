"""The key authority: key pair (or CSR) → escrow → signature → PKCS#12.

With a local CA and KRA (the server platform, `LocalKeyAuthority`), the sealed key, the certificate, its
outbox row, the audit rows and the request's nonce are committed in ONE transaction, after the key is
sealed and the certificate signed in memory: either all of it is durable or none, so no certificate can
exist without its escrowed key, and an enrollment costs one commit (one fsync, one turn of the SQLite
writer lock). With a remote KRA and CA (split deployment, `SplitKeyAuthority`) the escrow has two phases
(authorities/kra.py): the KRA records the sealed key *pending* before the CA signs, and *confirms* it once
the CA has recorded the certificate; on a CA failure the key authority *withdraws* it (void, never
recoverable), and whatever the RA fails to do the KRA's sweep settles by the CA's records. So no certificate
exists without its escrowed key, and no recoverable escrow without its certificate. Either way nothing is
returned to the caller before both are durable.

Bulk provisioning uses the same pipeline for many users at once (`LocalKeyAuthority.issue_batch`): keys,
sealed escrows and certificates made in memory, then the whole batch in one transaction.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..auth import nonces
from ..auth.nonces import NonceToken
from ..core.batch import BatchIssued, BatchOrder, IssuedInBatch
from ..core.errors import AutoenrollError, BadNonce, BadRequest, ConfigError, Conflict, DuplicateRecord, EscrowFailed
from ..core.model import Profile, Subject, UserEntry
from ..core.ports import CertificateAuthority, KeyAuthority, RecoveryAuthority
from ..store import audit
from ..store.batch import insert_escrows
from ..store.db import Database
from ..store.errors import lost_race_message, lost_renewal_race
from ..store.outbox import mark_published
from ..store.repos import certificates_of
from .ca import LocalCA, ToRecord, serial_hex
from .certs import random_serial
from .keys import KeyPool
from .kra import LocalKRA
from .pkcs12 import DEFAULT_ITERATIONS, to_pkcs12

log = logging.getLogger("autoenroll.key_authority")

# An enrollment's outbox row is held back from the worker this long while the request publishes it
# inline (and the batching thread marks it done): the two never publish the same row at once. If
# the inline attempt fails the row is made due at once; if the process dies, it falls due by itself.
INLINE_PUBLISH_GRACE = timedelta(seconds=5)


@dataclass(frozen=True)
class IssueRequest:
    """What issuance needs: who, which profile, for whom acting, and the key's delivery."""

    user: UserEntry
    profile: Profile
    actor: str  # the agent acting for the user, for the audit log
    password: str | None = None  # protects the PKCS#12 of a server-generated key
    csr: x509.CertificateSigningRequest | None = None
    replaces: str | None = None
    legacy_pkcs12: bool = False


@dataclass
class Decision:
    """What the caller (the RA) decided before it asked for the certificate, for the key authority to
    commit: its audit rows (enrollment.allowed) and the request's nonce, checked but not yet used.

    Each key authority commits it its own way (LocalKeyAuthority: in the issuance's one transaction;
    SplitKeyAuthority: in a transaction of its own before anything is issued) and, whatever happens,
    exactly once: `committed` says whether it has been."""

    audit_events: list[dict] = field(default_factory=list)
    nonce: NonceToken | None = None
    publish_inline: bool = False  # the caller publishes right after: the outbox row is held back meanwhile
    committed: bool = False

    def commit(self, db: Database, now: datetime) -> None:
        """The decision alone, in one transaction (a refusal before issuance, or a split deployment)."""
        if self.committed or (not self.audit_events and self.nonce is None):
            self.committed = True
            return

        def work(conn):
            if self.nonce is not None:
                nonces.spend(conn, self.nonce, now)
            audit.append_many(conn, list(self.audit_events), now)

        db.run(work, core=True)
        self.committed = True

    def commit_rows_only(self, db: Database, now: datetime) -> None:
        """The audit rows alone, when the issuance failed before committing them (its nonce goes with the
        refusal's request.denied row); the issuance's own error is what the caller sees, so a failure here
        is only logged."""
        if self.committed:
            return
        self.committed = True
        if not self.audit_events:
            return
        try:
            db.run(lambda conn: audit.append_many(conn, list(self.audit_events), now), core=True)
        except Exception:
            log.exception("event=audit.write_failed events=%s", ",".join(e["event"] for e in self.audit_events))


class PublishedRows(Protocol):
    """The publisher's rows published inline and not yet marked done (directory_sync's Completions): the
    local key authority marks them in its issuance's transaction, which commits anyway."""

    def carried(self) -> AbstractContextManager[list[tuple[str, list]]]: ...


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    serial: str
    pkcs12: bytes | None
    escrowed: bool
    outbox: object | None = None  # the certificate's outbox row (local CA)
    user_certificates: list | None = None  # the user's certificate rows, read in the issuing transaction


class TwoPhaseEscrow(RecoveryAuthority, Protocol):
    """A KRA that escrows in two phases (authorities/kra.py): RemoteKRA, and LocalKRA behind it."""

    def escrow_pending(self, serial: str, key, *, email: str, profile: str, actor: str,
                       now: datetime | None = None) -> int: ...

    def confirm(self, serial: str, *, actor: str, now: datetime | None = None) -> str: ...

    def withdraw(self, serial: str, *, actor: str, reason: str, now: datetime | None = None) -> str: ...


class SplitKeyAuthority:
    """The key authority of a split deployment (role ra): the CA and the KRA are reached through their
    Protocols; the escrow is recorded pending before the CA signs, then confirmed, or withdrawn when the CA
    fails (the module's docstring). The caller's decision is committed in this process's database (the
    RA's) before anything is issued: a remote CA or KRA keeps its own audit log."""

    ca: CertificateAuthority
    kra: TwoPhaseEscrow

    def __init__(self, ca: CertificateAuthority, kra: TwoPhaseEscrow, pool: KeyPool, db: Database, *,
                 pkcs12_iterations: int = DEFAULT_ITERATIONS):
        self.ca = ca
        self.kra = kra
        self.pool = pool
        self.db = db
        self.pkcs12_iterations = pkcs12_iterations

    def _require_password(self, req: IssueRequest, decision: Decision, now: datetime) -> None:
        """A server-generated key is delivered only in a password-protected PKCS#12; the refusal keeps
        the decision's audit rows (its nonce goes with the refusal's request.denied row)."""
        if req.csr is None and not req.password:
            decision.commit_rows_only(self.db, now)
            raise BadRequest("a password for the PKCS#12 is required when the server generates the key")

    def issue(self, req: IssueRequest, now: datetime | None = None, *, decision: Decision | None = None) -> Issued:
        now = now or datetime.now(timezone.utc)
        decision = decision or Decision()
        self._require_password(req, decision, now)
        decision.commit(self.db, now)  # the nonce used now, before anything is issued
        key, public_key, source = self._key_for(req)
        serial = random_serial()
        serial_text = serial_hex(serial)
        subject = Subject(email=req.user.email, common_name=req.user.common_name)
        if req.profile.escrowed:
            self.kra.escrow_pending(serial_text, key, email=req.user.email, profile=req.profile.name,
                                    actor=req.actor, now=now)
        try:
            cert = self.ca.sign(public_key, req.profile, subject, user_dn=req.user.dn, serial=serial,
                                replaces=req.replaces, key_source=source, actor=req.actor, now=now,
                                entry_id=req.user.entry_id or None)
        except Exception as exc:
            if req.profile.escrowed:
                self._withdraw(serial_text, exc, req.actor, now)
            raise
        if req.profile.escrowed:
            self._confirm(serial_text, req.actor, now)
        p12 = self._pkcs12(req, key, cert)
        return Issued(certificate=cert, chain=self.ca.chain, serial=serial_text, pkcs12=p12,
                      escrowed=req.profile.escrowed)

    def _confirm(self, serial: str, actor: str, now: datetime) -> None:
        """The second phase. The certificate is signed and recorded, its escrow durable (pending): if the
        KRA cannot confirm now, its sweep does (the certificate exists), so the key is delivered anyway."""
        try:
            self.kra.confirm(serial, actor=actor, now=now)
        except Exception as exc:
            log.warning("event=escrow.confirm_deferred serial=%s error=%s detail=%r", serial,
                        getattr(exc, "code", type(exc).__name__), str(exc)[:300])

    def _withdraw(self, serial: str, failure: Exception, actor: str, now: datetime) -> None:
        """The CA failed: the pending escrow is withdrawn, unless the CA gave no answer (it may still record
        the certificate) or the KRA cannot be reached; either way the KRA's sweep settles it by the CA's
        records, after a grace longer than any CA call."""
        code = getattr(failure, "code", type(failure).__name__)
        if getattr(failure, "in_doubt", False):
            log.warning("event=escrow.left_pending serial=%s error=%s: the CA gave no answer", serial, code)
            return
        try:
            self.kra.withdraw(serial, actor=actor, reason=f"the CA failed: {code}", now=now)
        except Exception as exc:
            log.warning("event=escrow.withdraw_failed serial=%s error=%s", serial,
                        getattr(exc, "code", type(exc).__name__))

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
    write to one database, so an issuance is ONE transaction (the module's docstring), which also
    carries the caller's decision and marks the rows the publisher published inline since the last
    one (`published`)."""

    ca: LocalCA
    kra: LocalKRA

    def __init__(self, ca: LocalCA, kra: LocalKRA, pool: KeyPool, *, published: PublishedRows | None = None,
                 pkcs12_iterations: int = DEFAULT_ITERATIONS):
        if kra.db is not ca.db:
            raise ConfigError("an in-process CA and KRA must share one database")
        super().__init__(ca, kra, pool, ca.db, pkcs12_iterations=pkcs12_iterations)
        self.published = published

    def issue(self, req: IssueRequest, now: datetime | None = None, *, decision: Decision | None = None) -> Issued:
        now = now or datetime.now(timezone.utc)
        decision = decision or Decision()
        self._require_password(req, decision, now)
        return self._issue_in_one_transaction(req, decision, now)

    def _issue_in_one_transaction(self, req: IssueRequest, decision: Decision, now: datetime) -> Issued:
        key, public_key, source = self._key_for(req)
        serial = random_serial()
        serial_text = serial_hex(serial)
        subject = Subject(email=req.user.email, common_name=req.user.common_name)
        try:
            blob = self.kra.seal(serial_text, key, email=req.user.email, profile=req.profile.name) \
                if req.profile.escrowed else None
            cert = self.ca.build_certificate(public_key, req.profile, subject, serial=serial, now=now)
        except BaseException:
            decision.commit_rows_only(self.db, now)
            raise
        publish_after = INLINE_PUBLISH_GRACE if decision.publish_inline else timedelta(0)
        published = self.published.carried() if self.published is not None else nullcontext([])
        decided = audit.prepare(decision.audit_events, now)  # before the writer lock, not inside it

        def work(conn, carried: list[tuple[str, list]]):
            if decision.nonce is not None:
                nonces.spend(conn, decision.nonce, now, savepoint=False)
            events: list = list(decided)
            if blob is not None:
                events.append(self.kra.insert_sealed(conn, serial_text, blob, email=req.user.email,
                                                     profile=req.profile.name, actor=req.actor, now=now))
            outbox = self.ca.record_issued(conn, cert, req.profile, subject, user_dn=req.user.dn,
                                           replaces=req.replaces, key_source=source, actor=req.actor, now=now,
                                           deferred_audit=events, publish_after=publish_after,
                                           entry_id=req.user.entry_id or None)
            if carried:  # what earlier requests of this process published, marked in this commit
                events.extend(mark_published(conn, carried))
            audit.append_many(conn, events, now)
            return outbox, certificates_of(conn, req.user.dn)

        try:
            with published as carried:
                outbox, user_certificates = self.db.run(lambda conn: work(conn, carried), core=True)
        except DuplicateRecord as exc:
            decision.commit_rows_only(self.db, now)
            if lost_renewal_race(exc):
                raise Conflict(lost_race_message(exc)) from exc
            if blob is not None:
                raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc
            raise
        except BadNonce:
            decision.committed = True  # the refusal's request.denied row is all that is written
            raise
        except BaseException as exc:
            decision.commit_rows_only(self.db, now)
            if blob is not None and not isinstance(exc, AutoenrollError):
                raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc
            raise
        decision.committed = True
        p12 = self._pkcs12(req, key, cert)
        return Issued(certificate=cert, chain=self.ca.chain, serial=serial_text, pkcs12=p12,
                      escrowed=req.profile.escrowed, outbox=outbox, user_certificates=user_certificates)

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
        except DuplicateRecord:
            pass
        issued, refused = [], []
        for item in items:
            try:
                (outbox_id,) = self.ca.db.run(lambda conn, i=item: self._record_signed(conn, order, [i], now),
                                              core=True)
            except DuplicateRecord:
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
