"""The one place where errors become RFC 9457 problem documents."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify, request
from sqlalchemy.exc import DBAPIError, OperationalError
from werkzeug.exceptions import HTTPException

from ..core.errors import AutoenrollError, DatabaseUnavailable, KeyStoreUnavailable
from ..store import audit
from ..store.repos import record_nonce

log = logging.getLogger("autoenroll.web")


def problem(status: int, code: str, title: str, detail: str, **extra):
    body = {"type": f"urn:autoenroll:problem:{code}", "title": title, "status": status,
            "detail": detail, "code": code, "request_id": getattr(g, "request_id", None)}
    body.update({k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))})
    response = jsonify(body)
    response.status_code = status
    response.content_type = "application/problem+json"
    return response


def _record_denial(error: AutoenrollError) -> None:
    """Every refused API request is one audit row (who asked, what for, why refused): refusals by
    our own checks and by the HTTP layer (413 body too large, 404, 405) alike."""
    services = getattr(g, "services", None)
    if services is None or not request.path.startswith("/api/"):
        return
    agent = getattr(g, "agent", None)
    user = getattr(g, "user_email", None)
    nonce = getattr(g, "pending_nonce", None)  # checked, not yet used: a refused request uses it too

    def work(conn):
        if nonce is not None:
            record_nonce(conn, nonce)  # False if the request it came with used it: nothing to do
        audit.append(conn, event="request.denied", outcome="denied",
                     actor=agent.subject if agent else f"peer:{request.remote_addr}",
                     subject=user or "", detail={"path": request.path, "code": error.code,
                                                 "reason": error.detail[:300], "request_id": g.request_id})

    try:
        services.db.run(work, core=True)
    except Exception:  # the refusal stands even when the audit store is down; say so in the log
        log.exception("event=audit.write_failed request_id=%s", getattr(g, "request_id", None))


def _record_key_store_failure(error: KeyStoreUnavailable) -> None:
    """A request the key store (HSM) failed, in any role: one audit row saying what happened; nothing was
    signed, unwrapped or recorded before it (authorities/pkcs11_store.py)."""
    services = getattr(g, "services", None)
    if services is None:
        return
    agent = getattr(g, "agent", None)
    try:
        services.db.run(lambda conn: audit.append(
            conn, event="key_store.unavailable", outcome="failed",
            actor=agent.subject if agent else f"peer:{request.remote_addr}",
            subject=getattr(g, "user_email", None) or "",
            detail={"path": request.path, "code": error.code, "reason": error.detail[:300],
                    "request_id": g.get("request_id")}), core=True)
    except Exception:
        log.exception("event=audit.write_failed request_id=%s", g.get("request_id"))


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AutoenrollError)
    def _autoenroll(error: AutoenrollError):
        if error.status >= 500:
            log.error("event=request.error request_id=%s code=%s detail=%r", g.get("request_id"),
                      error.code, error.detail, exc_info=error.status == 500)
            if isinstance(error, KeyStoreUnavailable):
                _record_key_store_failure(error)
        else:
            log.info("event=request.refused request_id=%s code=%s detail=%r", g.get("request_id"),
                     error.code, error.detail)
            _record_denial(error)
        response = problem(error.status, error.code, error.title, error.detail, **error.extra)
        if getattr(error, "retry_after", None):
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException):
        status = error.code or 400
        code = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status, "bad_request")
        if 400 <= status < 500:
            refusal = AutoenrollError(error.description or error.name)
            refusal.code = code
            _record_denial(refusal)
        return problem(status, code, error.name, error.description or error.name)

    @app.errorhandler(DBAPIError)
    def _database(error: DBAPIError):
        """The database server cannot be reached, or cut the connection (restarted, failed over): a
        503 the agent retries, not a bug. The pool replaces the dead connections."""
        if not (isinstance(error, OperationalError) or error.connection_invalidated):
            return _unexpected(error)
        log.error("event=database.unavailable request_id=%s error=%r", g.get("request_id"),
                  str(error.orig).splitlines()[0] if error.orig else type(error).__name__)
        return _autoenroll(DatabaseUnavailable("the database cannot be reached; try again shortly",
                                               retry_after=5))

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("event=request.bug request_id=%s", g.get("request_id"))
        return problem(500, "internal", "Internal error",
                       "an unexpected error occurred; the request id identifies it in the server log")
