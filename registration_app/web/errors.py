"""The one place where errors become RFC 9457 problem documents, with the HTTP status of their code
from the one table (status.py). The mapper writes nothing: it leaves what it answered a refused
request (and a request the key store failed) in `g.refusal`, which the agent API reports to the RA
(api.py `_report_refusal`), whose `refused` audits it; a CA or KRA service audits its key store's
failures itself (authority_api.py). Database errors reach it already translated by the store
(store/errors.py)."""

from __future__ import annotations

import logging

from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from ..core.errors import AutoenrollError, KeyStoreUnavailable
from .status import status_of

log = logging.getLogger("autoenroll.web")

HTTP_CODES = {413: "body_too_large", 404: "not_found", 405: "method_not_allowed"}


def problem(status: int, code: str, title: str, detail: str, **extra):
    body = {"type": f"urn:autoenroll:problem:{code}", "title": title, "status": status,
            "detail": detail, "code": code, "request_id": getattr(g, "request_id", None)}
    body.update({k: v for k, v in extra.items() if isinstance(v, (str, int, float, bool))})
    response = jsonify(body)
    response.status_code = status
    response.content_type = "application/problem+json"
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(AutoenrollError)
    def _autoenroll(error: AutoenrollError):
        status = status_of(error)
        if status >= 500:
            log.error("event=request.error request_id=%s code=%s detail=%r cause=%r", g.get("request_id"),
                      error.code, error.detail, getattr(error, "cause", None), exc_info=status == 500)
            if isinstance(error, KeyStoreUnavailable):  # not served, nothing issued: the RA audits it too
                g.refusal = (error.code, error.detail)
        else:
            log.info("event=request.refused request_id=%s code=%s detail=%r", g.get("request_id"),
                     error.code, error.detail)
            g.refusal = (error.code, error.detail)
        response = problem(status, error.code, error.title, error.detail, **error.extra)
        if getattr(error, "retry_after", None):
            response.headers["Retry-After"] = str(error.retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http(error: HTTPException):
        status = error.code or 400
        code = HTTP_CODES.get(status, "bad_request")
        if 400 <= status < 500:
            g.refusal = (code, error.description or error.name)
        return problem(status, code, error.name, error.description or error.name)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception):
        log.exception("event=request.bug request_id=%s", g.get("request_id"))
        return problem(500, "internal", "Internal error",
                       "an unexpected error occurred; the request id identifies it in the server log")
