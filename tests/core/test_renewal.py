from datetime import datetime, timedelta, timezone

from registration_app.agent.daemon import due_renewals
from registration_app.core.renewal import (RenewalPolicy, is_due, renewal_time, retry_delay,
                                           server_window_opens)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
YEAR = timedelta(days=365)


def test_renewal_is_due_at_two_thirds_of_life_plus_a_stable_jitter():
    at = renewal_time(T0, T0 + YEAR, "abc")
    assert T0 + YEAR * 2 / 3 <= at <= T0 + YEAR * (2 / 3 + 0.05)
    assert at == renewal_time(T0, T0 + YEAR, "abc")  # same moment for every daemon and restart
    assert renewal_time(T0, T0 + YEAR, "abd") != at  # but fleets are spread out
    assert not is_due(T0, T0 + YEAR, "abc", at - timedelta(seconds=1))
    assert is_due(T0, T0 + YEAR, "abc", at)
    assert not is_due(T0, T0 + YEAR, "abc", T0 + YEAR)  # expired: too late, bootstrap again


def test_no_jitter_policy_is_exact():
    policy = RenewalPolicy(fraction=0.5, jitter=0)
    assert renewal_time(T0, T0 + timedelta(days=10), "x", policy) == T0 + timedelta(days=5)


def test_retry_backs_off_exponentially_up_to_a_cap():
    assert retry_delay(0) == timedelta(0)
    assert [retry_delay(n).total_seconds() for n in (1, 2, 3)] == [60, 120, 240]
    assert retry_delay(50) == RenewalPolicy().retry_max


def test_server_window_contains_the_daemons_moment():
    for days in (1, 30, 365, 825):
        life = timedelta(days=days)
        assert server_window_opens(T0, T0 + life, 60) <= renewal_time(T0, T0 + life, "s")


def test_due_renewals_reads_state_and_respects_back_off():
    state = {"current": {"p": "aa"},
             "certificates": {"aa": {"not_before": T0.isoformat(), "not_after": (T0 + YEAR).isoformat()}}}
    late = T0 + YEAR * 0.9
    assert due_renewals(state, T0 + YEAR / 2, RenewalPolicy()) == []
    assert due_renewals(state, late, RenewalPolicy()) == [("p", "aa")]
    state["retry"] = {"aa": {"failures": 1, "next": (late + timedelta(minutes=1)).isoformat()}}
    assert due_renewals(state, late, RenewalPolicy()) == []
    assert due_renewals({"current": {"p": "zz"}, "certificates": {}}, late, RenewalPolicy()) == []
