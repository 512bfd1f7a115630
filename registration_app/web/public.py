"""Routes anyone may call without a client certificate: health, the CA certificate, the CRL."""

from __future__ import annotations

from datetime import datetime, timezone

from cryptography import x509
from flask import Blueprint, Response, g, jsonify, request
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
