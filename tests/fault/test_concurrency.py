"""The database under contention (SQLite, two gunicorn workers, the outbox worker, and an outside writer
holding the write lock), and 32 simultaneous requests for the same user and profile."""

from __future__ import annotations

import collections
import os
import sqlite3
import threading
import time

import pytest

from bench.platform import eventually
from tests.fault import records

N = int(os.environ.get("AUTOENROLL_FAULT_N", "40"))
PROFILE = "smime-encryption-ec"
SAME_USER = 32


@pytest.fixture(scope="module")
def fault_world(tmp_path_factory):
    # The outbox worker polls every 20 ms: it competes for the database all the time.
    w = records.World(tmp_path_factory.mktemp("busy"), N + 2, outbox_interval_seconds=0.02)
    yield w
    w.close()


@pytest.mark.sqlite_only
def test_busy_sqlite_never_surfaces_as_500(fault_world):
    """Two workers x four threads and the outbox worker write while another program (the sqlite3
    library, which knows nothing of the server's lock file) takes the write lock for 150 ms at a time:
    every request waits and succeeds; none ends in a 5xx."""
    w = fault_world
    stop = threading.Event()
    held = []

    def outside_writer():
        conn = sqlite3.connect(w.platform.db_path, timeout=30, isolation_level=None)
        while not stop.is_set():
            conn.execute("BEGIN IMMEDIATE")
            time.sleep(0.15)
            conn.execute("COMMIT")
            held.append(1)
            time.sleep(0.05)
        conn.close()

    blocker = threading.Thread(target=outside_writer)
    blocker.start()
    try:
        final, seen = records.enroll_all(w, w.users[:N], {"profile": PROFILE, "password": "busy-password"},
                                         agents=8)
    finally:
        stop.set()
        blocker.join()
    statuses = collections.Counter(getattr(r, "status", type(r).__name__) for r in seen)
    assert statuses == {201: N}, statuses
    assert held, "the outside writer never held the lock"
    assert "event=request.bug" not in w.platform.log.read_text()


def test_32_simultaneous_requests_for_the_same_user_and_profile(fault_world):
    """Outcome, defined: all 32 requests carry a valid signature and a fresh nonce and reach the
    registration authority at once. Exactly one is issued (201). Every other one is refused with
    409 Conflict — either "already has a current certificate" (it read the database after the winner
    committed) or "another request already replaced this certificate" (it read before, and lost the
    unique renewal key (user, profile, predecessor) when recording) — or 429 if the daily limit were
    reached. Never two current certificates; the directory shows exactly the winner's certificate.
    A loser may leave an escrowed key for a certificate that was never signed: harmless, audited."""
    w = fault_world
    user = w.users[-1]
    conns = [w.connection() for _ in range(SAME_USER)]
    payload = {"profile": PROFILE, "password": "race-password"}
    bodies = [c.sign(payload, user) for c in conns]  # each with its own nonce, over its own connection
    barrier = threading.Barrier(SAME_USER)
    replies: list = [None] * SAME_USER

    def fire(i: int) -> None:
        barrier.wait()
        replies[i] = conns[i].post("enroll", bodies[i])

    threads = [threading.Thread(target=fire, args=(i,)) for i in range(SAME_USER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for c in conns:
        c.close()

    statuses = collections.Counter(r.status for r in replies)
    assert statuses[201] == 1, statuses
    assert set(statuses) <= {201, 409, 429}, statuses
    for reply in replies:
        if reply.status != 201:
            assert reply.content_type == "application/problem+json"
            assert reply.json()["code"] in {"conflict", "rate_limited"}
    current = [c for c in records.certificates(w.platform, PROFILE) if c.email == user.email and c.status == "valid"]
    assert len(current) == 1
    winner = next(r for r in replies if r.status == 201).json()
    assert current[0].serial == winner["serial"]

    def published():
        return records.ldap_values(w.slapd.url, user.email) == [current[0].der]

    assert eventually(published, timeout=30, what="the winner's certificate alone in LDAP")
