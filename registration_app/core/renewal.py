"""When to renew: pure functions of (certificate dates, now, settings), tested without I/O."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timedelta

from .retry import backoff_delay


@dataclass(frozen=True)
class RenewalPolicy:
    fraction: float = 2 / 3  # renew after this share of the lifetime has passed
    jitter: float = 0.05  # spread over this extra share of the lifetime, so fleets do not stampede
    retry_base: timedelta = timedelta(minutes=1)
    retry_max: timedelta = timedelta(hours=6)


def renewal_time(not_before: datetime, not_after: datetime, serial: str,
                 policy: RenewalPolicy = RenewalPolicy()) -> datetime:
    """The moment this certificate is due. The jitter is derived from the serial, so every
    daemon (and every restart) computes the same moment for the same certificate."""
    life = not_after - not_before
    spread = int.from_bytes(hashlib.sha256(serial.encode()).digest()[:8], "big") / 2**64
    return not_before + life * policy.fraction + life * policy.jitter * spread


def is_due(not_before: datetime, not_after: datetime, serial: str, now: datetime,
           policy: RenewalPolicy = RenewalPolicy()) -> bool:
    return now >= renewal_time(not_before, not_after, serial, policy) and now < not_after


def retry_delay(failures: int, policy: RenewalPolicy = RenewalPolicy()) -> timedelta:
    """Exponential back-off after `failures` consecutive failures (1 → base)."""
    return timedelta(seconds=backoff_delay(failures, base=policy.retry_base.total_seconds(),
                                           cap=policy.retry_max.total_seconds()))


def server_window_opens(not_before: datetime, not_after: datetime, window_days: int) -> datetime:
    """The server accepts a renewal without `replace` from this moment: the larger of the profile's
    window and the last third of the lifetime, so a daemon renewing at 2/3 is always inside it."""
    window = max(timedelta(days=window_days), (not_after - not_before) / 3)
    return not_after - window
