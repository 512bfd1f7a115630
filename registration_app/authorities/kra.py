"""Key recovery authority: escrows encryption keys, gives them back only with a grant.

The RA process holds only the KRA's public storage key; the private storage key is loaded (with
its passphrase) by `recover`, so a split deployment can keep it on the KRA host alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..core.errors import EscrowFailed, Forbidden, UnknownCertificate
from ..core.model import RecoveryGrant
from ..store import audit
from ..store.db import Database
from ..store.escrow import escrow_of, insert_escrow, released_request
from ..store.repos import certificate_by_serial
from .escrow_crypto import escrow_aad, open_private_key, seal_private_key
from .officers import OfficerRoster, signer_certificate
from .pkcs12 import DEFAULT_ITERATIONS, to_pkcs12




class LocalKRA:
    def __init__(self, db: Database, storage_public_key, load_storage_private_key: Callable[[], object], *,
                 pkcs12_iterations: int = DEFAULT_ITERATIONS, officers: OfficerRoster | None = None,
                 quorum: int = 2):
        """`officers` (the server platform's): an officers' grant is honoured only while `quorum` of the
        request's approvals still come from current officers. The KRA service (role kra) checks the signed
        evidence instead (kra_verify.py), so it passes none."""
        self.db = db
        self.officers = officers
        self.quorum = quorum
        self._public = storage_public_key
        self._load_private = load_storage_private_key
        self._private = None
        self.pkcs12_iterations = pkcs12_iterations

    def escrow(self, serial: str, key, *, email: str, profile: str, actor: str,
               now: datetime | None = None) -> int:
        """Seal and commit; returns the escrow id. Any failure raises EscrowFailed."""
        return self.store_sealed(serial, self.seal(serial, key, email=email, profile=profile), email=email,
                                 profile=profile, actor=actor, now=now)

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
                     now: datetime | None = None) -> int:
        """Commit a blob sealed by `escrow_crypto.seal_private_key` (by this object, or by an RA that holds
        only the public storage key); returns the escrow id. Any failure raises EscrowFailed."""
        now = now or datetime.now(timezone.utc)
        try:
            def work(conn):
                escrowed = self.insert_sealed(conn, serial, blob, email=email, profile=profile, actor=actor,
                                              now=now)
                audit.append_many(conn, [escrowed], now)
                return escrowed["detail"]["escrow_id"]

            return self.db.run(work, core=True)
        except Exception as exc:  # the caller must not deliver anything, whatever went wrong
            raise EscrowFailed("the key could not be escrowed; nothing was issued") from exc

    def check_sealed(self, serial: str, blob: bytes, *, email: str, profile: str) -> None:
        """Raise unless `blob` opens with the storage private key for this serial, user and profile: a KRA
        that receives sealed keys from elsewhere accepts only escrows it will be able to give back."""
        open_private_key(blob, self._storage_private_key(), escrow_aad(int(serial, 16), email, profile))

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
        row = escrow_of(self.db, serial)
        if row is None:
            raise UnknownCertificate(f"no escrowed key for serial {serial[:48]}")
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
