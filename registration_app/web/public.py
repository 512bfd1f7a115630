"""Routes anyone may call without a client certificate: health, the CA certificate, the CRL."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from cryptography import x509
from flask import Blueprint, Response, current_app, g, jsonify, request
from cryptography.hazmat.primitives.serialization import Encoding

from ..auth.agent import identify_agent
from ..auth.request_checks import agent_revocation
from ..core.errors import AutoenrollError
from ..store.repos import outbox_status
from .api import peer_certificate_der

public = Blueprint("public", __name__)
log = logging.getLogger("autoenroll.web")

# A load balancer may poll every second: each process runs the checks at most this often.
HEALTH_CACHE_SECONDS = 2.0
# What /health checks; any that fails makes it 503 and is named in the answer.
PARTS = ("database", "directory", "key_store")


class HealthCache:
    """This process's last health checks, kept `ttl` seconds: /health is public, and an anonymous
    caller must not make the server bind to LDAP and query the database at will. One thread runs the
    checks while the others wait for its answer (they are bounded by the LDAP and database timeouts)."""

    def __init__(self, ttl: float = HEALTH_CACHE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl, self.clock = ttl, clock
        self._lock = threading.Lock()
        self._checks: dict | None = None
        self._taken_at = 0.0

    def checks(self, services) -> dict:
        with self._lock:
            if self._checks is None or self.clock() - self._taken_at >= self.ttl:
                self._checks = _run_checks(services)
                self._taken_at = self.clock()
            return self._checks


def _run_checks(services) -> dict:
    """database: a query answers; directory: a new bind as the service account is accepted (not only a
    pooled connection bound earlier); key_store: the token keys this role uses answer ("ok" when they
    are files, read at start). A failing check holds "error: " and what failed."""
    checks: dict = {}
    try:
        checks["outbox"] = outbox_status(services.db)
        checks["database"] = "ok"
    except Exception as exc:  # health must answer even when the database does not
        checks["database"] = f"error: {exc.detail if isinstance(exc, AutoenrollError) else type(exc).__name__}"
        log.warning("event=health.database_failed error=%r", type(exc).__name__)
    try:
        services.directory.check_bind()
        checks["directory"] = "ok"
    except AutoenrollError as exc:
        checks["directory"] = f"error: {exc.detail}"
        log.warning("event=health.directory_failed code=%s detail=%r", exc.code, exc.detail)
    try:
        if services.key_probe is not None:
            services.key_probe()
        checks["key_store"] = "ok"
    except AutoenrollError as exc:
        checks["key_store"] = f"error: {exc.detail}"
        log.warning("event=health.key_store_failed code=%s detail=%r", exc.code, exc.detail)
    return checks


def failing_parts(checks: dict) -> list[str]:
    return [part for part in PARTS if checks.get(part) != "ok"]


def _caller_is_an_agent(services) -> bool:
    """A verified, allowed, unrevoked agent certificate on this connection: it may see the details."""
    try:
        identify_agent(peer_certificate_der(), services.agent_policy, datetime.now(timezone.utc),
                       is_revoked=agent_revocation(services.db))
    except Exception:  # refused, or the revocation list unreadable (database down): health still answers
        return False
    return True


@public.get("/health")
def health():
    """200 up when the database answers, the directory accepts our bind and the key store answers;
    otherwise 503 down, naming the failing parts (`failing`). A user server with its TLS client
    certificate also gets the checks: each part's state (the cause of a failure), the outbox depth."""
    services = g.services
    checks = current_app.extensions["autoenroll.health"].checks(services)
    failing = failing_parts(checks)
    summary: dict = {"status": "down", "failing": failing} if failing else {"status": "up"}
    status = 503 if failing else 200
    if not _caller_is_an_agent(services):
        return jsonify(summary), status
    return jsonify({**summary, "checks": checks}), status


@public.get("/ca.crt")
def ca_certificate():
    der = g.services.ca.certificate.public_bytes(Encoding.DER)
    return Response(der, mimetype="application/pkix-cert",
                    headers={"Cache-Control": "public, max-age=86400"})


HTTP_DATE = "%a, %d %b %Y %H:%M:%S GMT"


@public.get("/crl/ca.crl")
def crl():
    """The CRL of the certificates' distribution point: DER, cacheable until a new one may exist.

    A revocation publishes a new CRL at once, so caches may keep one for at most an hour (and never
    past nextUpdate); the ETag is the CRL number, so a conditional GET costs nothing.
    """
    current = g.services.ca.crl()
    number = current.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    etag = f'"crl-{number}"'
    max_age = max(0, int((current.next_update_utc - datetime.now(timezone.utc)).total_seconds()))
    headers = {"Cache-Control": f"public, max-age={min(max_age, 3600)}, no-transform",
               "Last-Modified": current.last_update_utc.strftime(HTTP_DATE),
               "Expires": current.next_update_utc.strftime(HTTP_DATE), "ETag": etag}
    if request.headers.get("If-None-Match") == etag:
        return Response(status=304, headers=headers)
    return Response(current.public_bytes(Encoding.DER), mimetype="application/pkix-crl", headers=headers)
