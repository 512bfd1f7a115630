"""The one back-off rule: how long to wait before the next try of something that failed.

Pure (the random source is a parameter), so the outbox worker, the renewal daemon and the database's
busy retries share it and a test can pin it down without waiting.
"""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, *, base: float, cap: float, jitter: float = 0.0, rng=random) -> float:
    """Seconds to wait after `attempt` consecutive failures (1 → `base`): doubling, at most `cap`, then
    spread by a factor drawn uniformly from [1 - jitter, 1 + jitter] so that many waiters do not retry
    in step. No failure yet: no wait."""
    if attempt <= 0:
        return 0.0
    delay = min(cap, base * 2.0 ** min(attempt - 1, 64))
    if jitter:
        delay *= rng.uniform(1.0 - jitter, 1.0 + jitter)
    return delay
