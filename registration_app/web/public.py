"""Routes anyone may call without a client certificate: health, the CA certificate, the CRL."""

from __future__ import annotations

from datetime import datetime, timezone

from flask import Blueprint, Response, g, jsonify
from cryptography.hazmat.primitives.serialization import Encoding

from ..core.errors import AutoenrollError
from ..store.repos import outbox_status

public = Blueprint("public", __name__)


@public.get("/health")
def health():
    services = g.services
    checks = {}
    try:
        checks["database"] = "ok"
        checks["outbox"] = outbox_status(services.db)
    except Exception as exc:  # health must answer even when the database does not
        checks["database"] = f"error: {type(exc).__name__}"
    try:
        services.directory.find_user("health-check@invalid")  # a real search through the pool
        checks["directory"] = "ok"
    except AutoenrollError as exc:
        checks["directory"] = f"error: {exc.detail}"
    healthy = checks["database"] == "ok"
    body = {"status": "ok" if healthy and checks["directory"] == "ok" else "degraded", "checks": checks}
    return jsonify(body), 200 if healthy else 503


@public.get("/ca.crt")
def ca_certificate():
    der = g.services.ca.certificate.public_bytes(Encoding.DER)
    return Response(der, mimetype="application/pkix-cert",
                    headers={"Cache-Control": "public, max-age=86400"})


@public.get("/crl/ca.crl")
def crl():
    current = g.services.ca.crl()
    max_age = max(0, int((current.next_update_utc - datetime.now(timezone.utc)).total_seconds()))
    return Response(current.public_bytes(Encoding.DER), mimetype="application/pkix-crl",
                    headers={"Cache-Control": f"public, max-age={min(max_age, 3600)}",
                             "Last-Modified": current.last_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")})
