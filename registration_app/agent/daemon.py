"""`autoenroll-agent daemon`: keeps every user's certificates in the store fresh.

Each user folder is handled under an exclusive, non-blocking file lock, so two daemons on one
store never work on the same user at once; the server refuses a second renewal of the same serial
(`renews`), so even a daemon that lost its state cannot renew a certificate twice. Failures back off
exponentially (recorded in the folder's state, so restarts keep the schedule). SIGTERM stops the
loop between users.
"""

from __future__ import annotations

import fcntl
import logging
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone

from ..core.renewal import RenewalPolicy, is_due, retry_delay
from .actions import renew
from .client import AgentError, RegistrationClient
from .store import AgentStore, UserFolder

log = logging.getLogger("autoenroll.agent.daemon")


@contextmanager
def user_lock(folder: UserFolder):
    """Yield True when this process holds the user's lock, False when another one does."""
    fd = open(folder.path / ".lock", "a+")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        fd.close()


def _parse(text: str) -> datetime | None:
    try:
        value = datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def due_renewals(state: dict, now: datetime, policy: RenewalPolicy) -> list[tuple[str, str]]:
    """(profile, serial) of current certificates due now and not backing off: a pure function."""
    due = []
    for profile, serial in sorted(state.get("current", {}).items()):
        info = state.get("certificates", {}).get(serial, {})
        not_before, not_after = _parse(info.get("not_before", "")), _parse(info.get("not_after", ""))
        if not_before is None or not_after is None:
            continue
        retry_at = _parse(state.get("retry", {}).get(serial, {}).get("next", ""))
        if retry_at is not None and now < retry_at:
            continue
        if is_due(not_before, not_after, serial, now, policy):
            due.append((profile, serial))
    return due


class RenewalDaemon:
    def __init__(self, client: RegistrationClient, store: AgentStore, *, policy: RenewalPolicy = RenewalPolicy(),
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)) -> None:
        self.client, self.store, self.policy, self.clock = client, store, policy, clock
        self.stop = threading.Event()

    def run_once(self) -> dict[str, int]:
        counts = {"renewed": 0, "failed": 0, "skipped_locked": 0}
        for folder in self.store.users():
            if self.stop.is_set():
                break
            with user_lock(folder) as mine:
                if not mine:
                    counts["skipped_locked"] += 1
                    continue
                for profile, serial in due_renewals(folder.state(), self.clock(), self.policy):
                    self._renew(folder, profile, serial, counts)
        return counts

    def _renew(self, folder: UserFolder, profile: str, serial: str, counts: dict) -> None:
        try:
            outcome = renew(self.client, self.store, folder.email, profile)
        except AgentError as exc:
            state = folder.state()
            retry = state.setdefault("retry", {}).setdefault(serial, {"failures": 0})
            retry["failures"] += 1
            retry["next"] = (self.clock() + retry_delay(retry["failures"], self.policy)).isoformat()
            retry["error"] = str(exc)[:300]
            if exc.code == "conflict" and exc.body and exc.body.get("current"):
                # Someone else renewed it (another daemon, an operator): adopt nothing, stop retrying.
                state.setdefault("current", {}).pop(profile, None)
            folder.save_state(state)
            counts["failed"] += 1
            log.warning("event=renew.failed user=%s profile=%s serial=%s failures=%d error=%r",
                        folder.email, profile, serial, retry["failures"], str(exc))
            return
        state = folder.state()
        state.get("retry", {}).pop(serial, None)
        folder.save_state(state)
        counts["renewed"] += 1
        log.info("event=renew.done user=%s profile=%s old_serial=%s new_serial=%s not_after=%s",
                 folder.email, profile, serial, outcome.serial, outcome.not_after)

    def run_forever(self, interval: float = 300.0) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        log.info("event=daemon.start store=%s interval=%s", self.store.root, interval)
        while not self.stop.is_set():
            try:
                counts = self.run_once()
                log.info("event=daemon.pass %s", " ".join(f"{k}={v}" for k, v in counts.items()))
            except Exception:  # one bad pass must not end the daemon; the next one retries
                log.exception("event=daemon.pass_error")
            self.stop.wait(interval)
        log.info("event=daemon.stop")
