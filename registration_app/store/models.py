"""Tables. Serial numbers are up to 159 bits, so they are stored as lowercase hex text."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (
    JSON, DateTime, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator):
    """Stores naive UTC, returns aware UTC: SQLite has no time zones."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def bind_processor(self, dialect):
        """On SQLite, the two steps (naive UTC, then SQLAlchemy's DATETIME text) in one: the same text,
        for a fifth of the cost (a dozen datetimes per enrollment). Elsewhere as TypeDecorator does."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value):
            if value is None:
                return None
            if value.tzinfo is not None:
                value = value.astimezone(timezone.utc).replace(tzinfo=None)
            # SQLAlchemy's SQLite DATETIME storage format: YYYY-MM-DD HH:MM:SS.ffffff
            return value.isoformat(" ", "microseconds")
        return process

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


class Base(DeclarativeBase):
    pass


# A second issuance after the same predecessor violates this (store/errors.py `lost_renewal_race`).
RENEWAL_KEY_CONSTRAINT = "uq_certificates_renewal_key"
# A second current certificate of the one-encryption-certificate rule for one address violates this
# (store/errors.py `lost_renewal_race`): two enrollments of two encryption profiles at once.
ONE_ENCRYPTION_CONSTRAINT = "uq_certificates_one_current_encryption"


class Certificate(Base):
    __tablename__ = "certificates"

    serial: Mapped[str] = mapped_column(String(48), primary_key=True)
    # found by address through ix_certificates_user_profile_status and the lower(email) index below
    email: Mapped[str] = mapped_column(String(320))
    user_dn: Mapped[str] = mapped_column(String(1024), index=True)
    # The directory entry's stable id (entryUUID / objectGUID, see LdapSettings.entry_id_attribute) when
    # the certificate was issued: the certificate belongs to that entry, wherever it is renamed to, and
    # to no other entry that is later given the same address. NULL on rows older than migration 0006
    # until first sight: the first request or reconcile pass that finds the entry at `user_dn` fills it.
    entry_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    profile: Mapped[str] = mapped_column(String(64))
    usage: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="valid")  # valid | superseded | revoked
    der: Mapped[bytes] = mapped_column(LargeBinary)
    not_before: Mapped[datetime] = mapped_column(UTCDateTime)
    not_after: Mapped[datetime] = mapped_column(UTCDateTime)
    issued_at: Mapped[datetime] = mapped_column(UTCDateTime)
    key_source: Mapped[str] = mapped_column(String(16))
    replaces: Mapped[str | None] = mapped_column(String(48), nullable=True)
    superseded_by: Mapped[str | None] = mapped_column(String(48), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    revocation_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # One issuance per (user, profile, predecessor) prevents two concurrent renewals of the same
    # certificate; a first issuance uses the empty string so the constraint applies too.
    renewal_key: Mapped[str] = mapped_column(String(400))
    # lower(email) on a certificate under the rule "one current encryption certificate per address"
    # (an encryption profile without `coexist`), NULL elsewhere: unique among valid rows, so the issuing
    # transaction, not the RA's earlier read, decides a race. Set when the row is written (authorities/
    # ca.py); a renewal of its own profile keeps its predecessor's (store/issuance.py). NULL on rows older
    # than migration 0009, which the rule then holds by the RA's check only.
    encryption_slot: Mapped[str | None] = mapped_column(String(320), nullable=True)

    __table_args__ = (
        UniqueConstraint("renewal_key", name=RENEWAL_KEY_CONSTRAINT),
        Index("ix_certificates_user_profile_status", "email", "profile", "status"),
        # the enrollment policy matches email case-insensitively (store/repos.py)
        Index("ix_certificates_lower_email_profile", func.lower(email), profile),
        Index(ONE_ENCRYPTION_CONSTRAINT, encryption_slot, unique=True,
              sqlite_where=status == "valid", postgresql_where=status == "valid"),
    )


class Escrow(Base):
    __tablename__ = "escrow"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    serial: Mapped[str] = mapped_column(String(48), unique=True)
    email: Mapped[str] = mapped_column(String(320), index=True)
    profile: Mapped[str] = mapped_column(String(64))
    blob: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # A split deployment escrows in two phases (authorities/kra.py): 'pending' until the CA has recorded
    # the certificate, then 'confirmed'; 'void' (kept, never recoverable) when it never was. The server
    # platform writes escrow and certificate in one transaction: 'confirmed' at once.
    state: Mapped[str] = mapped_column(String(16), default="confirmed", server_default="confirmed", index=True)


class Nonce(Base):
    __tablename__ = "nonces"

    value: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class Outbox(Base):
    """A user whose directory entry must be brought in line with our records."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_dn: Mapped[str] = mapped_column(String(1024))
    email: Mapped[str] = mapped_column(String(320))
    serial: Mapped[str | None] = mapped_column(String(48), nullable=True)
    reason: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True, index=True)


class AuditEvent(Base):
    __tablename__ = "audit"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    event: Mapped[str] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))  # allowed | denied | done | failed
    actor: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(512))
    detail: Mapped[dict] = mapped_column(JSON)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """A single row locked while appending, so the chain stays linear under concurrency."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer, default=0)
    last_hash: Mapped[str] = mapped_column(String(64))
    rows: Mapped[int] = mapped_column(Integer, default=0)  # rows in the chain: the checkpoint's count
    keyed: Mapped[int] = mapped_column(Integer, default=1)  # 0: an unkeyed chain from before 0005


class EnrollmentCode(Base):
    __tablename__ = "enrollment_codes"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    email: Mapped[str] = mapped_column(String(320), index=True)
    # The MAC key (HKDF of the printed secret) sealed with AES-GCM under the server's code key
    # (key_version 1), so that the row alone cannot MAC a bootstrap; version 0 rows predate 0005.
    mac_key: Mapped[bytes] = mapped_column(LargeBinary)
    key_version: Mapped[int] = mapped_column(Integer, default=1)
    failures: Mapped[int] = mapped_column(Integer, default=0)  # wrong MACs so far; burnt at the limit
    burnt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    used_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    created_by: Mapped[str] = mapped_column(String(256))


class BootstrapFailure(Base):
    """Failed bootstrap MACs counted per presented code id ("code:<id>", known or not) and per agent
    ("agent:<subject>") in a window: in the database, so every worker and server shares the count."""

    __tablename__ = "bootstrap_failures"

    scope: Mapped[str] = mapped_column(String(96), primary_key=True)
    window_started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    failures: Mapped[int] = mapped_column(Integer)


class CrlState(Base):
    __tablename__ = "crl_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    number: Mapped[int] = mapped_column(Integer, default=0)
    der: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    this_update: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    next_update: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class RecoveryRequest(Base):
    __tablename__ = "recovery_requests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    requester: Mapped[str] = mapped_column(String(320))
    target_email: Mapped[str] = mapped_column(String(320))
    serials: Mapped[list] = mapped_column(JSON)
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # pending | approved | released | expired | refused
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    evidence: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the opening signed JWS


class RecoveryApproval(Base):
    __tablename__ = "recovery_approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("recovery_requests.id"))
    officer: Mapped[str] = mapped_column(String(320))
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    evidence: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # the officer's signed JWS

    __table_args__ = (UniqueConstraint("request_id", "officer", name="uq_approval_once"),)


class SyncState(Base):
    __tablename__ = "sync_state"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class RevokedAgent(Base):
    """A user server's TLS client certificate that may no longer connect (`autoenroll revoke-agent`):
    refused by every worker on its next request, on a kept-alive connection too. The TLS CA has no CRL;
    this table is its revocation list."""

    __tablename__ = "revoked_agents"

    thumbprint: Mapped[str] = mapped_column(String(64), primary_key=True)  # x5t#S256 of the DER
    subject: Mapped[str] = mapped_column(String(1024))
    serial: Mapped[str] = mapped_column(String(48))
    revoked_at: Mapped[datetime] = mapped_column(UTCDateTime)
    reason: Mapped[str] = mapped_column(String(256))


class TargetOutbox(Base):
    """An outbox row's state at one extra publication target (`[targets.NAME]`, directory_sync/targets.py):
    written when that target has published the row's user (done_at), or failed to (attempts, back-off,
    last_error). An outbox row without a state row for a target is due there; the primary directory's
    state stays in the outbox row itself."""

    __tablename__ = "target_outbox"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    outbox_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)

    # A target's rows tried and not done, by when they are due: what each drain round reads (0010).
    __table_args__ = (Index("ix_target_outbox_due", "target", "done_at", "next_attempt_at"),)


class TargetProgress(Base):
    """How far a publication target has seen the outbox: every outbox row with an id up to
    `seen_through` has a state row at that target (target_outbox), so a drain reads the rows above it
    that have none, and the target's rows tried and not done, never the whole outbox (0010)."""

    __tablename__ = "target_progress"

    target: Mapped[str] = mapped_column(String(64), primary_key=True)
    seen_through: Mapped[int] = mapped_column(Integer)
