"""The agent API. Every route needs a verified TLS client certificate of an allowed agent; the
user is authenticated by the JWS of the body, bound to that certificate."""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime, timedelta, timezone
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, g, jsonify, request

from ..auth import nonces
from ..auth.agent import identify_agent
from ..auth.jws import verify_bootstrap_request, verify_user_request
from ..auth.request_checks import RequestChecks
from ..core.errors import BadClientCertificate, BadEnrollmentCode, WrongContentType
from ..ra.authority import BAD_CODE, Refusal

api = Blueprint("api", __name__)
log = logging.getLogger("autoenroll.web")

JOSE_TYPES = {"application/jose+json", "application/json"}


def peer_certificate_der() -> bytes | None:
    """The client certificate of this connection: from gunicorn's TLS socket, or forwarded by a
    configured TLS-terminating proxy (off by default).

    A request from a trusted proxy carries the client's certificate in `X-Client-Cert` or has none:
    the proxy's own TLS certificate (the socket's peer) never stands in for the client's."""
    services = g.services
    if request.remote_addr in services.settings.trusted_proxies:
        forwarded = request.headers.get("X-Client-Cert")
        if not forwarded:
            return None
        try:
            return x509.load_pem_x509_certificate(unquote(forwarded).encode()).public_bytes(Encoding.DER)
        except ValueError as exc:
            raise BadClientCertificate("the forwarded client certificate cannot be parsed") from exc
    sock = request.environ.get("gunicorn.socket")
    getpeercert = getattr(sock, "getpeercert", None)
    return getpeercert(binary_form=True) if getpeercert is not None else None


@api.before_request
def _authenticate_agent():
    """The agent, identified and not revoked. Its revocation is read together with what the request's
    checks will ask of the database (RequestChecks: one statement), from what the body names."""
    services = g.services

    def revoked(thumbprint: str) -> bool:
        g.checks = RequestChecks.read(services.db, thumbprint, _read_ahead(), ca_is_revoked=services.ca.is_revoked,
                                      certificates_here=services.role == "all")
        return g.checks.agent_revoked(thumbprint)

    g.agent = identify_agent(peer_certificate_der(), services.agent_policy, datetime.now(timezone.utc),
                             is_revoked=revoked)


def _read_ahead() -> bytes | None:
    """The body of a signed request, read early for RequestChecks; None when the route would refuse it
    anyway (no JWS type, no length, too long: `_body` then says why, after the agent checks)."""
    length, limit = request.content_length, request.max_content_length
    if request.method != "POST" or request.mimetype not in JOSE_TYPES or length is None \
            or (limit is not None and length > limit):
        return None
    return request.get_data(cache=True)


@api.after_request
def _replay_nonce(response):
    """Every signed request's answer carries the next nonce (as in ACME), so a keep-alive agent
    needs no extra round trip for it."""
    if request.method == "POST" and getattr(g, "agent", None) is not None:
        try:
            response.headers["Replay-Nonce"] = nonces.issue(g.services.db, g.services.nonce_ttl)
        except Exception as exc:  # the answer stands without it; the agent then asks /nonce
            log.warning("event=replay_nonce.failed request_id=%s status=%d error=%r", g.get("request_id"),
                        response.status_code, f"{type(exc).__name__}: {exc}"[:300])
    return response


@api.after_app_request
def _report_refusal(response):
    """A refused API request (the error mapper left what it answered in `g.refusal`) is reported to
    the RA, which audits it: our own checks' refusals and the HTTP layer's (413, 404, 405) alike."""
    refusal = g.pop("refusal", None)
    ra = getattr(getattr(g, "services", None), "ra", None)
    if refusal is None or ra is None or not request.path.startswith("/api/"):
        return response
    code, reason = refusal
    agent = getattr(g, "agent", None)
    ra.refused(Refusal(actor=agent.subject if agent else f"peer:{request.remote_addr}",
                       subject=getattr(g, "user_email", None) or "", path=request.path, code=code,
                       reason=reason, request_id=g.get("request_id"), nonce=getattr(g, "pending_nonce", None)))
    return response


def signed_url() -> str:
    """The URL a request must have been signed for: the configured public URL and this path, never a
    URL built from the client's Host header (or a proxy's X-Forwarded-Host)."""
    query = request.query_string.decode("latin-1")
    return g.services.settings.public_url.rstrip("/") + request.path + (f"?{query}" if query else "")


def _body() -> bytes:
    """The whole body: werkzeug refuses one longer than max_body_bytes with 413 (a chunked one too: the
    app's WSGI wrapper gives it the Content-Length it has, app.py)."""
    mimetype = request.mimetype
    if mimetype not in JOSE_TYPES:
        raise WrongContentType(f"send the flattened JWS as application/jose+json, not {mimetype or 'nothing'!r}")
    return request.get_data(cache=False)


def _verified(*, defer_nonce: bool = False):
    """The authenticated request. With `defer_nonce` the nonce is only checked (ours, unexpired,
    unused) and handed on in `VerifiedRequest.nonce`: the key authority uses it in the transaction
    that acts on the request, and a refusal uses it with its request.denied row (the RA's `refused`)."""
    services = g.services
    body = _body()

    checks: RequestChecks = g.checks
    now = datetime.now(timezone.utc)

    def check_nonce(value: str) -> bool:
        if not defer_nonce:
            return nonces.consume(services.db, value)
        g.pending_nonce = nonces.check(services.db, value, now, checks=checks)
        return g.pending_nonce is not None

    grace = timedelta(seconds=services.settings.superseded_grace_seconds)
    verified = verify_user_request(
        body, url=signed_url(), agent=g.agent, trust=services.user_trust, consume_nonce=check_nonce,
        is_revoked=checks.is_revoked, now=now, successor_of=checks.successor_of(now, grace))
    g.user_email = verified.user.email
    services.agent_policy.check_user(g.agent, verified.user.email)
    return dataclasses.replace(verified, raw=body, nonce=getattr(g, "pending_nonce", None), checks=checks)


@api.get("/nonce")
def nonce():
    services = g.services
    value = nonces.issue(services.db, services.nonce_ttl)
    response = jsonify({"nonce": value})
    response.headers["Replay-Nonce"] = value
    return response


@api.post("/enroll")
def enroll():
    services = g.services
    return jsonify(services.ra.enroll(_verified(defer_nonce=True))), 201


@api.post("/bootstrap")
def bootstrap():
    """A first signature certificate for an enrollment code. Every bad code (unknown, wrong MAC, used,
    burnt, expired) gets the same answer; wrong MACs are counted per code id and per agent (ra/authority.py)."""
    services = g.services
    ra = services.ra
    presented: list[str] = []

    def code_secret(code_id: str) -> bytes:
        presented.append(code_id)
        return ra.bootstrap_key(code_id, g.agent)  # 429 when over the limits; a decoy key for a bad id

    try:
        payload, code_id = verify_bootstrap_request(
            _body(), url=signed_url(), agent=g.agent, code_secret=code_secret,
            consume_nonce=lambda n: nonces.consume(services.db, n))
    except BadEnrollmentCode:
        if presented:
            ra.bootstrap_failed(presented[-1], g.agent)
        raise BadEnrollmentCode(BAD_CODE) from None

    def check_agent(email: str) -> None:  # once the MAC verified: the caller holds the code
        g.user_email = email
        services.agent_policy.check_user(g.agent, email)  # a scoped agent bootstraps only its domains

    return jsonify(ra.bootstrap(payload, code_id, g.agent, check_agent=check_agent)), 201


@api.post("/certificates")
def certificates():
    """The authenticated user's certificates (current, superseded, expired, revoked)."""
    return jsonify(g.services.recovery.list_own(_verified()))


@api.post("/recover")
def recover():
    """Self-service recovery of the user's own escrowed encryption keys."""
    return jsonify(g.services.recovery.recover_own(_verified()))


@api.post("/revoke")
def revoke():
    """The user revokes one of their own certificates."""
    return jsonify(g.services.ra.revoke_own(_verified()))


@api.post("/recovery-requests")
def open_recovery_request():
    return jsonify(g.services.recovery.open_request(_verified())), 201


@api.post("/recovery-requests/<request_id>/<action>")
def recovery_action(request_id: str, action: str):
    recovery = g.services.recovery
    handlers = {"approve": recovery.approve, "refuse": recovery.refuse, "release": recovery.release,
                "show": recovery.show}
    if action not in handlers:
        from ..core.errors import NotFound
        raise NotFound(f"unknown action {action[:32]!r}; use approve, refuse, release or show")
    return jsonify(handlers[action](_verified(), request_id))
