"""Unit tests for l4proxy.ratelimit: token bucket per identity, cleanup, concurrency cap.

Time is a plain float passed in as ``now``; nothing here sleeps.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.ratelimit import Limited, RateLimiter, Ticket, TokenBucket


def limiter(
    rate: float = 2.0,
    burst: int = 4,
    cleanup: float = 20.0,
    max_concurrent: int = 0,
    *,
    enabled: bool = True,
) -> RateLimiter:
    return RateLimiter(rate, burst, cleanup, max_concurrent, enabled=enabled)


def ticket(result: Ticket | Limited) -> Ticket:
    assert isinstance(result, Ticket), result
    return result


def admitted(result: Ticket | Limited) -> bool:
    if isinstance(result, Ticket):
        result.release()  # only the rate matters here, not the concurrency cap
        return True
    return False


# ---------------------------------------------------------------------------- the bucket


@pytest.mark.parametrize(("rate", "burst"), [(2.0, 4), (0.5, 1), (10.0, 3), (1.0, 20)])
def test_fresh_identity_gets_exactly_burst_then_rate_limited(rate: float, burst: int) -> None:
    rl = limiter(rate, burst)
    assert [admitted(rl.admit("client.a", 5.0)) for _ in range(burst)] == [True] * burst
    result = rl.admit("client.a", 5.0)
    assert isinstance(result, Limited)
    assert result.reason == "rate"
    assert result.retry_after == pytest.approx(1.0 / rate)


def test_refill_at_rate_per_second() -> None:
    rl = limiter(rate=2.0, burst=4)
    for _ in range(4):
        assert admitted(rl.admit("a", 0.0))
    assert not admitted(rl.admit("a", 0.0))
    assert not admitted(rl.admit("a", 0.25))  # half a token
    assert admitted(rl.admit("a", 0.5))  # one token after 0.5 s at 2/s
    assert not admitted(rl.admit("a", 0.5))
    assert admitted(rl.admit("a", 1.0))
    assert [admitted(rl.admit("a", 2.0)) for _ in range(3)] == [True, True, False]


def test_retry_after_counts_the_partial_token() -> None:
    rl = limiter(rate=2.0, burst=1)
    assert admitted(rl.admit("a", 10.0))
    result = rl.admit("a", 10.2)  # 0.4 of a token there, 0.6 missing at 2/s
    assert isinstance(result, Limited)
    assert result.retry_after == pytest.approx(0.3)


def test_refill_never_exceeds_burst() -> None:
    rl = limiter(rate=2.0, burst=3)
    assert admitted(rl.admit("a", 0.0))
    # a long pause fills the bucket to 3, not to 3 + 2 * 1000
    assert [admitted(rl.admit("a", 1000.0)) for _ in range(4)] == [True, True, True, False]


def test_time_going_backwards_grants_nothing() -> None:
    rl = limiter(rate=1.0, burst=1)
    assert admitted(rl.admit("a", 10.0))
    assert not admitted(rl.admit("a", 5.0))
    assert not admitted(rl.admit("a", 10.5))
    assert admitted(rl.admit("a", 11.0))


def test_identities_are_independent() -> None:
    rl = limiter(rate=1.0, burst=2)
    assert [admitted(rl.admit("client.a", 0.0)) for _ in range(3)] == [True, True, False]
    assert [admitted(rl.admit("client.b", 0.0)) for _ in range(3)] == [True, True, False]
    assert [admitted(rl.admit("client-a", 0.0)) for _ in range(2)] == [True, True]
    assert set(rl.buckets) == {"client.a", "client.b", "client-a"}


def test_token_bucket_full_and_take() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=2, now=3.0)
    assert (bucket.tokens, bucket.updated, bucket.last_used) == (2.0, 3.0, 3.0)
    assert bucket.retry_after() == 0.0
    assert bucket.take(3.0)
    assert bucket.take(3.0)
    assert not bucket.take(3.5)
    assert bucket.retry_after() == pytest.approx(0.5)


# ------------------------------------------------------------------------ the properties

rates = st.floats(min_value=0.05, max_value=50.0, allow_nan=False)
bursts = st.integers(min_value=1, max_value=20)


@settings(max_examples=200, deadline=None)
@given(
    rate=rates,
    burst=bursts,
    horizon=st.floats(min_value=0.0, max_value=100.0),
    fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=200),
)
def test_admitted_never_exceeds_burst_plus_rate_times_t(
    rate: float, burst: int, horizon: float, fractions: list[float]
) -> None:
    """Upper bound: for request times 0 <= t_1 <= ... <= t_k <= T,
    admitted <= burst + rate * T (+1e-9 float tolerance)."""
    times = sorted(f * horizon for f in fractions)
    rl = limiter(rate, burst)
    count = sum(admitted(rl.admit("x", t)) for t in times)
    assert count <= burst + rate * horizon + 1e-9
    # the same bound holds over the span actually used (the bucket is created at t_1)
    assert count <= burst + rate * (times[-1] - times[0]) + 1e-9


@settings(max_examples=200, deadline=None)
@given(
    rate=rates,
    burst=st.integers(min_value=2, max_value=20),
    gaps=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=200),
)
def test_frequent_requests_get_at_least_rate_times_t(
    rate: float, burst: int, gaps: list[float]
) -> None:
    """Lower bound, precisely: with burst >= 2, the first request at t=0, the last at T
    and every gap between consecutive requests <= 1/rate, the bucket never overflows
    (after any request it holds <= burst - 1 tokens and a gap adds <= 1), so
    admitted = burst + rate*T - (tokens left at T) >= rate*T + 1. We assert
    admitted >= floor(rate*T), leaving one token of slack for float rounding."""
    times = [0.0]
    for g in gaps:
        times.append(times[-1] + g / rate)
    horizon = times[-1]
    rl = limiter(rate, burst)
    count = sum(admitted(rl.admit("x", t)) for t in times)
    assert count >= math.floor(rate * horizon)
    assert count <= burst + rate * horizon + 1e-9


@settings(max_examples=300, deadline=None)
@given(
    rate=st.floats(min_value=0.05, max_value=5.0),
    burst=st.integers(min_value=1, max_value=6),
    cleanup=st.floats(min_value=0.01, max_value=5.0),
    events=st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=3.0)),
        ),
        max_size=60,
    ),
)
def test_cleanup_never_changes_an_admission_decision(
    rate: float, burst: int, cleanup: float, events: list[tuple[str, float]]
) -> None:
    """Forgetting a bucket must never hand out extra tokens: a limiter that cleans up
    before every request decides exactly like one that never cleans up."""
    keeping = limiter(rate, burst, cleanup)
    forgetting = limiter(rate, burst, cleanup)
    now = 0.0
    for identity, step in events:
        now += step
        forgetting.cleanup(now)
        assert admitted(keeping.admit(identity, now)) == admitted(forgetting.admit(identity, now))


# ------------------------------------------------------------------------------- cleanup


def test_cleanup_removes_only_after_the_interval() -> None:
    rl = limiter(rate=2.0, burst=4, cleanup=20.0)  # 2 * 20 >= 4: full again by t=20
    assert admitted(rl.admit("a", 0.0))
    assert rl.cleanup(19.9) == 0
    assert "a" in rl.buckets
    assert rl.cleanup(20.0) == 1
    assert "a" not in rl.buckets
    assert rl.cleanup(21.0) == 0


def test_cleanup_keeps_a_bucket_that_would_not_be_full_yet() -> None:
    rl = limiter(rate=0.01, burst=4, cleanup=20.0)
    assert [admitted(rl.admit("a", 0.0)) for _ in range(4)] == [True] * 4
    assert rl.cleanup(20.0) == 0  # 0 + 20 * 0.01 = 0.2 tokens, not 4
    assert "a" in rl.buckets
    # the client did not get a fresh, full bucket
    result = rl.admit("a", 20.0)
    assert isinstance(result, Limited)
    assert result.reason == "rate"
    assert rl.cleanup(500.0) == 1  # 0.2 + 480 * 0.01 >= 4: full by now, forget it


def test_cleanup_of_a_partly_used_bucket_waits_until_it_would_be_full() -> None:
    rl = limiter(rate=0.1, burst=4, cleanup=20.0)
    for _ in range(4):
        assert admitted(rl.admit("a", 0.0))
    assert rl.cleanup(30.0) == 0  # 3 tokens by t=30
    assert rl.cleanup(40.0) == 1  # 4 tokens by t=40


def test_cleanup_is_by_last_use_not_creation() -> None:
    rl = limiter(rate=2.0, burst=4, cleanup=20.0)
    assert admitted(rl.admit("a", 0.0))
    assert admitted(rl.admit("a", 15.0))
    assert rl.cleanup(25.0) == 0
    assert "a" in rl.buckets
    assert rl.cleanup(35.0) == 1


def test_a_rejected_attempt_also_counts_as_use() -> None:
    rl = limiter(rate=1.0, burst=1, cleanup=20.0)
    assert admitted(rl.admit("a", 0.0))
    assert not admitted(rl.admit("a", 0.0))
    assert not admitted(rl.admit("a", 0.5))
    assert rl.cleanup(20.0) == 0
    assert rl.cleanup(20.5) == 1


def test_cleanup_is_per_identity() -> None:
    rl = limiter(rate=2.0, burst=4, cleanup=20.0)
    assert admitted(rl.admit("old", 0.0))
    assert admitted(rl.admit("new", 10.0))
    assert rl.cleanup(20.0) == 1
    assert set(rl.buckets) == {"new"}


# ------------------------------------------------------------------------ max_concurrent


def test_max_concurrent_caps_open_tickets_per_identity() -> None:
    rl = limiter(rate=100.0, burst=100, max_concurrent=2)
    first = ticket(rl.admit("a", 0.0))
    second = ticket(rl.admit("a", 0.0))
    assert rl.open == {"a": 2}
    assert rl.admit("a", 0.0) == Limited("max_concurrent")
    assert rl.open == {"a": 2}
    other = ticket(rl.admit("b", 0.0))  # another identity has its own cap
    assert rl.open == {"a": 2, "b": 1}

    first.release()
    assert rl.open == {"a": 1, "b": 1}
    third = ticket(rl.admit("a", 0.0))  # the freed slot is usable
    assert rl.open == {"a": 2, "b": 1}

    first.release()  # a second release of the same ticket is harmless
    assert rl.open == {"a": 2, "b": 1}

    for t in (second, third, other):
        t.release()
    assert rl.open == {}
    third.release()
    assert rl.open == {}


def test_tickets_are_counted_without_a_cap() -> None:
    rl = limiter(rate=100.0, burst=100, max_concurrent=0)
    held = [ticket(rl.admit("a", 0.0)) for _ in range(50)]
    assert rl.open == {"a": 50}
    for t in held:
        t.release()
    assert rl.open == {}


def test_disabled_rate_limit_admits_any_rate_but_keeps_max_concurrent() -> None:
    rl = limiter(rate=0.001, burst=1, max_concurrent=3, enabled=False)
    for _ in range(1000):
        assert admitted(rl.admit("a", 0.0))
    held = [ticket(rl.admit("a", 0.0)) for _ in range(3)]
    assert rl.admit("a", 0.0) == Limited("max_concurrent")
    held.pop().release()
    assert isinstance(rl.admit("a", 0.0), Ticket)
    assert rl.buckets == {}


def test_disabled_without_cap_admits_everything() -> None:
    rl = limiter(rate=0.001, burst=1, enabled=False)
    held = [ticket(rl.admit("a", 0.0)) for _ in range(200)]
    assert rl.open == {"a": 200}
    for t in held:
        t.release()
    assert rl.open == {}


@settings(max_examples=100, deadline=None)
@given(
    cap=st.integers(0, 4),
    ops=st.lists(
        st.tuples(st.booleans(), st.sampled_from(["a", "b"]), st.integers(0, 10)), max_size=60
    ),
)
def test_open_counts_match_unreleased_tickets(cap: int, ops: list[tuple[bool, str, int]]) -> None:
    rl = limiter(rate=1000.0, burst=1000, max_concurrent=cap)
    tickets: list[Ticket] = []
    live: dict[int, str] = {}
    for do_admit, identity, which in ops:
        if do_admit:
            result = rl.admit(identity, 0.0)
            current = sum(1 for who in live.values() if who == identity)
            if cap and current >= cap:
                assert result == Limited("max_concurrent")
            else:
                live[len(tickets)] = identity
                tickets.append(ticket(result))
        elif tickets:
            index = which % len(tickets)
            tickets[index].release()
            live.pop(index, None)
        expected: dict[str, int] = {}
        for who in live.values():
            expected[who] = expected.get(who, 0) + 1
        assert rl.open == expected


# ------------------------------------------------------------------------ reconfigure


def test_reconfigure_keeps_tokens_but_never_above_the_new_burst() -> None:
    rl = RateLimiter(rate=1.0, burst=10, cleanup_interval=60.0)
    for _ in range(4):
        assert admitted(rl.admit("a", 0.0))
    assert rl.buckets["a"].tokens == 6.0
    rl.reconfigure(rate=1.0, burst=3, cleanup_interval=60.0)
    assert rl.buckets["a"].tokens == 3.0  # capped: a smaller burst takes effect at once
    assert [admitted(rl.admit("a", 0.0)) for _ in range(4)] == [True, True, True, False]


def test_reconfigure_to_a_larger_burst_grants_nothing_at_once() -> None:
    rl = RateLimiter(rate=1.0, burst=2, cleanup_interval=60.0)
    assert admitted(rl.admit("a", 0.0))
    assert admitted(rl.admit("a", 0.0))
    rl.reconfigure(rate=10.0, burst=100, cleanup_interval=60.0)
    assert not admitted(rl.admit("a", 0.0))  # still empty: no free tokens from a reload
    assert admitted(rl.admit("a", 0.1))  # refills at the new rate: 10/s * 0.1 s = 1 token


def test_reconfigure_keeps_open_tickets_and_applies_the_new_cap() -> None:
    rl = RateLimiter(rate=100.0, burst=100, cleanup_interval=60.0, max_concurrent=0)
    held = [ticket(rl.admit("a", 0.0)) for _ in range(3)]
    rl.reconfigure(rate=100.0, burst=100, cleanup_interval=60.0, max_concurrent=2)
    limited = rl.admit("a", 0.0)
    assert isinstance(limited, Limited)
    assert limited.reason == "max_concurrent"
    for t in held[:2]:
        t.release()
    assert rl.open == {"a": 1}
    ticket(rl.admit("a", 0.0)).release()
    held[2].release()
    assert rl.open == {}


def test_reconfigure_can_disable_and_enable_the_rate_limit() -> None:
    rl = RateLimiter(rate=1.0, burst=1, cleanup_interval=60.0)
    assert admitted(rl.admit("a", 0.0))
    assert not admitted(rl.admit("a", 0.0))
    rl.reconfigure(rate=1.0, burst=1, cleanup_interval=60.0, enabled=False)
    assert all(admitted(rl.admit("a", 0.0)) for _ in range(5))
    rl.reconfigure(rate=1.0, burst=1, cleanup_interval=60.0, enabled=True)
    assert not admitted(rl.admit("a", 0.0))
