"""Small repositories over a Session or the Database: nonces, enrollment codes and their failures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from datetime import datetime, timedelta, timezone

from dataclasses import dataclass

from sqlalchemy import bindparam, case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..core.codes import derive_mac_key, new_code
from . import audit
from .db import Database, connection_of
from .keys import seal_code_key, unseal_code_key
from .prepared import Prepared
from .models import BootstrapFailure, Certificate, CrlState, EnrollmentCode, Nonce, Outbox, RevokedAgent


# Nonces are stateless when issued and recorded when used: a nonce is (expiry, 12 random bytes, MAC),
# so issuing one writes nothing (the GET /nonce of every enrollment and every answer's Replay-Nonce
# used to be a write transaction with an fsync), and consuming it is ONE insert into `nonces`, whose
# primary key lets only the first use win, in any worker. A used nonce's row lives until the nonce
# expires (plus a margin for clocks of other hosts); after that its expiry alone refuses it.
_NONCE_CONTEXT = b"autoenroll nonce v1\0"
_NONCE_RAW, _NONCE_MAC = 20, 16  # 8-byte expiry (microseconds) + 12 random bytes; truncated HMAC-SHA256
_NONCE_LENGTH = 48  # characters of base64url, no padding
_SWEEP_MARGIN = timedelta(minutes=10)


def _nonce_key(db: Database) -> bytes:
    """The MAC key every worker shares: read from the data folder (keys.py), never from the database."""
    return db.keys.need("nonce")


def _nonce_mac(key: bytes, raw: bytes) -> bytes:
    return hmac.new(key, _NONCE_CONTEXT + raw, hashlib.sha256).digest()[:_NONCE_MAC]


def _micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def issue_nonce(db: Database, ttl: timedelta, now: datetime | None = None) -> str:
    now = now or datetime.now(timezone.utc)
    raw = struct.pack(">Q", _micros(now + ttl)) + secrets.token_bytes(_NONCE_RAW - 8)
    return base64.urlsafe_b64encode(raw + _nonce_mac(_nonce_key(db), raw)).decode("ascii")


@dataclass(frozen=True)
class NonceToken:
    """A nonce whose MAC and expiry checked out: its canonical spelling and when it expires."""

    value: str
    expires_at: datetime


_NONCES = Nonce.__table__
_NONCE_USED = Prepared(select(_NONCES.c.value).where(_NONCES.c.value == bindparam("value")))
_INSERT_NONCE = Prepared(insert(_NONCES))


def parse_nonce(db: Database, value: str, now: datetime | None = None) -> NonceToken | None:
    """The token if `value` is a nonce we issued that has not expired (used or not: see `record_nonce`)."""
    now = now or datetime.now(timezone.utc)
    if not isinstance(value, str) or len(value) != _NONCE_LENGTH:
        return None
    try:
        token = base64.urlsafe_b64decode(value.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return None
    raw, mac = token[:_NONCE_RAW], token[_NONCE_RAW:]
    if len(token) != _NONCE_RAW + _NONCE_MAC or not hmac.compare_digest(mac, _nonce_mac(_nonce_key(db), raw)):
        return None
    expiry_us = struct.unpack(">Q", raw[:8])[0]
    if expiry_us < _micros(now):
        return None
    # one row per nonce, however it was spelled
    return NonceToken(base64.urlsafe_b64encode(token).decode("ascii"),
                      datetime.fromtimestamp(expiry_us / 1_000_000, timezone.utc))


def nonce_unused(db: Database, value: str, now: datetime | None = None) -> NonceToken | None:
    """The token if the nonce is ours, unexpired and not used yet; nothing is written. The request
    that acts on it records it in its own transaction (`record_nonce`), whose INSERT decides a race."""
    token = parse_nonce(db, value, now)
    if token is None:
        return None
    if db.query(_NONCE_USED, {"value": token.value}):
        return None
    return token


def record_nonce(conn, token: NonceToken, now: datetime | None = None, *, savepoint: bool = True) -> bool:
    """Mark the nonce used in the caller's transaction; False (and nothing changed) if it was already.
    A savepoint keeps the caller's transaction usable after the refused INSERT (PostgreSQL); a caller
    that rolls back when it gets False needs none."""
    now = now or datetime.now(timezone.utc)
    if secrets.randbelow(64) == 0:  # sweep expired nonces now and then, off the common path
        conn.execute(delete(_NONCES).where(_NONCES.c.expires_at < now - _SWEEP_MARGIN))
    row = {"value": token.value, "expires_at": token.expires_at}
    try:
        if savepoint:
            with conn.begin_nested():
                _INSERT_NONCE.run(conn, row)
        else:
            _INSERT_NONCE.run(conn, row)
    except IntegrityError:
        return False
    return True


def consume_nonce(db: Database, value: str, now: datetime | None = None) -> bool:
    """Single use, shared by all workers: the INSERT that records it is the one that wins."""
    token = parse_nonce(db, value, now)
    if token is None:
        return False
    return db.run(lambda conn: record_nonce(conn, token, now), core=True)


def create_enrollment_code(db: Database, email: str, ttl: timedelta, created_by: str,
                           now: datetime | None = None) -> tuple[str, str]:
    now = now or datetime.now(timezone.utc)
    code_id, printed = new_code()
    sealed = seal_code_key(db.keys, code_id, derive_mac_key(printed.split("-", 1)[1]))
    db.run(lambda s: s.add(EnrollmentCode(id=code_id, email=email, mac_key=sealed, key_version=1, failures=0,
                                          created_at=now, expires_at=now + ttl, created_by=created_by)))
    return code_id, printed


def enrollment_code(db: Database, code_id: str, now: datetime | None = None) -> EnrollmentCode | None:
    """The unused, unburnt, unexpired code with this id."""
    now = now or datetime.now(timezone.utc)
    if not isinstance(code_id, str) or len(code_id) > 32:
        return None
    with db.read() as session:
        row = session.get(EnrollmentCode, code_id)
        if row is None or row.used_at is not None or row.burnt_at is not None or row.expires_at < now:
            return None
        return row


def enrollment_code_key(db: Database, code_id: str, now: datetime | None = None) -> tuple[str, bytes] | None:
    """(email, MAC key) of the usable code with this id; None for an unknown, used, burnt or expired id,
    or a row whose key was not sealed by this server for this id (written into the database by hand)."""
    row = enrollment_code(db, code_id, now)
    if row is None or row.key_version != 1:
        return None
    mac_key = unseal_code_key(db.keys, row.id, row.mac_key)
    return (row.email, mac_key) if mac_key is not None else None


def use_enrollment_code(session, code_id: str, now: datetime) -> bool:
    result = session.execute(update(EnrollmentCode)
                             .where(EnrollmentCode.id == code_id, EnrollmentCode.used_at.is_(None),
                                    EnrollmentCode.burnt_at.is_(None), EnrollmentCode.expires_at >= now)
                             .values(used_at=now))
    return result.rowcount == 1


@dataclass(frozen=True)
class BootstrapLimits:
    """How many wrong enrollment-code MACs are tolerated (settings: enrollment_code_*)."""

    per_code: int = 5  # a code burns at this many; any presented id is refused (429) once it has them
    per_agent: int = 20  # failures of one agent in a window before it is refused (429)
    window: timedelta = timedelta(minutes=15)


_FAILURES = BootstrapFailure.__table__
_FAILURE_COUNTS = select(_FAILURES.c.scope, _FAILURES.c.window_started_at, _FAILURES.c.failures).where(
    _FAILURES.c.scope.in_(bindparam("scopes", expanding=True)))


def _scopes(code_id: str, agent: str) -> dict[str, str]:
    return {"code": f"code:{code_id[:32]}", "agent": f"agent:{agent}"[:96]}


def bootstrap_retry_after(db: Database, code_id: str, agent: str, limits: BootstrapLimits,
                          now: datetime | None = None) -> int | None:
    """Seconds until this agent may try this code id again, or None when it may now. Counted per
    presented id, known or not, so that the limit tells nothing about which ids exist."""
    now = now or datetime.now(timezone.utc)
    scopes = _scopes(code_id, agent)
    ceilings = {scopes["code"]: limits.per_code, scopes["agent"]: limits.per_agent}
    waits = [(row.window_started_at + limits.window - now).total_seconds()
             for row in db.query(_FAILURE_COUNTS, {"scopes": list(ceilings)})
             if row.failures >= ceilings[row.scope] and row.window_started_at + limits.window > now]
    return max(1, int(max(waits)) + 1) if waits else None


def record_bootstrap_failure(db: Database, code_id: str, agent: str, limits: BootstrapLimits,
                             now: datetime | None = None) -> bool:
    """Count one wrong MAC for this code id and this agent (one transaction, shared by every worker);
    a real, usable code that reaches `limits.per_code` failures burns, audited. True if it burnt now."""
    now = now or datetime.now(timezone.utc)
    scopes = _scopes(code_id, agent)
    dialect_insert = _upsert_for(db)

    def work(conn):
        for scope in scopes.values():
            fresh = _FAILURES.c.window_started_at < now - limits.window
            statement = dialect_insert(_FAILURES).values(scope=scope, window_started_at=now, failures=1)
            conn.execute(statement.on_conflict_do_update(index_elements=["scope"], set_={
                "failures": case((fresh, 1), else_=_FAILURES.c.failures + 1),
                "window_started_at": case((fresh, now), else_=_FAILURES.c.window_started_at)}))
        codes = EnrollmentCode.__table__
        usable = (codes.c.id == code_id, codes.c.used_at.is_(None), codes.c.burnt_at.is_(None))
        failures = conn.execute(update(codes).where(*usable).values(failures=codes.c.failures + 1)
                                .returning(codes.c.failures, codes.c.email)).first()
        if failures is None or failures.failures < limits.per_code:
            return False
        conn.execute(update(codes).where(*usable).values(burnt_at=now))
        audit.append_many(conn, [dict(event="enrollment_code.burnt", outcome="done", actor=agent,
                                      subject=failures.email,
                                      detail={"code_id": code_id, "failures": failures.failures})], now)
        return True

    return db.run(work, core=True)


def _upsert_for(db: Database):
    if db.engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    return dialect_insert


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


_C = Certificate.__table__.c
# every profile's rows of the user (a handful), the wanted profiles kept in Python: a prepared statement
# takes no expanding IN list
_HISTORIES = Prepared(select(_C.profile, _C.serial, _C.status, _C.not_before, _C.not_after, _C.issued_at,
                             _C.entry_id).where(func.lower(_C.email) == bindparam("email")).order_by(_C.issued_at.desc()))


def certificate_history(db: Database, email: str, profile: str) -> list:
    """`certificate_histories` of one profile."""
    return certificate_histories(db, email, [profile])[profile]


def certificate_histories(db: Database, email: str, profiles: list[str]) -> dict[str, list]:
    """(serial, status, not_before, not_after, issued_at, entry_id) of every certificate of this user in
    each of `profiles`, by profile, newest first (a profile without certificates: an empty list): how
    many were issued lately (the daily limit), the current one and the latest one, of the enrollment's
    profile and of the other encryption profiles it must mind, in one statement."""
    histories: dict[str, list] = {profile: [] for profile in profiles}
    for row in db.query(_HISTORIES, {"email": email.lower()}):
        if row.profile in histories:
            histories[row.profile].append(row)
    return histories


_CERTIFICATES = Certificate.__table__
_CERTIFICATES_OF = Prepared(select(
    _CERTIFICATES.c.der, _CERTIFICATES.c.status, _CERTIFICATES.c.profile, _CERTIFICATES.c.usage,
    _CERTIFICATES.c.not_after, _CERTIFICATES.c.issued_at).where(_CERTIFICATES.c.user_dn == bindparam("dn")))


def certificates_of(session_or_connection, user_dn: str) -> list:
    """What publication reads of a user's certificates (der, status, profile, usage, not_after,
    issued_at), as plain rows."""
    return _CERTIFICATES_OF.rows(connection_of(session_or_connection), {"dn": user_dn})


_STATUS_OF = select(_C.status).where(_C.serial == bindparam("serial"))


def status_of_certificate(db: Database, serial: str) -> str | None:
    """The status of our certificate `serial` (lowercase hex), None if we issued none with it. One
    statement, its own snapshot (`Database.query`): every request's revocation check reads it."""
    rows = db.query(_STATUS_OF, {"serial": serial})
    return rows[0].status if rows else None


def outbox_status(db: Database, now: datetime | None = None) -> dict:
    now = now or datetime.now(timezone.utc)
    with db.read() as session:
        depth, oldest = session.execute(
            select(func.count(), func.min(Outbox.created_at)).where(Outbox.done_at.is_(None))).one()
        failing = session.execute(select(func.count()).where(Outbox.done_at.is_(None),
                                                             Outbox.attempts > 0)).scalar_one()
        refused = session.execute(select(func.count()).where(
            Outbox.done_at.is_not(None), Outbox.last_error.like(_SCHEMA_REFUSED))).scalar_one()
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=timezone.utc)
    return {"depth": depth, "failing": failing,
            "oldest_age_seconds": round((now - oldest).total_seconds(), 1) if oldest else 0.0,
            "schema_refused": refused}


_SCHEMA_REFUSED = "schema_refused:%"  # last_error of rows the directory's schema refused (publisher.py)


def schema_refusals(db: Database, limit: int = 20) -> list[dict]:
    """The newest outbox rows the directory's schema refused for good, with what the directory said."""
    with db.read() as session:
        rows = session.execute(
            select(Outbox.user_dn, Outbox.email, Outbox.serial, Outbox.last_error, Outbox.done_at)
            .where(Outbox.done_at.is_not(None), Outbox.last_error.like(_SCHEMA_REFUSED))
            .order_by(Outbox.id.desc()).limit(limit)).all()
    return [{"dn": r.user_dn, "email": r.email, "serial": r.serial,
             "directory_said": (r.last_error or "").partition(": ")[2], "at": r.done_at.isoformat()} for r in rows]


_REVOKED_AGENTS = RevokedAgent.__table__
_AGENT_REVOKED = Prepared(select(_REVOKED_AGENTS.c.thumbprint).where(
    _REVOKED_AGENTS.c.thumbprint == bindparam("thumbprint")))


def agent_revoked(db: Database, thumbprint: str) -> bool:
    """Read on every request (no cache): a revocation takes effect in every worker at once."""
    return bool(db.query(_AGENT_REVOKED, {"thumbprint": thumbprint}))


def revoke_agent(db: Database, *, thumbprint: str, subject: str, serial: str, reason: str, actor: str,
                 now: datetime | None = None) -> bool:
    """Put a user server's certificate on the revocation list, audited; False if it was already there."""
    now = now or datetime.now(timezone.utc)

    def work(conn):
        if _AGENT_REVOKED.rows(conn, {"thumbprint": thumbprint}):
            return False
        conn.execute(insert(_REVOKED_AGENTS), {"thumbprint": thumbprint, "subject": subject[:1024],
                                               "serial": serial, "revoked_at": now, "reason": reason[:256]})
        audit.append_many(conn, [dict(event="agent.revoked", outcome="done", actor=actor, subject=subject,
                                      detail={"serial": serial, "thumbprint": thumbprint, "reason": reason})], now)
        return True

    return db.run(work, core=True)


# -- the binding of certificate rows to their directory entry (ra/authority.py check_same_entry) ---------
_BINDING = select(_C.entry_id, _C.user_dn).where(_C.serial == bindparam("serial"))


def entry_binding(db: Database, serial: str) -> tuple[str | None, str] | None:
    """(entry id or None, user DN) of our certificate `serial`, or None if it is not ours."""
    rows = db.query(_BINDING, {"serial": serial})
    return (rows[0].entry_id, rows[0].user_dn) if rows else None


def bind_rows_to_entry(db: Database, user_dn: str, entry_id: str) -> None:
    """First sight of an entry: every row of its DN that has no entry id yet takes `entry_id`."""
    db.run(lambda conn: conn.execute(update(_CERTIFICATES).where(
        _C.user_dn == user_dn, _C.entry_id.is_(None)).values(entry_id=entry_id)), core=True)


def move_entry_rows(conn, entry_id: str, new_dn: str) -> list[str]:
    """In the caller's transaction: the rows of entry `entry_id` under another DN take `new_dn` (the
    entry was renamed or moved); returns their serials."""
    serials = [s for (s,) in conn.execute(select(_C.serial).where(_C.entry_id == entry_id, _C.user_dn != new_dn))]
    if serials:
        conn.execute(update(_CERTIFICATES).where(_C.serial.in_(serials)).values(user_dn=new_dn))
    return serials


def certificate_by_serial(db: Database, serial: str) -> Certificate | None:
    with db.read() as session:
        return session.get(Certificate, serial)


def latest_crl_der(db: Database) -> bytes | None:
    """The DER of the CRL the CA last built, or None before its first."""
    with db.read() as session:
        state = session.get(CrlState, 1)
        return state.der if state is not None and state.der else None
