"""The operator's use cases: invite a user, revoke a certificate, revoke an agent, the status of the
directory synchronisation. The `autoenroll` commands (registration_app/cli/) call these and only
parse options and print; every refusal is an AutoenrollError, which the command line reports."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..core.errors import BadRequest, ConfigError
from ..settings import Settings


@dataclass(frozen=True)
class Invitation:
    email: str  # as the directory spells it
    code: str  # the one-time code, shown once
    ttl: timedelta


def invite(services, email: str, *, hours: int | None, operator: str) -> Invitation:
    """A one-time enrollment code for `email`'s first signature certificate, audited. The user must be
    entitled to the bootstrap profile now (bootstrap checks the same again when the code is used)."""
    from ..store import audit
    from ..store.repos import create_enrollment_code
    ttl = timedelta(hours=hours or services.settings.enrollment_code_ttl_hours)
    if services.ra is None:
        raise ConfigError(f"invite runs where the registration authority runs (role all or ra), "
                          f"not role {services.role}")
    profile = services.settings.profiles[services.settings.bootstrap_profile]
    user = services.ra.check_entitlement(email, profile)
    code_id, printed = create_enrollment_code(services.db, user.email, ttl, created_by=operator)
    services.db.run(lambda s: audit.append(s, event="invite.created", outcome="done", actor=operator,
                                           subject=user.email, detail={"code_id": code_id, "ttl_hours": ttl / timedelta(hours=1)}))
    return Invitation(email=user.email, code=printed, ttl=ttl)


def revoke(services, serial: str, reason: x509.ReasonFlags, *, operator: str) -> bool:
    """Revoke a certificate by serial (hex, any case, 0x allowed); the CRL is rebuilt and the directory
    updated now (what LDAP refuses stays in the outbox). False if it was already revoked."""
    changed = services.ca.revoke(serial.lower().removeprefix("0x"), reason, actor=operator)
    services.publisher.drain()
    return changed


@dataclass(frozen=True)
class RevokedAgent:
    subject: str
    serial: str
    added: bool  # False: it was revoked already


def revoke_agent(settings: Settings, cert_pem: bytes, *, reason: str, operator: str,
                 source: str = "the file") -> RevokedAgent:
    """Refuse an agent's (or the RA's) TLS client certificate from now on, in every worker; audited."""
    from ..auth.agent import thumbprint
    from ..authorities.pki_files import read_server_keys
    from ..store.db import Database, migrate
    from ..store.repos import revoke_agent as record
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise BadRequest(f"{source} is not a PEM certificate") from exc
    migrate(settings.db_url)
    db = Database(settings.db_url, keys=read_server_keys(settings.data_dir, ("audit",)))
    subject, serial = cert.subject.rfc4514_string(), format(cert.serial_number, "x")
    try:
        added = record(db, thumbprint=thumbprint(cert.public_bytes(Encoding.DER)), subject=subject,
                       serial=serial, reason=reason, actor=operator)
    finally:
        db.dispose()
    return RevokedAgent(subject=subject, serial=serial, added=added)


def directory_status(db, targets=()) -> dict:
    """What `autoenroll sync status` shows: the outbox (depth, oldest age, failing, the rows the
    directory's schema refused and what it said), the last reconcile pass and the CRL (number, nextUpdate)."""
    from directory_sync.reconcile import last_report

    from ..store.repos import outbox_status, schema_refusals
    from ..store.status import crl_summary
    body = dict(outbox_status(db))
    body["schema_refused_rows"] = schema_refusals(db)
    if targets:  # [targets.NAME]: each target's own state of the outbox rows (directory_sync/targets.py)
        from directory_sync.targets import target_status
        body["targets"] = {name: target_status(db, name) for name in targets}
    body["reconcile"] = last_report(db)
    body["crl"] = crl_summary(db)
    return body
