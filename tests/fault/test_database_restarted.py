"""The PostgreSQL server is restarted in the middle of a batch of enrollments: while it is down the
server answers 503 (a dependency is unavailable, try again), never 500; afterwards its pooled
connections are replaced and every user ends with exactly one certificate, delivered, published once,
with its key in escrow. Runs in the PostgreSQL pass of make test (`--database=postgresql`).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from bench.platform import eventually
from tests.fault import records

N = int(os.environ.get("AUTOENROLL_FAULT_N", "20"))
PROFILE = "smime-encryption-ec"

pytestmark = pytest.mark.postgresql_only


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    w = records.World(tmp_path_factory.mktemp("pg-restart"), N)
    yield w
    w.close()


def test_database_restart_mid_batch_is_a_503_and_loses_nothing(fault_world, postgres_server):
    w = fault_world
    restarted = threading.Event()
    started = threading.Event()

    def restart() -> None:
        try:
            postgres_server.restart(down_seconds=1.0)
        finally:
            restarted.set()

    def on_progress(done: int) -> None:
        if done >= max(2, N // 4) and not started.is_set():
            started.set()
            threading.Thread(target=restart).start()

    payload = {"profile": PROFILE, "password": "fault-password-1"}
    history: dict = {}
    final, seen = records.enroll_all(w, w.users, payload, agents=4, on_progress=on_progress,
                                     retry_until=time.monotonic() + 90, history=history)
    eventually(restarted.is_set, timeout=60, what="PostgreSQL to restart")

    statuses = {email: getattr(reply, "status", repr(reply)) for email, reply in final.items()}
    failed = {e: history[e] for e, status in statuses.items() if status != 201}
    assert not failed, (failed, (w.platform.data / "server.log").read_text()[-6000:])  # the server's side of it
    refused = [r for r in seen if not hasattr(r, "status") or r.status >= 500]
    # A GET /nonce refused meanwhile reaches the test as the client's RuntimeError quoting the answer.
    answers = [r.body if hasattr(r, "status") else str(r).encode() for r in refused]
    not_503 = [a[:300] for r, a in zip(refused, answers)
               if not (getattr(r, "status", None) == 503 or (not hasattr(r, "status") and b"HTTP 503" in a))]
    assert not_503 == []
    codes = {'"code":"database_unavailable"', '"code":"escrow_failed"', '"code":"unavailable"'}
    assert all(any(code.encode() in a for code in codes) for a in answers), answers[:3]
    records.assert_each_issued_published_once_and_escrowed(w, final, PROFILE, N)
    print(f"\nPostgreSQL restarted after {N // 4} of {N}: {len(refused)} requests refused while it was down")


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    w = records.World(tmp_path_factory.mktemp("pg-worker-boot"), 2)
    yield w
    w.close()


def test_a_worker_replaced_while_the_database_is_down_boots_and_the_server_stays_up(small_world, postgres_server):
    """gunicorn's master shuts the whole server down when a worker fails to boot (exit code 3): a
    worker that asked the database anything while booting took every worker with it when it was
    replaced during an outage. The master checks the database once before forking; workers do not."""
    w = small_world
    platform = w.platform
    before = platform.wait_workers()
    log = platform.data / "server.log"
    postgres_server.halt()
    try:
        os.kill(before[0], signal.SIGKILL)
        new = eventually(lambda: [p for p in platform.worker_pids() if p not in before] or None, timeout=30,
                         what="a worker in place of the killed one")[0]
        eventually(lambda: f"Booting worker with pid: {new}" in log.read_text(), timeout=30,
                   what="the new worker to boot")
        time.sleep(3)  # long enough for a boot that fails to fail (about 1 s before the fix)
        assert platform.process is not None and platform.process.poll() is None, log.read_text()[-3000:]
        assert new in platform.worker_pids()
        assert "exited with code 3" not in log.read_text()
        health = platform.session(client_cert=False).get(platform.url + "/health", timeout=10)
        assert health.status_code == 503, health.text
    finally:
        postgres_server.resume()
    final, _seen = records.enroll_all(w, w.users, {"profile": PROFILE, "password": "fault-password-1"}, agents=2,
                                      retry_until=time.monotonic() + 30)
    assert {reply.status for reply in final.values()} == {201}, final
    records.assert_each_issued_published_once_and_escrowed(w, final, PROFILE, 2)
