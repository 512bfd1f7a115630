"""Key generation, with a small pool of pre-generated RSA keys.

RSA keys are slow to generate (PERFORMANCE.md); a background thread keeps up to `size` keys per RSA type
ready so that a request does not pay for it. EC P-256 keys are cheap and always generated inline.

Forking (gunicorn workers): a thread does not survive `fork()`, and keys inherited from the parent would be
handed out by every child — the same private key to several users. So the pool is started lazily, by the
first `take()` in the process that uses it, and on a change of process id (checked in `take()`, and
registered with `os.register_at_fork` for the child) it throws the inherited keys away, makes new locks and
starts its own thread. Starting the pool in the gunicorn master is harmless but wasted work.

Refilling waits for a lull: no key is generated until `refill_pause` seconds after the last `take()`.
Generating in the background costs the same CPU as generating inline, but during a burst it competed
with the requests the pool was meant to speed up (PERFORMANCE.md). Under sustained load the pool runs dry and requests generate inline,
which is no slower than before; the pool fills again as soon as the load pauses.
"""

from __future__ import annotations

import collections
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..core.model import KeyType

_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072}


def generate_private_key(key_type: KeyType):
    """A fresh private key of `key_type`, from the OpenSSL CSPRNG."""
    key_type = KeyType(key_type)
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS[key_type])


class KeyPool:
    """Pre-generated RSA keys per key type; `take()` never hands out the same key twice."""

    def __init__(
        self,
        size: int = 4,
        key_types: Iterable[KeyType] = (KeyType.RSA_2048, KeyType.RSA_3072),
        generate: Callable[[KeyType], object] = generate_private_key,
        refill_pause: float = 0.5,
    ) -> None:
        if size < 0:
            raise ValueError("size must be >= 0")
        self.size = size
        self.refill_pause = refill_pause
        self._types = tuple(KeyType(t) for t in key_types if KeyType(t).is_rsa)
        self._generate = generate
        self._reset()
        _pools.add(self)

    def _reset(self) -> None:
        """Fresh state for this process: inherited keys and locks are dropped, not reused."""
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._keys: dict[KeyType, collections.deque] = {t: collections.deque() for t in self._types}
        self._thread: threading.Thread | None = None
        self._stop_event: threading.Event | None = None
        self._stopped = False  # stop() was called: take() no longer restarts the filler
        self._last_take = float("-inf")  # monotonic time of the last take(): refills wait for a lull
        self._counts = {"hits": 0, "misses": 0, "generated": 0, "errors": 0}

    # --- public surface --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the filler thread (idempotent). `take()` calls it, so calling it is optional."""
        self._check_fork()
        if self.size == 0 or not self._types:
            return
        with self._cond:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopped = False
            self._stop_event = threading.Event()
            self._thread = threading.Thread(
                target=self._fill, args=(self._stop_event,), name="autoenroll-keypool", daemon=True
            )
            self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop the filler thread; keys already generated stay available to `take()`."""
        with self._cond:
            self._stopped = True
            if self._stop_event is not None:
                self._stop_event.set()
            thread, self._thread, self._stop_event = self._thread, None, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def take(self, key_type: KeyType):
        """A private key of `key_type`: from the pool when one is ready, otherwise generated now."""
        key_type = KeyType(key_type)
        self._check_fork()
        if key_type in self._keys and self.size > 0:
            with self._cond:
                started = self._thread is not None or self._stopped
                queue = self._keys[key_type]
                key = queue.popleft() if queue else None
                self._counts["hits" if key is not None else "misses"] += 1
                self._last_take = time.monotonic()
                self._cond.notify_all()  # the filler refills what was taken
            if not started:
                self.start()
            if key is not None:
                return key
        return self._generate(key_type)

    def stats(self) -> dict:
        with self._cond:
            return {
                "size": self.size,
                "available": {t.value: len(q) for t, q in self._keys.items()},
                "running": self._thread is not None and self._thread.is_alive(),
                **self._counts,
            }

    # --- internals --------------------------------------------------------------------------------

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            self._reset()

    def _next_type(self) -> KeyType | None:
        """The RSA type with the fewest ready keys, if any is below `size` (caller holds the lock)."""
        short = [t for t in self._types if len(self._keys[t]) < self.size]
        return min(short, key=lambda t: len(self._keys[t])) if short else None

    def _fill(self, stop: threading.Event) -> None:
        cond, keys = self._cond, self._keys  # this process's state: a fork replaces both
        _yield_the_cpu()
        while True:
            with cond:
                while True:
                    if stop.is_set() or keys is not self._keys:
                        return
                    key_type = self._next_type()
                    if key_type is None:
                        cond.wait()
                        continue
                    lull_in = self._last_take + self.refill_pause - time.monotonic()
                    if lull_in <= 0:
                        break
                    cond.wait(lull_in)  # a take() wakes us and the pause starts again
            try:
                key = self._generate(key_type)  # outside the lock: takers are never blocked by it
            except Exception:  # noqa: BLE001 - a failed generation must not kill the filler
                with cond:
                    self._counts["errors"] += 1
                    cond.wait(1.0)
                continue
            with cond:
                if stop.is_set() or keys is not self._keys:
                    return
                keys[key_type].append(key)
                self._counts["generated"] += 1


def _yield_the_cpu() -> None:
    """The filler runs at the lowest CPU priority (Linux: nice applies per thread), so that on a busy machine
    the requests of its worker, above all the first ones after a start when every worker fills its pool
    at once, never queue behind key generation for a core. The pool is a cache: it may fill slowly."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not permitted: the filler still works
        pass


_pools: weakref.WeakSet[KeyPool] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for pool in list(_pools):
        pool._reset()


os.register_at_fork(after_in_child=_after_fork_in_child)
