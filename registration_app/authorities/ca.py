"""The in-house CA: signs under a profile, records each certificate with its outbox row, revokes.

Recording the certificate and the directory outbox row in one transaction is what makes
publication durable: whatever happens to LDAP afterwards, the outbox remembers the user.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ..core.errors import Conflict, UnknownCertificate
from ..core.model import Profile, Subject
from ..store import audit
from ..store.db import Database
from ..store.models import Certificate, CrlState, Outbox
from .certs import CaUrls, build_smime_certificate
from .crl import build_crl


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

    def sign(self, public_key, profile: Profile, subject: Subject, *, user_dn: str, serial: int,
             replaces: str | None, key_source: str, actor: str, now: datetime | None = None,
             extra_audit: list[dict] | None = None) -> x509.Certificate:
        """Sign and record; the previous certificate (if any) becomes superseded in the same step."""
        now = now or datetime.now(timezone.utc)
        cert = build_smime_certificate(ca_cert=self.certificate, ca_key=self._key, public_key=public_key,
                                       profile=profile, subject=subject, now=now, urls=self.urls,
                                       serial=serial)
        serial_text = serial_hex(cert.serial_number)

        def record(session):
            if replaces is not None:
                old = session.get(Certificate, replaces)
                if old is not None and old.status == "valid":
                    old.status, old.superseded_by = "superseded", serial_text
            session.add(Certificate(
                serial=serial_text, email=subject.email, user_dn=user_dn, profile=profile.name,
                usage=profile.usage.value, status="valid", der=cert.public_bytes(Encoding.DER),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc, issued_at=now,
                key_source=key_source, replaces=replaces,
                renewal_key=f"{subject.email.lower()}|{profile.name}|after:{replaces or 'none'}",
            ))
            session.add(Outbox(user_dn=user_dn, email=subject.email, serial=serial_text, reason="issued",
                               created_at=now, next_attempt_at=now))
            for event in extra_audit or ():
                audit.append(session, now=now, **event)
            audit.append(session, event="certificate.issued", outcome="done", actor=actor,
                         subject=subject.email, now=now,
                         detail={"serial": serial_text, "profile": profile.name, "replaces": replaces,
                                 "not_after": cert.not_valid_after_utc.isoformat(), "key_source": key_source})

        try:
            self.db.run(record)
        except IntegrityError as exc:
            raise Conflict("another request already replaced this certificate; "
                           "list your certificates and try again") from exc
        return cert

    def revoke(self, serial: int | str, reason: x509.ReasonFlags, *, actor: str = "operator",
               now: datetime | None = None) -> bool:
        """Revoke and queue the unpublication; True if the status changed. The CRL is rebuilt."""
        now = now or datetime.now(timezone.utc)
        serial_text = serial if isinstance(serial, str) else serial_hex(serial)

        def work(session):
            cert = session.get(Certificate, serial_text.lower())
            if cert is None:
                raise UnknownCertificate(f"no certificate with serial {serial_text[:48]}")
            if cert.status == "revoked":
                return False
            cert.status, cert.revoked_at, cert.revocation_reason = "revoked", now, reason.value
            session.add(Outbox(user_dn=cert.user_dn, email=cert.email, serial=cert.serial, reason="revoked",
                               created_at=now, next_attempt_at=now))
            audit.append(session, event="certificate.revoked", outcome="done", actor=actor,
                         subject=cert.email, now=now, detail={"serial": cert.serial, "reason": reason.value})
            return True

        changed = self.db.run(work)
        if changed:
            self.refresh_crl(now=now)
        return changed

    def crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        """The current CRL, rebuilt when it is missing or past half its validity."""
        now = now or datetime.now(timezone.utc)
        with self.db.transaction() as session:
            state = session.get(CrlState, 1)
            if state is not None and state.der and state.next_update \
                    and now < state.next_update - self.crl_validity / 2:
                return x509.load_der_x509_crl(state.der)
        return self.refresh_crl(now=now)

    def refresh_crl(self, now: datetime | None = None) -> x509.CertificateRevocationList:
        now = now or datetime.now(timezone.utc)

        def work(session):
            state = session.get(CrlState, 1)
            if state is None:
                state = CrlState(id=1, number=0)
                session.add(state)
            revoked = session.execute(
                select(Certificate.serial, Certificate.revoked_at, Certificate.revocation_reason)
                .where(Certificate.status == "revoked")).all()
            state.number += 1
            crl = build_crl(ca_cert=self.certificate, ca_key=self._key,
                            revoked=[(int(s, 16), at, x509.ReasonFlags(r) if r else None) for s, at, r in revoked],
                            number=state.number, now=now, next_update=now + self.crl_validity)
            state.der, state.this_update, state.next_update = crl.public_bytes(Encoding.DER), now, now + self.crl_validity
            session.add(Outbox(user_dn="", email="", serial=None, reason="crl", created_at=now,
                               next_attempt_at=now))
            return crl

        return self.db.run(work)

    def is_revoked(self, cert: x509.Certificate) -> bool:
        if cert.issuer != self.certificate.subject:
            return False
        with self.db.transaction() as session:
            row = session.get(Certificate, serial_hex(cert.serial_number))
            return row is not None and row.status == "revoked"
