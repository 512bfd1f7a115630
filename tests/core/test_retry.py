import random

from registration_app.core.retry import backoff_delay


def test_backoff_doubles_from_the_base_up_to_the_cap():
    assert backoff_delay(0, base=2.0, cap=300.0) == 0.0
    assert [backoff_delay(n, base=2.0, cap=300.0) for n in range(1, 10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300]
    assert backoff_delay(10_000, base=2.0, cap=300.0) == 300.0  # no overflow after a very long outage


def test_jitter_spreads_the_capped_delay_by_the_rng():
    class Fixed:
        def __init__(self, value):
            self.value, self.asked = value, []

        def uniform(self, low, high):
            self.asked.append((low, high))
            return self.value

    low = Fixed(0.5)
    assert backoff_delay(20, base=2.0, cap=300.0, jitter=0.5, rng=low) == 150.0
    assert low.asked == [(0.5, 1.5)]
    assert backoff_delay(3, base=2.0, cap=300.0, jitter=0.5, rng=Fixed(1.5)) == 12.0
    spread = {backoff_delay(3, base=2.0, cap=300.0, jitter=0.5, rng=random.Random(seed)) for seed in range(50)}
    assert len(spread) == 50 and all(4.0 <= d <= 12.0 for d in spread)
