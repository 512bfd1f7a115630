"""slapd dies (SIGKILL) in the middle of a batch of enrollments and comes back: nothing is lost.

Default 20 enrollments; AUTOENROLL_FAULT_N=200 for the full-size run.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
from cryptography import x509

from bench.platform import eventually
from tests.fault import records

N = int(os.environ.get("AUTOENROLL_FAULT_N", "20"))
PROFILE = "smime-encryption-ec"


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    w = records.World(tmp_path_factory.mktemp("slapd-kill"), N)
    yield w
    w.close()


def test_every_certificate_is_published_once_and_escrowed_after_slapd_is_killed(fault_world):
    w = fault_world
    killed = threading.Event()
    restarted = threading.Event()

    def on_progress(done: int) -> None:
        # Kill slapd with requests in flight, after about a quarter of the batch.
        if done >= max(2, N // 4) and not killed.is_set():
            killed.set()
            w.slapd.kill()
            threading.Timer(1.0, lambda: (w.slapd.start(), restarted.set())).start()

    payload = {"profile": PROFILE, "password": "fault-password-1"}
    history: dict = {}
    final, seen = records.enroll_all(w, w.users, payload, agents=4, on_progress=on_progress,
                                     retry_until=time.monotonic() + 90, history=history)
    assert killed.is_set()
    eventually(restarted.is_set, timeout=30, what="slapd to restart")

    refused_while_down = [r for r in seen if not hasattr(r, "status") or r.status >= 500]
    statuses = {email: getattr(reply, "status", repr(reply)) for email, reply in final.items()}
    assert set(statuses.values()) == {201}, {email: history[email] for email, status in statuses.items()
                                             if status != 201}
    assert all(r.status == 503 for r in refused_while_down if hasattr(r, "status")), \
        [r.body[:200] for r in refused_while_down if hasattr(r, "status")]

    # The outbox drains by itself once slapd is back.
    records.assert_each_issued_published_once_and_escrowed(w, final, PROFILE, N)
    print(f"\nslapd killed after {N // 4} of {N}: {len(refused_while_down)} requests refused while it was down, "
          f"{sum(1 for r in final.values() if not r.json()['published'])} published later by the outbox")
