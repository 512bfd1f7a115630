"""`python -m bench.txn`: the database side of one enrollment, in-process (create_app + Flask's test
client, the real slapd and SQLite or PostgreSQL, no TLS): SQL statements per enrollment, inside and
outside the writer lock, how long the lock is held, and the request thread's CPU.

Run it against another checkout of the code to compare (same run, same machine):
`PYTHONPATH=<checkout> python bench/txn.py` (the script imports `registration_app` from the path).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path


def measure(workdir: Path, n: int, *, database_url: str | None = None, threads: int = 1,
            group_commit: bool = True) -> dict:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from sqlalchemy import event

    from bench import world
    from bench.client import AgentConnection, peer_environ
    from bench.platform import make_platform
    from directory_sync.slapd import PrivateSlapd
    from registration_app.agent.jws import sign_user_request, thumbprint
    from registration_app.store import db as store_db
    from registration_app.web.app import create_app
    from registration_app.wiring import build_services

    local = threading.local()
    held_for: list[float] = []
    committing: list[float] = []  # of the time held: from COMMIT sent to the lock released (the fsync)
    statements = {"in_lock": 0, "outside": 0}
    counting = threading.Event()
    original_held = store_db._WriterQueue.held

    @contextmanager
    def timed_held(self):
        with original_held(self):
            outermost = getattr(local, "depth", 0) == 0
            local.depth = getattr(local, "depth", 0) + 1
            t0 = local.commit_at = time.perf_counter()
            try:
                yield
            finally:
                local.depth -= 1
                if outermost and counting.is_set():
                    end = time.perf_counter()
                    held_for.append(end - t0)
                    committing.append(end - local.commit_at)

    store_db._WriterQueue.held = timed_held  # type: ignore[method-assign]
    try:
        from registration_app.store import group_commit as grouping
    except ImportError:  # a checkout from before it
        grouping = None
    if grouping is not None and not group_commit:
        original_run = grouping.GroupCommit.run
        grouping.GroupCommit.run = lambda self, work, attempts: self._db._run(  # type: ignore[method-assign]
            work, attempts, self._db._write)
    try:  # statements run straight on the DBAPI cursor (store/prepared.py) pass no SQLAlchemy event
        from registration_app.store.prepared import Prepared
    except ImportError:  # a checkout from before them
        Prepared = None
    if Prepared is not None:
        original_cursor = Prepared._cursor

        def counted_cursor(self, conn, params):
            count(conn, None, None, params, None, isinstance(params, list))
            return original_cursor(self, conn, params)

        Prepared._cursor = counted_cursor  # type: ignore[method-assign]

    def commit_starts(conn):
        local.commit_at = time.perf_counter()

    def count(conn, cursor, statement, parameters, context, executemany):
        if counting.is_set() and threading.current_thread().name.startswith("enroll"):
            statements["in_lock" if getattr(local, "depth", 0) else "outside"] += 1

    slapd = PrivateSlapd(workdir / "slapd")
    slapd.start()
    try:
        uids = world.new_uids(n + 4)
        slapd.bulk_load(world.users_ldif(uids))
        options = {"database_url": database_url} if database_url else {}
        platform = make_platform(workdir / "server", slapd.url, **options)
        settings = platform.settings()
        services = build_services(settings, run_migrations=False)
        engines = [services.db.engine] + ([services.db._thread_engine] if services.db._thread_engine else [])
        for engine in engines:
            event.listen(engine, "before_cursor_execute", count)
            event.listen(engine, "commit", commit_starts)
        try:
            app = create_app(settings, services)
            agent_der = x509.load_pem_x509_certificate(
                Path(platform.agent_cert).read_bytes()).public_bytes(Encoding.DER)
            environ = peer_environ(agent_der)
            url = AgentConnection(platform.url, ca=platform.tls_ca, cert=None, key=None).url("enroll")
            users = world.Minter(platform.data, platform.passphrase).users(uids)
            payload = {"profile": "smime-encryption-ec", "password": "bench-password-0123"}
            cpu: list[float] = []
            statuses: dict[int, int] = {}
            lock = threading.Lock()

            def enroll_all(batch):
                client = app.test_client()
                for user in batch:
                    nonce = client.get("/api/v1/nonce", base_url=platform.url,
                                       environ_base=environ).get_json()["nonce"]
                    body = sign_user_request(payload, key=user.key, chain=list(user.chain), nonce=nonce, url=url,
                                             agent_thumbprint=thumbprint(agent_der))
                    t0 = time.thread_time()
                    reply = client.post("/api/v1/enroll", data=body, base_url=platform.url, environ_base=environ,
                                        headers={"Content-Type": "application/jose+json"})
                    spent = time.thread_time() - t0
                    with lock:
                        cpu.append(spent)
                        statuses[reply.status_code] = statuses.get(reply.status_code, 0) + 1

            warm = threading.Thread(target=enroll_all, args=(users[:4],), name="enroll-warm")
            warm.start()
            warm.join()
            cpu.clear()
            statuses.clear()
            counting.set()
            t0 = time.perf_counter()
            workers = [threading.Thread(target=enroll_all, args=(users[4 + i::threads],), name=f"enroll-{i}")
                       for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            wall = time.perf_counter() - t0
            counting.clear()
            services.publisher.completions.flush()
        finally:
            services.close()
    finally:
        store_db._WriterQueue.held = original_held  # type: ignore[method-assign]
        if grouping is not None and not group_commit:
            grouping.GroupCommit.run = original_run  # type: ignore[method-assign]
        if Prepared is not None:
            Prepared._cursor = original_cursor  # type: ignore[method-assign]
        slapd.stop()
    ok = statuses.get(201, 0)
    return {
        "database": "postgresql" if database_url else "sqlite",
        "threads": threads,
        "group_commit": group_commit,
        "enrollments": ok,
        "statuses": statuses,
        "rate_per_s": round(ok / wall, 1),
        "statements_per_enrollment_in_lock": round(statements["in_lock"] / max(ok, 1), 2),
        "statements_per_enrollment_outside": round(statements["outside"] / max(ok, 1), 2),
        "write_transactions_per_enrollment": round(len(held_for) / max(ok, 1), 2),
        "lock_held_ms_p50": round(1000 * statistics.median(held_for), 3) if held_for else None,
        "lock_held_ms_mean": round(1000 * statistics.fmean(held_for), 3) if held_for else None,
        "lock_held_ms_per_enrollment": round(1000 * sum(held_for) / max(ok, 1), 3),
        "of_which_commit_ms_p50": round(1000 * statistics.median(committing), 3) if committing else None,
        "request_cpu_ms_p50": round(1000 * statistics.median(cpu), 3) if cpu else None,
        "request_cpu_ms_mean": round(1000 * statistics.fmean(cpu), 3) if cpu else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.txn", description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200, help="enrollments")
    parser.add_argument("--threads", type=int, default=1, help="request threads in the one process")
    parser.add_argument("--database-url", default=None, help="a PostgreSQL URL (default: SQLite in the data folder)")
    parser.add_argument("--no-group-commit", action="store_true", help="each unit its own transaction")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-txn-") as workdir:
        result = measure(Path(workdir), args.n, database_url=args.database_url, threads=args.threads,
                         group_commit=not args.no_group_commit)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
