"""Key generation and the RSA key pool: no key is ever handed out twice, across threads or a fork."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from bench.platform import eventually
from registration_app.authorities.keys import KeyPool, generate_private_key
from registration_app.core.model import KeyType


def wait_for(predicate, timeout=10.0):
    eventually(predicate, timeout=timeout, step=0.005, what="the key pool")


class FakeGenerator:
    """Unique, cheap stand-ins for keys; records which process made each one."""

    def __init__(self):
        self._counter = itertools.count()
        self.lock = threading.Lock()

    def __call__(self, key_type):
        with self.lock:
            return (key_type, os.getpid(), next(self._counter))


@pytest.mark.parametrize("key_type,cls,bits", [
    (KeyType.EC_P256, ec.EllipticCurvePrivateKey, 256),
    (KeyType.RSA_2048, rsa.RSAPrivateKey, 2048),
    (KeyType.RSA_3072, rsa.RSAPrivateKey, 3072),
])
def test_generate_private_key(key_type, cls, bits):
    key = generate_private_key(key_type)
    assert isinstance(key, cls) and key.key_size == bits
    if key_type.is_rsa:
        assert key.public_key().public_numbers().e == 65537
    else:
        assert isinstance(key.curve, ec.SECP256R1)
    assert generate_private_key(key_type.value).key_size == bits  # the profile's string value works too


def test_pool_fills_in_the_background_and_serves_from_it():
    gen = FakeGenerator()
    pool = KeyPool(size=3, generate=gen)
    assert pool.stats()["running"] is False  # lazy: nothing happens until the first take
    first = pool.take(KeyType.RSA_2048)  # a miss: generated inline, and the filler starts
    try:
        wait_for(lambda: pool.stats()["available"] == {"rsa-2048": 3, "rsa-3072": 3})
        stats = pool.stats()
        assert stats["running"] and stats["misses"] == 1 and stats["hits"] == 0
        taken = pool.take(KeyType.RSA_3072)
        assert taken[0] is KeyType.RSA_3072 and pool.stats()["hits"] == 1
        wait_for(lambda: pool.stats()["available"]["rsa-3072"] == 3)  # refilled after the take
        assert first != taken
    finally:
        pool.stop()
    assert pool.stats()["running"] is False
    assert pool.take(KeyType.RSA_2048)[0] is KeyType.RSA_2048  # pooled keys still served after stop
    assert pool.stats()["running"] is False  # and stop() is not undone by take()


def test_ec_keys_are_always_generated_inline():
    gen = FakeGenerator()
    pool = KeyPool(size=2, generate=gen)
    key = pool.take(KeyType.EC_P256)
    assert key[0] is KeyType.EC_P256
    assert pool.stats()["running"] is False and pool.stats()["misses"] == 0


def test_size_zero_disables_the_pool():
    pool = KeyPool(size=0)
    key = pool.take(KeyType.RSA_2048)
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    assert pool.stats()["running"] is False and pool.stats()["available"] == {"rsa-2048": 0, "rsa-3072": 0}


def test_no_key_is_handed_out_twice_across_threads():
    gen = FakeGenerator()
    pool = KeyPool(size=4, generate=gen)
    pool.start()
    results: list = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker():
        barrier.wait()
        mine = [pool.take(KeyType.RSA_2048 if i % 2 else KeyType.RSA_3072) for i in range(200)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.stop()
    assert len(results) == 1600 and len(set(results)) == 1600
    stats = pool.stats()
    assert stats["hits"] + stats["misses"] == 1600


def test_real_rsa_keys_from_the_pool_are_distinct():
    pool = KeyPool(size=2, key_types=[KeyType.RSA_2048])
    pool.start()
    try:
        wait_for(lambda: pool.stats()["available"]["rsa-2048"] == 2, timeout=30)
        keys = [pool.take(KeyType.RSA_2048) for _ in range(4)]
    finally:
        pool.stop()
    moduli = {k.public_key().public_numbers().n for k in keys}
    assert len(moduli) == 4 and pool.stats()["hits"] >= 2


def test_a_forked_child_never_uses_the_parents_keys():
    gen = FakeGenerator()
    pool = KeyPool(size=3, generate=gen)
    pool.start()
    wait_for(lambda: pool.stats()["available"]["rsa-2048"] == 3)
    parent_pid = os.getpid()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report what it gets, and leave without running pytest's teardown
        try:
            stats = pool.stats()
            key = pool.take(KeyType.RSA_2048)
            ok = stats["available"]["rsa-2048"] == 0 and key[1] == os.getpid() != parent_pid
            wait_for(lambda: pool.stats()["running"], timeout=5)
            os.write(write_fd, b"ok" if ok else repr((stats, key)).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    report = os.read(read_fd, 4096)
    os.close(read_fd)
    pool.stop()
    assert status == 0 and report == b"ok", report
    assert pool.take(KeyType.RSA_2048)[1] == parent_pid  # the parent's pool is unchanged


def test_a_changed_pid_is_detected_without_the_fork_hook():
    gen = FakeGenerator()
    pool = KeyPool(size=2, generate=gen)
    pool.start()
    wait_for(lambda: pool.stats()["available"]["rsa-2048"] == 2)
    pool.stop()
    inherited = set(pool._keys[KeyType.RSA_2048])
    pool._pid = -1  # as if this object had been copied into another process
    key = pool.take(KeyType.RSA_2048)
    try:
        assert key not in inherited
    finally:
        pool.stop()


def test_the_filler_runs_at_the_lowest_cpu_priority_so_requests_go_first():
    """After a start every worker fills its pool at once; on a busy machine the first requests must not
    wait behind that for a core (Linux: nice is per thread, read from /proc)."""
    started = threading.Event()
    pool = KeyPool(size=1, key_types=[KeyType.RSA_2048],
                   generate=lambda t: (started.set(), time.sleep(0.05), generate_private_key(KeyType.EC_P256))[2])
    pool.start()
    try:
        assert started.wait(10)
        stat = Path(f"/proc/{os.getpid()}/task/{pool._thread.native_id}/stat").read_text()
        assert int(stat.rsplit(")", 1)[1].split()[16]) == 19
    finally:
        pool.stop()
