"""gunicorn, embedded: TLS with optional client certificates, threaded workers for keep-alive, whose
threads take only requests that have fully arrived (worker.py)."""

from __future__ import annotations

import ssl

from gunicorn.app.base import BaseApplication

from ..authorities.pki_files import PkiPaths
from ..settings import Settings
from .worker import worker_class


class _Server(BaseApplication):
    """One `autoenroll serve` for every role: what it serves follows settings.role (wiring.py, app.py)."""

    def __init__(self, settings: Settings, options: dict) -> None:
        self.settings = settings
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        from ..wiring import build_services
        from .app import create_app
        # Migrations and the database check ran once in run(): a worker boots with the database down
        services = build_services(self.settings, run_migrations=False, database_checked=True)
        app = create_app(self.settings, services)
        _freeze_the_heap()
        services.start_background()
        self.services = services  # this worker's, for worker_exit
        return app


def _freeze_the_heap() -> None:
    """What a worker built at boot (modules, settings, trust, the app: some hundred thousand objects)
    lives as long as the worker: out of the cyclic collector's sight (gc.freeze) once the boot's own
    garbage is collected. Otherwise every full collection walks all of it again, 44-85 ms with the GIL
    held, during which none of the worker's threads runs (PERFORMANCE.md, "The next request on the
    thread that answered, and the boot heap frozen")."""
    import gc
    gc.collect()
    gc.freeze()


def gunicorn_options(settings: Settings) -> dict:
    paths = PkiPaths.in_dir(settings.data_dir)
    return {
        "bind": settings.bind,
        "workers": settings.workers,
        "threads": settings.threads,
        # gthread, but the TLS handshake and the request's arrival happen in the worker's poller, with a
        # deadline: idle and slow connections never hold the threads that serve agents.
        "worker_class": worker_class(body_limit=settings.max_body_bytes),
        "worker_connections": 1000,  # per worker; when full, the oldest connection still arriving goes
        "certfile": str(paths.server_cert),
        "keyfile": str(paths.server_key),
        "ca_certs": str(paths.tls_ca_cert),
        "cert_reqs": ssl.CERT_OPTIONAL,  # /health and /crl stay public; /api/ demands a certificate
        "keepalive": 30,
        "timeout": 60,
        "graceful_timeout": 10,
        "accesslog": None,
        "control_socket_disable": True,  # gunicornc's ~/.gunicorn/gunicorn.ctl is one per user, not per server
    }


def start_plain_http(settings: Settings):
    """The CRL distribution point and caIssuers URLs are plain HTTP (S/MIME BR): a small threaded
    listener in the gunicorn master serves only the public routes from the same database.

    In a split deployment the CA's http_url is the one written into certificates, so the CA serves it (an
    RA may serve it too, fetching the CRL from the CA); the KRA serves nothing in plain HTTP."""
    if not settings.http_bind or settings.role == "kra":
        return None
    import threading

    from werkzeug.serving import make_server

    from ..wiring import build_services
    from .app import create_app
    host, _, port = settings.http_bind.rpartition(":")
    app = create_app(settings, build_services(settings, run_migrations=False, database_checked=True),
                     with_api=False)
    server = make_server(host, int(port), app, threaded=True)
    threading.Thread(target=server.serve_forever, name="plain-http", daemon=True).start()
    return server


def run(settings: Settings) -> None:
    from ..wiring import check_database, check_directory, check_role, server_database
    from ..store.db import migrate
    from ..core.errors import AutoenrollError
    try:
        check_role(settings)  # before gunicorn forks: a misconfigured role stops here with its reason
        check_directory(settings)  # and so do LDAP settings that are unsafe or a TLS set-up that fails
        migrate(settings.db_url)
        db = server_database(settings)  # and a database `autoenroll init` has not finished with
        try:
            check_database(db)
        finally:
            db.dispose()
    except AutoenrollError as exc:
        raise SystemExit(f"autoenroll serve: {exc.detail}") from None
    options = gunicorn_options(settings)
    options["when_ready"] = lambda _arbiter: start_plain_http(settings)
    server = _Server(settings, options)
    server.cfg.set("worker_exit", lambda _arbiter, _worker: _close_services(server))
    server.run()


def _close_services(server: _Server) -> None:
    """A worker stopping (graceful shutdown, max requests): mark what it published, close its pools."""
    services = getattr(server, "services", None)
    if services is not None:
        services.close()
