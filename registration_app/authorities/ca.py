"""The in-house CA: signs under a profile, records each certificate with its outbox row, revokes.

Recording the certificate and the directory outbox row in one transaction is what makes
publication durable: whatever happens to LDAP afterwards, the outbox remembers the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..core.errors import Conflict, DuplicateRecord, UnknownCertificate
from ..core.model import Profile, Subject, Usage
from ..store import audit
from ..store.db import Database, connection_of
from ..store.errors import lost_race_message, lost_renewal_race
from ..store.issuance import (IssuedOutbox, crl_state, insert_issued, locked_crl_state, mark_revoked,
                              queue_crl_publication, revoked_entries)
from ..store.models import CrlState
from ..store.repos import status_of_certificate
from .certs import CaUrls, build_smime_certificate
from .crl import build_crl


@dataclass(frozen=True)
class ToRecord:
    """One signed certificate for `LocalCA.record_issued_many`."""

    cert: x509.Certificate
    profile: Profile
    subject: Subject
    user_dn: str
    replaces: str | None
    key_source: str
    audit_detail: dict | None = None
    entry_id: str | None = None  # the directory entry's stable id (UserEntry.entry_id)


def renewal_key(email: str, profile: str, replaces: str | None, entry_id: str | None) -> str:
    """One issuance per (user, profile, predecessor). A first certificate is also one per directory entry:
    the next entry given the same address starts a history of its own, it does not continue the old one."""
    first = f"|entry:{entry_id}" if replaces is None and entry_id else ""
    return f"{email.lower()}|{profile}|after:{replaces or 'none'}{first}"


def encryption_slot(email: str, profile: Profile) -> str | None:
    """The address of a certificate under "one current encryption certificate per address" (an encryption
    profile without `coexist`), None outside it: unique among valid rows (store/models.py)."""
    return email.lower() if profile.usage is Usage.ENCRYPTION and not profile.coexist else None


def serial_hex(serial: int) -> str:
    return format(serial, "x")


class LocalCA:
    def __init__(self, db: Database, ca_cert: x509.Certificate, ca_key, urls: CaUrls,
                 crl_validity: timedelta = timedelta(hours=24)) -> None:
        self.db = db
        self.certificate = ca_cert
        self._key = ca_key
        self.urls = urls
        self.crl_validity = crl_validity

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.certificate]

    def build_certificate(self, public_key, profile: Profile, subject: Subject, *, serial: int,
                          now: datetime) -> x509.Certificate:
        """Sign only (nothing recorded): for batches that record many certificates in one transaction."""
        return build_smime_certificate(ca_cert=self.certificate, ca_key=self._key, public_key=public_key,
                                       profile=profile, subject=subject, now=now, urls=self.urls,
                                       serial=serial)

    def record_issued(self, session, cert: x509.Certificate, profile: Profile, subject: Subject, *,
                      user_dn: str, replaces: str | None, key_source: str, actor: str, now: datetime,
                      audit_detail: dict | None = None, deferred_audit: list[dict] | None = None, publish_after: timedelta = timedelta(0),
                      entry_id: str | None = None) -> IssuedOutbox:
        """Add the certificate row, its outbox row and its audit row to `session` (a Session or a Core
        Connection; the caller commits).

        The predecessor (if any) becomes superseded in the same step; `renewal_key` makes a second
        issuance after the same predecessor fail with DuplicateRecord (at the certificate's INSERT). With
        `deferred_audit` (a list), the audit events are appended to it instead, for `append_audit_chain`.
        `publish_after` holds the outbox row back from the worker while the caller publishes inline.
        """
        record = ToRecord(cert, profile, subject, user_dn, replaces, key_source, audit_detail, entry_id or None)
        outboxes, events = self.record_issued_many(session, [record], actor=actor, now=now,
                                                   publish_after=publish_after)
        if deferred_audit is not None:
            deferred_audit.extend(events)
        else:
            audit.append_many(connection_of(session), events, now)
        return outboxes[0]

    def record_issued_many(self, session, records: list["ToRecord"], *, actor: str, now: datetime,
                           publish_after: timedelta = timedelta(0)) -> tuple[list[IssuedOutbox], list[dict]]:
        """`record_issued` for many certificates in a few statements (a provisioning batch): returns their
        outbox rows and their certificate.issued audit events, for the caller to append."""
        supersede = [{"old": r.replaces, "new": serial_hex(r.cert.serial_number)} for r in records if r.replaces]
        certificates = [dict(
            serial=serial_hex(r.cert.serial_number), email=r.subject.email, user_dn=r.user_dn, entry_id=r.entry_id,
            profile=r.profile.name, usage=r.profile.usage.value, status="valid",
            der=r.cert.public_bytes(Encoding.DER), not_before=r.cert.not_valid_before_utc,
            not_after=r.cert.not_valid_after_utc, issued_at=now, key_source=r.key_source, replaces=r.replaces,
            renewal_key=renewal_key(r.subject.email, r.profile.name, r.replaces, r.entry_id),
            encryption_slot=encryption_slot(r.subject.email, r.profile),
        ) for r in records]
        rows: list[dict[str, Any]] = [
            dict(user_dn=r.user_dn, email=r.subject.email, serial=serial_hex(r.cert.serial_number), reason="issued",
                 created_at=now, attempts=0, next_attempt_at=now + publish_after) for r in records]
        ids = insert_issued(session, certificates, rows, supersede)
        events = [dict(event="certificate.issued", outcome="done", actor=actor, subject=r.subject.email,
                       detail={"serial": serial_hex(r.cert.serial_number), "profile": r.profile.name,
                               "replaces": r.replaces, "not_after": r.cert.not_valid_after_utc.isoformat(),
                               "key_source": r.key_source, **(r.audit_detail or {})})
                  for r in records]
        return [IssuedOutbox(id=i, **row) for i, row in zip(ids, rows)], events

    def sign(self, public_key, profile: Profile, subject: Subject, *, user_dn: str, serial: int,
             replaces: str | None, key_source: str, actor: str, now: datetime | None = None,
             entry_id: str | None = None) -> x509.Certificate:
        """Sign and record; the previous certificate (if any) becomes superseded in the same step."""
        now = now or datetime.now(timezone.utc)
        cert = self.build_certificate(public_key, profile, subject, serial=serial, now=now)

        def record(session):
            self.record_issued(session, cert, profile, subject, user_dn=user_dn, replaces=replaces,
                               key_source=key_source, actor=actor, now=now, entry_id=entry_id)

        try:
            self.db.run(record)
        except DuplicateRecord as exc:
            if not lost_renewal_race(exc):
                raise
            raise Conflict(lost_race_message(exc)) from exc
        return cert

    def revoke(self, serial: int | str, reason: x509.ReasonFlags, *, actor: str = "operator",
               now: datetime | None = None) -> bool:
        """Revoke and queue the unpublication; True if the status changed. The CRL is rebuilt."""
        serial_text = (serial if isinstance(serial, str) else serial_hex(serial)).lower()
        return bool(self.revoke_many([serial_text], reason, actor=actor, now=now, must_exist=True))

    def revoke_many(self, serials: list[str], reason: x509.ReasonFlags, *, actor: str = "operator",
                    now: datetime | None = None, must_exist: bool = False,
                    details: dict[str, dict] | None = None) -> list[str]:
        """Revoke several certificates in ONE transaction with ONE new CRL; returns the serials that
        changed (those already revoked are left as they are). `details` adds to each audit row, by serial.

        The new CRL (with its outbox row for the directory) is committed together with the revocations,
        so no crash can leave a revoked certificate off the CRL that every reader is served. Escrowed keys
        are never touched: old mail must stay readable.
        """
        now = now or datetime.now(timezone.utc)

        def work(session):
            unknown, revoked = mark_revoked(session, serials, reason.value, now)
            if unknown and must_exist:
                raise UnknownCertificate(f"no certificate with serial {unknown[0][:48]}")
            for cert in revoked:
                audit.append(session, event="certificate.revoked", outcome="done", actor=actor,
                             subject=cert.email, now=now,
                             detail={"serial": cert.serial, "reason": reason.value,
                                     **(details or {}).get(cert.serial, {})})
            if revoked:
                self._refresh_crl_in(session, now)
            return [cert.serial for cert in revoked]

        return self.db.run(work)

    def crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        """The current CRL, rebuilt when it is missing or past half its validity."""
        now = now or datetime.now(timezone.utc)
        state = crl_state(self.db)
        if state is not None and state.der and not self._crl_due(state, now):
            return x509.load_der_x509_crl(state.der)
        crl = self.refresh_crl_if_due(now=now) or self.crl_now()
        assert crl is not None, "a CRL that is not due was built before"
        return crl

    def crl_now(self) -> x509.CertificateRevocationList | None:
        """The CRL last built, whatever its age (None before the first)."""
        state = crl_state(self.db)
        return x509.load_der_x509_crl(state.der) if state is not None and state.der else None

    def _crl_due(self, state: CrlState | None, now: datetime) -> bool:
        """A CRL is rebuilt at half its validity, so relying parties never hold one past nextUpdate."""
        return state is None or not state.der or state.next_update is None \
            or now >= state.next_update - self.crl_validity / 2

    def refresh_crl_if_due(self, now: datetime | None = None) -> x509.CertificateRevocationList | None:
        """Rebuild the CRL if it is missing or past half its validity; the check and the rebuild are one
        transaction, so several workers checking at once build one CRL, not one each. None if not due.
        A read decides first: the write transaction (the writer lock) only when the read says due."""
        now = now or datetime.now(timezone.utc)
        if not self._crl_due(crl_state(self.db), now):
            return None

        def work(session):
            state = locked_crl_state(session)
            return self._refresh_crl_in(session, now) if self._crl_due(state, now) else None

        return self.db.run(work)

    def refresh_crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        now = now or datetime.now(timezone.utc)
        return self.db.run(lambda session: self._refresh_crl_in(session, now))

    def _refresh_crl_in(self, session, now: datetime) -> x509.CertificateRevocationList:
        """Build the next CRL (number + 1) from the revoked rows and queue its publication to the CA entry."""
        state = locked_crl_state(session, create=True)
        assert state is not None, "created when missing"
        revoked = revoked_entries(session)
        state.number = (state.number or 0) + 1
        crl = build_crl(ca_cert=self.certificate, ca_key=self._key,
                        revoked=[(int(s, 16), at, x509.ReasonFlags(r) if r else None) for s, at, r in revoked],
                        number=state.number, now=now, next_update=now + self.crl_validity)
        state.der, state.this_update, state.next_update = crl.public_bytes(Encoding.DER), now, now + self.crl_validity
        queue_crl_publication(session, now)
        return crl

    def is_revoked(self, cert: x509.Certificate) -> bool:
        """Read from the database on every call (no cache), so a revocation refuses the next request."""
        if cert.issuer != self.certificate.subject:
            return False
        return status_of_certificate(self.db, serial_hex(cert.serial_number)) == "revoked"


if TYPE_CHECKING:  # mypy (make test) checks that LocalCA has the signatures of the Protocol
    from ..core.ports import CertificateAuthority

    def _is_certificate_authority(implementation: LocalCA) -> CertificateAuthority:
        return implementation
