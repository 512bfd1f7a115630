"""The CA and the KRA as services (roles "ca" and "kra"): the server side of authorities/remote.py.

Every route needs the TLS client certificate of an RA named in `authority_clients` (the agents' names
are not on that list: an agent cannot call an authority). Bodies are JSON; errors are the project's
problem documents (web/errors.py), which RemoteCA/RemoteKRA turn back into the same errors.
"""

from __future__ import annotations

import base64
import logging
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, g, jsonify, request

from ..auth.agent import identify_agent
from ..auth.request_checks import agent_revocation
from ..authorities.remote import grant_from_json, load_public_key_pem
from ..core.errors import AutoenrollError, BadRequest, KeyStoreUnavailable, WrongContentType
from ..core.model import Subject
from ..core.profiles import get_profile
from ..store import audit
from ..store.repos import status_of_certificate
from .api import peer_certificate_der

log = logging.getLogger("autoenroll.authority")

ca_authority = Blueprint("ca_authority", __name__)
kra_authority = Blueprint("kra_authority", __name__)

MAX_SERIAL_HEX = 48
REASONS = {r.value: r for r in x509.ReasonFlags}


def _authenticate_ra() -> None:
    services = g.services
    g.agent = identify_agent(peer_certificate_der(), services.authority_policy, datetime.now(timezone.utc),
                             is_revoked=agent_revocation(services.db))


ca_authority.before_request(_authenticate_ra)
kra_authority.before_request(_authenticate_ra)


def _audit_key_store_failure(response):
    """A request this authority's key store (HSM) failed: one row in its own audit log, as the RA's
    `refused` writes one for its own requests; nothing was signed, unwrapped or recorded before it
    (authorities/pkcs11_store.py). The error mapper left what it answered in `g.refusal`."""
    refusal = g.pop("refusal", None)
    if refusal is None or refusal[0] != KeyStoreUnavailable.code:
        return response
    code, reason = refusal
    agent = getattr(g, "agent", None)
    # read from the request here: the unit may run on another thread (the store's group commit)
    row = dict(event="key_store.unavailable", outcome="failed",
               actor=agent.subject if agent else f"peer:{request.remote_addr}", subject="",
               detail={"path": request.path, "code": code, "reason": reason[:300], "request_id": g.get("request_id")})
    try:
        g.services.db.run(lambda conn: audit.append(conn, **row), core=True)
    except Exception:
        log.exception("event=audit.write_failed request_id=%s", g.get("request_id"))
    return response


ca_authority.after_request(_audit_key_store_failure)
kra_authority.after_request(_audit_key_store_failure)


# --- request fields ------------------------------------------------------------------------------


def _json() -> dict:
    if request.method == "GET":
        return {}
    if request.mimetype != "application/json":
        raise WrongContentType(f"send application/json, not {request.mimetype or 'nothing'!r}")
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _text(body: dict, name: str, limit: int = 1024, *, optional: bool = False) -> str | None:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise BadRequest(f"field {name!r} must be a string of 1 to {limit} characters")
    return value


def _serial(value: object, name: str = "serial") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_SERIAL_HEX:
        raise BadRequest(f"field {name!r} must be a hexadecimal serial number")
    try:
        return format(int(value.lower().removeprefix("0x"), 16), "x")
    except ValueError as exc:
        raise BadRequest(f"field {name!r} must be a hexadecimal serial number") from exc


def _reason(body: dict) -> x509.ReasonFlags:
    reason = body.get("reason")
    if reason not in REASONS:
        raise BadRequest(f"reason must be one of {', '.join(sorted(REASONS))}")
    return REASONS[reason]


# --- the CA --------------------------------------------------------------------------------------


@ca_authority.post("/sign")
def sign():
    services, body = g.services, _json()
    profile = get_profile(services.settings.profiles, _text(body, "profile", 64))
    subject = body.get("subject")
    if not isinstance(subject, dict):
        raise BadRequest("field 'subject' must be an object with email and common_name")
    serial = int(_serial(body.get("serial")), 16)
    if not 64 <= serial.bit_length() <= 159:  # S/MIME BR: at least 64 bits from a CSPRNG, at most 20 octets
        raise BadRequest("the serial number must have 64 to 159 bits")
    key_source = body.get("key_source")
    if key_source not in ("server", "client"):
        raise BadRequest("key_source must be 'server' or 'client'")
    replaces = body.get("replaces")
    cert = services.ca.sign(
        load_public_key_pem(_text(body, "public_key", 16384)), profile,
        Subject(email=_text(subject, "email", 320), common_name=_text(subject, "common_name", 256, optional=True)),
        user_dn=_text(body, "user_dn"), entry_id=_text(body, "entry_id", 64, optional=True), serial=serial,
        replaces=_serial(replaces, "replaces") if replaces is not None else None,
        key_source=key_source, actor=_text(body, "actor", 512))
    return jsonify({"certificate": cert.public_bytes(Encoding.PEM).decode()}), 201


@ca_authority.post("/revoke")
def revoke():
    services, body = g.services, _json()
    changed = services.ca.revoke(_serial(body.get("serial")), _reason(body), actor=_text(body, "actor", 512))
    return jsonify({"changed": changed})


@ca_authority.post("/revoke-many")
def revoke_many():
    services, body = g.services, _json()
    serials, details = body.get("serials"), body.get("details") or {}
    if not isinstance(serials, list) or len(serials) > 100000:
        raise BadRequest("field 'serials' must be a list of hexadecimal serial numbers")
    if not isinstance(details, dict):
        raise BadRequest("field 'details' must map serials to objects")
    changed = services.ca.revoke_many([_serial(s) for s in serials], _reason(body), actor=_text(body, "actor", 512),
                                      must_exist=body.get("must_exist") is True,
                                      details={k: v for k, v in details.items() if isinstance(v, dict)})
    return jsonify({"changed": changed})


def _crl_body(crl: x509.CertificateRevocationList | None) -> dict:
    return {"crl": base64.b64encode(crl.public_bytes(Encoding.DER)).decode() if crl is not None else None}


@ca_authority.get("/crl")
def crl():
    return jsonify(_crl_body(g.services.ca.crl()))


@ca_authority.post("/crl/refresh")
def refresh_crl():
    ca = g.services.ca
    return jsonify(_crl_body(ca.refresh_crl_if_due() if _json().get("if_due") is True else ca.refresh_crl()))


@ca_authority.get("/certificates/<serial>/status")
def certificate_status(serial: str):
    serial = _serial(serial)
    status = status_of_certificate(g.services.db, serial)
    return jsonify({"serial": serial, "status": status or "unknown"})


@ca_authority.post("/publish")
def publish():
    """The CA publishes: the RA asks for one user's rows now (the outbox worker does the rest)."""
    services, body = g.services, _json()
    user_dn = _text(body, "user_dn", optional=True)
    limit = body.get("limit", 200)
    if not isinstance(limit, int) or not 0 < limit <= 100000:
        raise BadRequest("limit must be a positive integer")
    return jsonify({"done": services.publisher.drain(user_dn=user_dn, limit=limit)})


@ca_authority.post("/publish/user")
def publish_user():
    """The RA's inline attempt for one user; the outbox keeps whatever could not be published."""
    return jsonify({"published": g.services.publisher.publish_user_now(_text(_json(), "user_dn"))})


@ca_authority.post("/publish/pending")
def publish_pending():
    return jsonify({"pending": g.services.publisher.pending(_text(_json(), "user_dn"))})


# --- the KRA -------------------------------------------------------------------------------------


@kra_authority.post("/escrow")
def escrow():
    """Store a blob the RA sealed with the public storage key; it must open here, for this serial and user."""
    services, body = g.services, _json()
    serial, email, profile = _serial(body.get("serial")), _text(body, "email", 320), _text(body, "profile", 64)
    try:
        blob = base64.b64decode(_text(body, "sealed", 65536), validate=True)
        services.kra.check_sealed(serial, blob, email=email, profile=profile)
    except KeyStoreUnavailable:  # the KRA's token failed, not the blob: a 503, audited (_audit_key_store_failure)
        raise
    except Exception as exc:  # whatever is wrong with it, a blob this KRA cannot open is not an escrow
        raise BadRequest("the sealed key does not open with this KRA's storage key for this serial and user") from exc
    pending = body.get("pending", False)
    if not isinstance(pending, bool):
        raise BadRequest("field 'pending' must be true or false")
    escrow_id = services.kra.store_sealed(serial, blob, email=email, profile=profile, actor=_text(body, "actor", 512),
                                          pending=pending)
    return jsonify({"escrow_id": escrow_id, "state": "pending" if pending else "confirmed"}), 201


@kra_authority.post("/escrow/confirm")
def confirm_escrow():
    """The CA has signed (the RA says): the KRA confirms a pending escrow once the CA's records show the
    certificate, and answers 409 while they do not (the escrow stays pending, for the sweep)."""
    body = _json()
    state = g.services.kra.confirm(_serial(body.get("serial")), actor=_text(body, "actor", 512))
    return jsonify({"state": state})


@kra_authority.post("/escrow/withdraw")
def withdraw_escrow():
    """The CA answered with a failure (the RA says): void unless the CA's records show the certificate."""
    body = _json()
    state = g.services.kra.withdraw(_serial(body.get("serial")), actor=_text(body, "actor", 512),
                                    reason=_text(body, "reason", 300))
    return jsonify({"state": state})


@kra_authority.post("/recover")
def recover():
    """Verify the grant's evidence here (the RA's word counts for nothing), then wrap the key under the
    password the user or officer signed."""
    services, body = g.services, _json()
    serial, grant = _serial(body.get("serial")), grant_from_json(body.get("grant"))
    friendly_name = _text(body, "friendly_name", 512)
    now = datetime.now(timezone.utc)
    try:
        services.kra.recoverable(serial, now)  # a pending or void escrow is refused before evidence is spent
        release = services.evidence.check(serial, grant, now)
    except AutoenrollError as error:
        services.db.run(lambda s: audit.append(
            s, event="key.recovery_refused", outcome="denied", actor=grant.actor[:400], subject=grant.email[:320],
            now=now, detail={"serial": serial, "grant": grant.kind, "request_id": grant.request_id,
                             "code": error.code, "reason": error.detail[:300], "request_id_http": g.request_id}))
        raise
    services.db.run(lambda s: audit.append(
        s, event="recovery.evidence_verified", outcome="allowed", actor=", ".join(release.signers)[:500],
        subject=grant.email[:320], now=now,
        detail={"serial": serial, "grant": grant.kind, "request_id": grant.request_id, "relayed_by": grant.actor[:300],
                "evidence": len(grant.evidence), "request_id_http": g.request_id,
                "discounted": [{"officer": who, "why": why} for who, why in release.discounted]}))
    p12 = services.kra.recover_pkcs12(serial, grant, release.password, release.legacy, friendly_name,
                                      services.ca.chain, now=now)
    log.info("event=key.recovered serial=%s grant=%s signers=%r request_id=%s", serial, grant.kind,
             release.signers, g.request_id)
    return jsonify({"pkcs12": base64.b64encode(p12).decode()})
