"""Small repositories over a Session or the Database: nonces and enrollment codes."""

from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update

from ..core.codes import derive_mac_key, new_code
from .db import Database
from .models import Certificate, EnrollmentCode, Nonce, Outbox


def issue_nonce(db: Database, ttl: timedelta, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    value = secrets.token_urlsafe(24)

    def work(session):
        session.add(Nonce(value=value, expires_at=now + ttl))
        if secrets.randbelow(64) == 0:  # sweep expired nonces now and then, off the common path
            session.execute(delete(Nonce).where(Nonce.expires_at < now))

    db.run(work)
    return value


def consume_nonce(db: Database, value: str, now: datetime | None = None) -> bool:
    """Single use, shared by all workers: the DELETE that removes it is the one that wins."""
    now = now or datetime.now(timezone.utc)
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        return False
    result = db.run(lambda s: s.execute(delete(Nonce).where(Nonce.value == value, Nonce.expires_at >= now)))
    return result.rowcount == 1


def create_enrollment_code(db: Database, email: str, ttl: timedelta, created_by: str,
                           now: datetime | None = None) -> tuple[str, str]:
    now = now or datetime.now(timezone.utc)
    code_id, printed = new_code()
    mac_key = derive_mac_key(printed.split("-", 1)[1])
    db.run(lambda s: s.add(EnrollmentCode(id=code_id, email=email, mac_key=mac_key, created_at=now,
                                          expires_at=now + ttl, created_by=created_by)))
    return code_id, printed


def enrollment_code(db: Database, code_id: str, now: datetime | None = None) -> EnrollmentCode | None:
    """The unused, unexpired code with this id."""
    now = now or datetime.now(timezone.utc)
    if not isinstance(code_id, str) or len(code_id) > 32:
        return None
    with db.read() as session:
        row = session.get(EnrollmentCode, code_id)
        if row is None or row.used_at is not None or row.expires_at < now:
            return None
        return row


def use_enrollment_code(session, code_id: str, now: datetime) -> bool:
    result = session.execute(update(EnrollmentCode)
                             .where(EnrollmentCode.id == code_id, EnrollmentCode.used_at.is_(None),
                                    EnrollmentCode.expires_at >= now)
                             .values(used_at=now))
    return result.rowcount == 1


def current_certificate(session, email: str, profile: str) -> Certificate | None:
    return session.execute(
        select(Certificate).where(func.lower(Certificate.email) == email.lower(),
                                  Certificate.profile == profile, Certificate.status == "valid")
        .order_by(Certificate.issued_at.desc()).limit(1)).scalar_one_or_none()


def latest_certificate(session, email: str, profile: str) -> Certificate | None:
    """The newest certificate of this user and profile whatever its status: what a new one replaces."""
    return session.execute(
        select(Certificate).where(func.lower(Certificate.email) == email.lower(),
                                  Certificate.profile == profile)
        .order_by(Certificate.issued_at.desc()).limit(1)).scalar_one_or_none()


def issued_since(session, email: str, profile: str, since: datetime) -> int:
    return session.execute(
        select(func.count()).select_from(Certificate)
        .where(func.lower(Certificate.email) == email.lower(), Certificate.profile == profile,
               Certificate.issued_at >= since)).scalar_one()


def outbox_status(db: Database, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    with db.read() as session:
        depth, oldest = session.execute(
            select(func.count(), func.min(Outbox.created_at)).where(Outbox.done_at.is_(None))).one()
        failing = session.execute(select(func.count()).where(Outbox.done_at.is_(None),
                                                             Outbox.attempts > 0)).scalar_one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return {"depth": depth, "failing": failing,
            "oldest_age_seconds": round((now - oldest).total_seconds(), 1) if oldest else 0.0}
