"""A gunicorn worker dies (SIGKILL) with requests in flight: no private key leaves without its escrow
row, no certificate row exists without its outbox row, and the next requests succeed.

Default 24 enrollments; AUTOENROLL_FAULT_N for more.
"""

from __future__ import annotations

import base64
import os
import signal
import threading

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from bench.platform import eventually
from registration_app.store.repos import outbox_status
from tests.fault import records

N = max(24, int(os.environ.get("AUTOENROLL_FAULT_N", "24")))
PROFILE = "smime-encryption-ec"
PASSWORD = "fault-password-2"


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    # Default PKCS#12 cost, so that a request spends its time where a kill hurts most.
    w = records.World(tmp_path_factory.mktemp("worker-kill"), N + 8, pkcs12_iterations=20000)
    yield w
    w.close()


def test_worker_killed_mid_request_loses_nothing_and_the_next_requests_succeed(fault_world):
    w = fault_world
    victims: list[int] = []
    lock = threading.Lock()

    def on_progress(done: int) -> None:
        with lock:
            if done >= N // 3 and not victims:
                pid = w.platform.worker_pids()[0]
                victims.append(pid)
                os.kill(pid, signal.SIGKILL)

    payload = {"profile": PROFILE, "password": PASSWORD}
    final, seen = records.enroll_all(w, w.users[:N], payload, agents=6, on_progress=on_progress)
    assert victims
    lost = [r for r in seen if not hasattr(r, "status")]
    statuses = sorted(str(getattr(r, "status", type(r).__name__)) for r in final.values())
    print(f"\nworker {victims[0]} killed: {len(lost)} request(s) lost their connection; final: {statuses}")

    # gunicorn replaced the worker; the next requests succeed on a fresh connection.
    new_workers = w.platform.wait_workers()
    assert victims[0] not in new_workers
    after, _ = records.enroll_all(w, w.users[N:], payload, agents=4)
    assert {r.status for r in after.values()} == {201}, {e: getattr(r, "status", r) for e, r in after.items()}

    escrow = records.escrow_rows(w.platform)
    outbox = records.outbox_serials(w.platform)
    issued = records.certificates(w.platform)
    # Every delivered PKCS#12 has its escrow row, and the escrowed key is the delivered key.
    for reply in [*final.values(), *after.values()]:
        if not hasattr(reply, "status") or reply.status != 201:
            continue
        body = reply.json()
        key, cert, _chain = pkcs12.load_key_and_certificates(base64.b64decode(body["pkcs12"]), PASSWORD.encode())
        assert body["serial"] in escrow
        assert records.recovered_key_matches(w.platform, escrow[body["serial"]], cert)
    # Every certificate row has its outbox row (same transaction) and, being an encryption certificate,
    # its escrow row (committed before signing).
    for row in issued:
        assert row.serial in outbox, row.serial
        assert row.serial in escrow, row.serial
    # Whatever the kill interrupted ends as a definite answer: issued, or refused, never half-done.
    statuses = [getattr(r, "status", None) for r in final.values()]
    assert all(s in (201, 401, 409, None) for s in statuses), statuses
    assert "audit log intact" in w.platform.autoenroll("audit", "verify").stdout
    # Nothing left unpublished: rows the killed worker published but never marked done fall due after
    # the inline grace (5 s) and the surviving workers' outbox threads publish them (idempotently).
    db = records.database(w.platform)
    try:
        eventually(lambda: outbox_status(db)["depth"] == 0, timeout=60, step=0.5, what="the outbox to drain")
    finally:
        db.dispose()
    shown = records.all_ldap_values(w.slapd.url)
    for row in issued:  # one enrollment per user: each certificate shown exactly once
        assert shown[row.email].count(row.der) == 1, row.serial
