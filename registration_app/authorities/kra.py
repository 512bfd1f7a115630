"""Key recovery authority: escrows encryption keys, gives them back only with a grant.

The RA process holds only the KRA's public storage key; the private storage key is loaded (with
its passphrase) by `recover`, so a split deployment can keep it on the KRA host alone.

In a split deployment the escrow has two phases, so that no escrow stands for a certificate that was
never signed and none is lost for one that was: the RA's key authority has the KRA record the sealed key
*pending* (bound to the serial it chose) before the CA signs, then *confirms* it once the CA has recorded
the certificate, or *withdraws* it when the CA answered with a failure. Whatever the RA does or fails to do,
the KRA settles a pending escrow by the CA's records (the database every role shares), never by the RA's
word: confirmed when the certificate is recorded, void (kept, never recoverable) when it is not, the
latter only once no CA call can still be under way (`PENDING_GRACE`, by the sweep). Recovery gives back
confirmed escrows only. Every step is an audit row: key.escrow_pending, key.escrowed (confirmed),
key.escrow_withdrawn, key.escrow_voided.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..core.errors import Conflict, EscrowFailed, Forbidden, UnknownCertificate
from ..core.model import RecoveryGrant
from ..store import audit
from ..store.db import Database
from ..store.escrow import (CONFIRMED, PENDING, VOID, certificate_recorded, escrow_in, escrow_of, insert_escrow,
                            pending_serials, released_request, settle_pending)
from ..store.repos import certificate_by_serial
from .escrow_crypto import SEAL_ALGORITHM, escrow_aad, open_private_key, seal_private_key
from .officers import OfficerRoster, signer_certificate
from .pkcs12 import DEFAULT_ITERATIONS, to_pkcs12

log = logging.getLogger("autoenroll.kra")

# A pending escrow without its certificate is voided only after this long (the default of the setting
# escrow_pending_grace_seconds, which must exceed the RA's authority_timeout_seconds): far beyond any CA call the RA
# may still have under way (authority_timeout_seconds, 10 s by default), so a certificate the CA records
# late still finds its escrow pending, and the sweep confirms it.
PENDING_GRACE = timedelta(minutes=10)
SWEEP_INTERVAL_SECONDS = 60.0


class LocalKRA:
    def __init__(self, db: Database, storage_public_key, load_storage_private_key: Callable[[], object], *,
                 pkcs12_iterations: int = DEFAULT_ITERATIONS, officers: OfficerRoster | None = None,
                 quorum: int = 2, pending_grace: timedelta = PENDING_GRACE):
        """`officers` (the server platform's): an officers' grant is honoured only while `quorum` of the
        request's approvals still come from current officers. The KRA service (role kra) checks the signed
        evidence instead (kra_verify.py), so it passes none."""
        self.db = db
        self.officers = officers
        self.quorum = quorum
        self.pending_grace = pending_grace  # the sweep's (settings.escrow_pending_grace_seconds)
        self._public = storage_public_key
        self._load_private = load_storage_private_key
        self._private = None
        self.pkcs12_iterations = pkcs12_iterations

    def escrow(self, serial: str, key, *, email: str, profile: str, actor: str,
               now: datetime | None = None) -> int:
        """Seal and commit; returns the escrow id. Any failure raises EscrowFailed."""
        return self.store_sealed(serial, self.seal(serial, key, email=email, profile=profile), email=email,
                                 profile=profile, actor=actor, now=now)

    def escrow_pending(self, serial: str, key, *, email: str, profile: str, actor: str,
                       now: datetime | None = None) -> int:
        """The first phase of a two-phase escrow (the module's docstring): recorded, not yet recoverable."""
        return self.store_sealed(serial, self.seal(serial, key, email=email, profile=profile), email=email,
                                 profile=profile, actor=actor, now=now, pending=True)

    def seal(self, serial: str, key, *, email: str, profile: str) -> bytes:
        """The key sealed to the storage key (nothing stored yet); any failure raises EscrowFailed."""
        try:
            return seal_private_key(key, self._public, escrow_aad(int(serial, 16), email, profile))
        except Exception as exc:
            raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc

    @staticmethod
    def insert_sealed(conn, serial: str, blob: bytes, *, email: str, profile: str, actor: str,
                      now: datetime) -> dict:
        """INSERT the escrow row in the caller's transaction; returns its key.escrowed audit event."""
        escrow_id = insert_escrow(conn, serial=serial, email=email, profile=profile, blob=blob, now=now)
        return dict(event="key.escrowed", outcome="done", actor=actor, subject=email,
                    detail={"serial": serial, "profile": profile, "escrow_id": escrow_id})

    def store_sealed(self, serial: str, blob: bytes, *, email: str, profile: str, actor: str,
                     now: datetime | None = None, pending: bool = False) -> int:
        """Commit a blob sealed by `escrow_crypto.seal_private_key` (by this object, or by an RA that holds
        only the public storage key); returns the escrow id. `pending`: the first phase of a split
        deployment's escrow (the module's docstring), not recoverable until confirmed. Any failure raises
        EscrowFailed."""
        now = now or datetime.now(timezone.utc)
        try:
            def work(conn):
                escrow_id = insert_escrow(conn, serial=serial, email=email, profile=profile, blob=blob, now=now,
                                          state=PENDING if pending else CONFIRMED)
                audit.append(conn, event="key.escrow_pending" if pending else "key.escrowed", outcome="done",
                             actor=actor, subject=email, now=now,
                             detail={"serial": serial, "profile": profile, "escrow_id": escrow_id})
                return escrow_id

            return self.db.run(work, core=True)
        except Exception as exc:  # the caller must not deliver anything, whatever went wrong
            raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc

    # -- the second phase of a split deployment's escrow ---------------------------------------------
    def confirm(self, serial: str, *, actor: str, now: datetime | None = None) -> str:
        """The key authority says the CA has signed: confirmed if the CA has recorded the certificate (the
        KRA checks its records, not the RA's word); otherwise it stays pending (Conflict), for the sweep.
        Returns the escrow's state."""
        return self._settle(serial, actor=actor, why="confirmed by the key authority",
                            void_event=None, now=now)

    def withdraw(self, serial: str, *, actor: str, reason: str, now: datetime | None = None) -> str:
        """The key authority says the CA failed: void (kept, never recoverable) if the CA has recorded no
        such certificate; confirmed if it has after all (a key of a certificate that exists is never
        given up). Returns the escrow's state."""
        return self._settle(serial, actor=actor, why=reason, void_event="key.escrow_withdrawn", now=now)

    def sweep(self, now: datetime | None = None, *, grace: timedelta | None = None) -> dict[str, int]:
        """`settle_pending`'s answer counted: how many escrows it confirmed and voided."""
        return {state: len(serials) for state, serials in self.settle_pending(now, grace=grace).items()}

    def settle_pending(self, now: datetime | None = None, *,
                       grace: timedelta | None = None) -> dict[str, list[str]]:
        """Settle every pending escrow by the CA's records: confirmed when its certificate is recorded
        (an RA that died between the CA's signature and the confirmation), void when it is not and the
        escrow is older than `grace` (default `pending_grace`: an RA that died before the CA signed, or a
        withdrawal that did not reach the KRA). Returns the serials of each; safe to run in several
        processes at once."""
        now = now or datetime.now(timezone.utc)
        grace = self.pending_grace if grace is None else grace
        settled: dict[str, list[str]] = {CONFIRMED: [], VOID: []}
        for serial, created_at in pending_serials(self.db):
            old = created_at <= now - grace
            try:
                state = self._settle(serial, actor="kra-sweep", why=f"pending since {created_at.isoformat()}",
                                     void_event="key.escrow_voided" if old else None, now=now)
            except Conflict:
                continue  # not recorded yet, still within the grace
            settled.setdefault(state, []).append(serial)
        return settled

    def _settle(self, serial: str, *, actor: str, why: str, void_event: str | None,
                now: datetime | None) -> str:
        """One pending escrow settled in one transaction by whether the CA recorded its certificate: confirmed
        if it did; if not, void with `void_event`, or (None) left pending with a Conflict. An escrow
        already settled is returned as it is (another worker, the sweep or the key authority came first)."""
        now = now or datetime.now(timezone.utc)

        def work(conn):
            row = escrow_in(conn, serial)
            if row is None:
                raise UnknownCertificate(f"no escrowed key for serial {serial[:48]}")
            if row.state == CONFIRMED:
                return row.state
            recorded = certificate_recorded(conn, serial)
            if row.state == VOID and not recorded:
                return row.state
            if not recorded and void_event is None:
                return None
            state = CONFIRMED if recorded else VOID
            # a void escrow whose certificate turned up after all (recorded later than any grace allowed
            # for) is confirmed too: the key of a certificate that exists is never given up
            reason = why if row.state == PENDING else f"certificate recorded after the escrow was voided; {why}"
            if not settle_pending(conn, serial, state, was=row.state):
                return escrow_in(conn, serial).state
            audit.append(conn, event="key.escrowed" if recorded else void_event, outcome="done",
                         actor=actor, subject=row.email, now=now,
                         detail={"serial": serial, "profile": row.profile, "escrow_id": row.id, "state": state,
                                 "reason": reason[:300]})
            return state

        state = self.db.run(work, core=True)
        if state is None:
            raise Conflict(f"the CA has recorded no certificate {serial[:48]} yet; the escrow stays pending")
        if state != CONFIRMED:
            log.warning("event=escrow.%s serial=%s actor=%s reason=%r", state, serial, actor, why[:300])
        return state

    def recoverable(self, serial: str, now: datetime | None = None):
        """The confirmed escrow row of `serial`; another is settled first (confirmed if the CA has
        recorded its certificate). Anything else is UnknownCertificate: a pending or void escrow is never
        recovered."""
        row = escrow_of(self.db, serial)
        if row is not None and row.state != CONFIRMED:
            try:
                self.confirm(serial, actor="kra-recovery", now=now)
            except Conflict:
                pass
            row = escrow_of(self.db, serial)
        if row is None or row.state != CONFIRMED:
            raise UnknownCertificate(f"no escrowed key for serial {serial[:48]}")
        return row

    def start_sweep(self, interval: float = SWEEP_INTERVAL_SECONDS) -> tuple[threading.Thread, threading.Event]:
        """The sweep in a thread of this process (role kra), every `interval` seconds until the event is set."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval):
                try:
                    settled = self.sweep()
                    if any(settled.values()):
                        log.info("event=escrow.sweep confirmed=%d void=%d", settled[CONFIRMED], settled[VOID])
                except Exception:  # the database may be away for a while: the next round tries again
                    log.exception("event=escrow.sweep_failed")

        thread = threading.Thread(target=run, name="escrow-sweep", daemon=True)
        thread.start()
        return thread, stop

    def check_sealed(self, serial: str, blob: bytes, *, email: str, profile: str) -> None:
        """Raise unless `blob` opens with the storage private key for this serial, user and profile: a KRA
        that receives sealed keys from elsewhere accepts only escrows it will be able to give back, and only
        of the algorithm this version seals with: an older one's unwrap may run outside the token
        (escrow_crypto.py), and no caller gets to probe that with blobs of its own making."""
        open_private_key(blob, self._storage_private_key(), escrow_aad(int(serial, 16), email, profile),
                         algorithms=(SEAL_ALGORITHM,))

    def _storage_private_key(self):
        if self._private is None:
            self._private = self._load_private()
        return self._private

    def _check_officer_grant(self, serial: str, grant: RecoveryGrant, now: datetime) -> None:
        """The KRA trusts no caller's word: the request must be released and name this key, and (with a
        roster) enough of its approvals must come from officers who still are officers now."""
        request, approvals = released_request(self.db, grant.request_id or "")
        if request is None or request.status != "released" or serial not in request.serials \
                or request.target_email.lower() != grant.email.lower() or request.requester != grant.actor:
            raise Forbidden("no released recovery request covers this key")
        if self.officers is None:
            return
        counted = {officer for officer, evidence in approvals if officer != request.requester
                   and self.officers.why_not_counted(officer, signer_certificate(evidence), now) is None}
        if len(counted) < self.quorum:
            raise Forbidden(f"{len(counted)} approvals of request {grant.request_id} come from current officers; "
                            f"{self.quorum} are needed")

    def recover(self, serial: str, grant: RecoveryGrant, *, now: datetime | None = None):
        now = now or datetime.now(timezone.utc)
        row = self.recoverable(serial, now)
        if row.email.lower() != grant.email.lower():
            raise Forbidden("the recovery grant does not cover this key")
        if grant.kind == "officers":
            self._check_officer_grant(serial, grant, now)
        elif grant.kind != "owner":
            raise Forbidden("unknown kind of recovery grant")
        key = open_private_key(row.blob, self._storage_private_key(),
                               escrow_aad(int(serial, 16), row.email, row.profile))
        self.db.run(lambda s: audit.append(
            s, event="key.recovered", outcome="done", actor=grant.actor, subject=row.email, now=now,
            detail={"serial": serial, "grant": grant.kind, "request_id": grant.request_id}))
        return key

    def recover_pkcs12(self, serial: str, grant: RecoveryGrant, password: str, legacy: bool, friendly_name: str,
                       chain: list[x509.Certificate], *, now: datetime | None = None) -> bytes:
        """The escrowed key with its certificate as PKCS#12 under `password`: what a caller outside the KRA
        gets instead of the raw key (a remote KRA takes the password from the signed evidence)."""
        key = self.recover(serial, grant, now=now)
        row = certificate_by_serial(self.db, serial)
        der = row.der if row is not None else None
        if der is None:
            raise UnknownCertificate(f"no certificate with serial {serial[:48]}")
        cert = x509.load_der_x509_certificate(der)
        spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            # The database is shared with other services: never wrap a key with a certificate not its own.
            raise Forbidden(f"the certificate {serial[:48]} does not match its escrowed key")
        return to_pkcs12(key=key, cert=cert, chain=chain, password=password, friendly_name=friendly_name,
                         legacy=legacy, iterations=self.pkcs12_iterations)


if TYPE_CHECKING:  # mypy (make test) checks that LocalKRA has the signatures of the Protocol
    from ..core.ports import RecoveryAuthority

    def _is_recovery_authority(implementation: LocalKRA) -> RecoveryAuthority:
        return implementation
