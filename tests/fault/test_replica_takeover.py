"""The first server of `[ldap] url` is killed (SIGKILL) in the middle of a batch of enrollments: the
second (a replica with the same entries) takes over, for reads (entitlement) and writes (publication),
within the timeout. Nothing is lost and every certificate is in the directory that took it.

Default 20 enrollments; AUTOENROLL_FAULT_N=200 for the full-size run.
"""

from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from bench import world
from bench.platform import eventually, make_platform
from directory_sync.slapd import PrivateSlapd
from tests.fault import records

N = int(os.environ.get("AUTOENROLL_FAULT_N", "20"))
PROFILE = "smime-encryption-ec"


class ReplicaWorld:
    """Two slapds with the same users, and a platform whose url lists the first, then the replica."""

    def __init__(self, folder, n: int) -> None:
        self.first = PrivateSlapd(folder / "first")
        self.replica = PrivateSlapd(folder / "replica")
        self.platform = None
        uids = world.new_uids(n, prefix="r" + uuid.uuid4().hex[:4])
        # A replica holds the same entries with the same entryUUIDs (certificates are bound to them).
        ldif = world.users_ldif(uids, entry_uuids=True)
        try:
            for slapd in (self.first, self.replica):
                slapd.start()
                slapd.bulk_load(ldif)
            self.platform = make_platform(folder / "server", self.first.url,
                                          ldap={"url": f"{self.first.url} {self.replica.url}"}, **records.FAST)
            self.platform.start()
            self.users = world.Minter(self.platform.data, self.platform.passphrase).users(uids)
        except BaseException:
            self.close()
            raise

    def connection(self):
        from bench.client import AgentConnection
        return AgentConnection.for_platform(self.platform)

    def close(self) -> None:
        try:
            if self.platform is not None:
                self.platform.stop()
        finally:
            self.first.stop()
            self.replica.stop()


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    w = ReplicaWorld(tmp_path_factory.mktemp("replica"), N)
    yield w
    w.close()


def test_the_replica_takes_over_reads_and_writes_when_the_first_server_is_killed(replicas):
    w = replicas
    killed: list[int] = []

    def on_progress(done: int) -> None:
        if done >= max(2, N // 4) and not killed:
            killed.append(done)
            w.first.kill()

    history: dict = {}
    final, seen = records.enroll_all(w, w.users, {"profile": PROFILE, "password": "replica-password-1"},
                                     agents=4, on_progress=on_progress,
                                     retry_until=time.monotonic() + 60, history=history)
    assert killed
    statuses = {email: getattr(reply, "status", repr(reply)) for email, reply in final.items()}
    assert set(statuses.values()) == {201}, {e: history[e] for e, s in statuses.items() if s != 201}
    refused = [r for r in seen if not hasattr(r, "status") or r.status >= 500]
    assert all(getattr(r, "status", 503) == 503 for r in refused)  # never a 500

    def drained():
        status = json.loads(w.platform.autoenroll("sync", "status").stdout)
        return status if status["depth"] == 0 else None

    eventually(drained, timeout=60, what="the outbox to drain on the replica")
    on_replica = records.all_ldap_values(w.replica.url)
    w.first.start()  # to read what it took before it died
    on_first = records.all_ldap_values(w.first.url)
    issued = records.certificates(w.platform, PROFILE)
    assert len(issued) == N
    for row in issued:
        where = on_first.get(row.email, []) + on_replica.get(row.email, [])
        assert row.der in where, row.email  # in the directory that took it
        assert set(where) == {row.der}  # and nothing else of ours beside it
    assert sum(1 for row in issued if row.der in on_replica.get(row.email, [])) >= N - killed[0] - 4
    print(f"\nfirst server killed after {killed[0]} of {N}; {len(refused)} requests refused meanwhile; "
          f"{sum(1 for r in issued if r.der in on_replica.get(r.email, []))} published on the replica")
