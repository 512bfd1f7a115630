"""Application factory: `create_app(settings, services=None)` builds a fresh app (one per test)."""

from __future__ import annotations

import io
import logging
import secrets

from flask import Flask, g, request

from ..core.errors import BadRequest
from ..settings import Settings
from .api import api
from .authority_api import ca_authority, kra_authority
from .errors import register_error_handlers
from .public import HealthCache, public

log = logging.getLogger("autoenroll.web")


class ChunkedBodyLimit:
    """WSGI wrapper: a chunked request body gets the Content-Length it has, as a proxy would give it.

    werkzeug enforces MAX_CONTENT_LENGTH on a declared length (413 before anything reads the body), but
    reads a chunked body only up to the limit and stops there without a word: a signed request padded
    past the limit was acted on truncated. So a chunked body is read here, from the server's stream
    (gunicorn ends it where the body ends), up to one byte past the limit; one that long is handed on
    with that length (the rest read and thrown away, up to DISCARDED_BYTES), and werkzeug refuses it with 413 like any other, in the error handler that audits
    the refusal (errors.py). A truncated body never reaches a route; nor does a malformed one (a bad
    chunk size, say): it is refused with 400 before any route runs."""

    def __init__(self, wsgi_app, limit: int) -> None:
        self.wsgi_app, self.limit = wsgi_app, limit

    def __call__(self, environ, start_response):
        if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
            stream, parts, size = environ["wsgi.input"], [], 0
            environ = {k: v for k, v in environ.items() if k != "HTTP_TRANSFER_ENCODING"}
            try:
                while size <= self.limit:
                    part = stream.read(self.limit + 1 - size)
                    if not part:
                        break
                    parts.append(part)
                    size += len(part)
            except Exception as exc:  # the server's chunk parser refused the framing
                environ[MALFORMED_BODY] = type(exc).__name__
                parts, size = [], 0
            if size > self.limit:
                discard(stream, DISCARDED_BYTES)
            environ.update({"wsgi.input": io.BytesIO(b"".join(parts)), "CONTENT_LENGTH": str(size)})
        return self.wsgi_app(environ, start_response)


MALFORMED_BODY = "autoenroll.malformed_body"
# Of a chunked body refused as too large, this much more is read and thrown away before the 413: a client
# that writes its whole body before reading (most do) has then sent it and reads its answer. Closing on a
# body still arriving makes the kernel answer with a reset, which destroys the 413 in the client's buffer.
# Past this the connection is closed (gunicorn's graceful close) and such a client may see only the reset.
DISCARDED_BYTES = 1 << 20


def discard(stream, budget: int) -> None:
    """Read and drop up to `budget` bytes; bad framing in what is dropped ends it (the body is refused
    with 413 whatever follows)."""
    try:
        while budget > 0:
            part = stream.read(min(budget, 64 * 1024))
            if not part:
                return
            budget -= len(part)
    except Exception:  # noqa: BLE001 - any parse error of a body already refused ends the drain
        return


def create_app(settings: Settings, services=None, *, with_api: bool = True) -> Flask:
    """`with_api=False` builds the public-only app of the plain-HTTP listener (CRL, CA, health).

    Which API is served follows `settings.role`: the agent API for "all" and "ra", the authority API of
    the CA or the KRA for "ca" and "kra" (web/authority_api.py)."""
    if services is None:
        from ..wiring import build_services
        services = build_services(settings)
    app = Flask("autoenroll")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.wsgi_app = ChunkedBodyLimit(app.wsgi_app, settings.max_body_bytes)
    app.extensions["autoenroll"] = services
    app.extensions["autoenroll.health"] = HealthCache()

    @app.before_request
    def _context():
        g.services = services
        g.request_id = request.headers.get("X-Request-ID", "")[:64] or secrets.token_hex(8)
        if MALFORMED_BODY in request.environ:
            raise BadRequest(f"the chunked request body is malformed ({request.environ[MALFORMED_BODY]})")

    @app.after_request
    def _stamp(response):
        response.headers["X-Request-ID"] = g.request_id
        response.headers.setdefault("Cache-Control", "no-store")
        log.info("event=request method=%s path=%s status=%d request_id=%s agent=%r",
                 request.method, request.path, response.status_code, g.request_id,
                 getattr(g.get("agent"), "subject", None))
        return response

    register_error_handlers(app)
    app.register_blueprint(public)
    if with_api and settings.role in ("all", "ra"):
        app.register_blueprint(api, url_prefix="/api/v1")
    elif with_api and settings.role == "ca":
        app.register_blueprint(ca_authority, url_prefix="/authority/v1/ca")
    elif with_api and settings.role == "kra":
        app.register_blueprint(kra_authority, url_prefix="/authority/v1/kra")
    return app
