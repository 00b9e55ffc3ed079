"""Unit tests for l4proxy.router: rate limit -> authz -> health -> balancer -> dial retry.

Every path must give back exactly the slots it took (pool.active, limiter.open).
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.balancer import Lease
from l4proxy.config import BALANCERS, BalancerName, Config, parse_config
from l4proxy.health import Health, Transition
from l4proxy.router import Admission, Rejected, Router

UPSTREAMS = ["127.0.0.1:8000", "127.0.0.1:8001", "127.0.0.1:8002"]


def router_config(
    *,
    balancer: BalancerName = "least_connections",
    rate: float = 100.0,
    burst: int = 100,
    max_concurrent: int = 0,
    enabled: bool = True,
    default: str = "allow",
    rules: list[dict[str, Any]] | None = None,
    rise: int = 1,
    fall: int = 1,
    upstreams: list[str] | None = None,
) -> Config:
    return parse_config(
        {
            "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
            "upstreams": upstreams or UPSTREAMS,
            "balancer": balancer,
            "health_check": {"rise": rise, "fall": fall},
            "rate_limit": {
                "enabled": enabled,
                "rate": rate,
                "burst": burst,
                "max_concurrent": max_concurrent,
            },
            "authorization": {"default": default, "rules": rules or []},
        },
        Path("/etc/layer4lab"),
    )


def make_router(*, seed: int = 0, **options: Any) -> Router:
    return Router(router_config(**options), random.Random(seed))


def admission(result: Admission | Rejected) -> Admission:
    assert isinstance(result, Admission), result
    return result


def assert_idle(router: Router) -> None:
    assert router.pool.active == [0] * len(router.pool.upstreams)
    assert router.limiter.open == {}


def down(router: Router, index: int) -> None:
    router.check_result(index, False, 0.0, "test")
    assert router.pool.health[index].state is Health.DOWN


# ------------------------------------------------------------------------- rate limiting


def test_rate_limited_connection_takes_no_upstream_slot() -> None:
    router = make_router(rate=1.0, burst=1)
    first = admission(router.admit("client.a", 0.0))
    assert router.pool.active == [1, 0, 0]
    assert router.limiter.open == {"client.a": 1}

    assert router.admit("client.a", 0.0) == Rejected("rate_limited", "rate")
    assert router.pool.active == [1, 0, 0]
    assert router.limiter.open == {"client.a": 1}

    first.release()
    assert_idle(router)


def test_rate_limit_comes_before_authorization() -> None:
    router = make_router(rate=1.0, burst=1, default="deny")
    assert router.admit("client.a", 0.0) == Rejected("denied", "no_allowed_upstream")
    # the denied attempt used the token: the next one is rate limited, not denied
    assert router.admit("client.a", 0.0) == Rejected("rate_limited", "rate")
    assert_idle(router)


def test_rate_limit_comes_before_health() -> None:
    router = make_router(rate=1.0, burst=1)
    for i in range(3):
        down(router, i)
    first = router.admit("client.a", 0.0)
    assert isinstance(first, Rejected)
    assert first.decision == "no_healthy_upstream"
    assert router.admit("client.a", 0.0) == Rejected("rate_limited", "rate")
    assert_idle(router)


def test_max_concurrent_is_a_rate_limited_decision() -> None:
    router = make_router(max_concurrent=1)
    held = admission(router.admit("client.a", 0.0))
    assert router.admit("client.a", 0.0) == Rejected("rate_limited", "max_concurrent")
    assert router.pool.active == [1, 0, 0]
    admission(router.admit("client.b", 0.0)).release()  # others are not affected
    held.release()
    assert_idle(router)


# -------------------------------------------------------------------- authz and health


def test_denied_when_authorization_leaves_nothing() -> None:
    router = make_router(
        default="deny", rules=[{"client": "client.b", "action": "allow", "upstream": "*"}]
    )
    assert router.admit("client.a", 0.0) == Rejected("denied", "no_allowed_upstream")
    assert_idle(router)
    admission(router.admit("client.b", 0.0)).release()
    assert_idle(router)


def test_denied_by_rules_covering_every_upstream() -> None:
    router = make_router(rules=[{"client": "client.c", "action": "deny", "upstream": UPSTREAMS}])
    assert router.admit("client.c", 0.0) == Rejected("denied", "no_allowed_upstream")
    assert_idle(router)


def test_no_healthy_upstream_when_every_allowed_upstream_is_down() -> None:
    router = make_router(
        rules=[{"client": "client.a", "action": "deny", "upstream": "127.0.0.1:8002"}]
    )
    down(router, 0)
    down(router, 1)
    result = router.admit("client.a", 0.0)
    assert isinstance(result, Rejected)
    assert result.decision == "no_healthy_upstream"
    assert result.decision != "denied"
    assert_idle(router)
    # upstream 2 is up, but client.a may not use it; client.b may
    b = admission(router.admit("client.b", 0.0))
    assert b.lease.index == 2
    b.release()
    assert_idle(router)


def test_denied_and_no_healthy_are_different_decisions() -> None:
    router = make_router(rules=[{"client": "client.a", "action": "deny", "upstream": "*"}])
    for i in range(3):
        down(router, i)
    denied = router.admit("client.a", 0.0)
    unhealthy = router.admit("client.b", 0.0)
    assert isinstance(denied, Rejected)
    assert isinstance(unhealthy, Rejected)
    assert denied.decision == "denied"
    assert unhealthy.decision == "no_healthy_upstream"


def test_admission_only_uses_allowed_upstreams() -> None:
    router = make_router(
        rules=[{"client": "client.a", "action": "deny", "upstream": "127.0.0.1:8000"}]
    )
    held = [admission(router.admit("client.a", 0.0)) for _ in range(6)]
    assert {a.lease.index for a in held} == {1, 2}
    assert all(a.allowed == (1, 2) for a in held)
    assert router.pool.active == [0, 3, 3]
    for a in held:
        a.release()
    assert_idle(router)


# ---------------------------------------------------------------------------- dial retry


def test_dial_failed_marks_down_releases_and_picks_another() -> None:
    router = make_router()
    adm = admission(router.admit("client.a", 0.0))
    first = adm.lease.index
    assert router.pool.active[first] == 1

    transition, retry = router.dial_failed(adm, 1.5, "connection refused")

    assert transition == Transition(
        Health.UNKNOWN, Health.DOWN, "dial failed: connection refused", 1.5
    )
    assert router.pool.health[first].state is Health.DOWN
    assert isinstance(retry, Lease)
    assert retry.index != first
    assert adm.lease is retry
    assert adm.tried == [UPSTREAMS[first], UPSTREAMS[retry.index]]
    assert router.pool.active[first] == 0
    assert router.pool.active[retry.index] == 1
    assert sum(router.pool.active) == 1
    assert router.limiter.open == {"client.a": 1}

    adm.release()
    assert_idle(router)


def test_dial_failed_on_every_upstream_returns_everything() -> None:
    router = make_router()
    adm = admission(router.admit("client.a", 0.0))
    seen = [adm.lease.index]
    for attempt in (1, 2):
        transition, retry = router.dial_failed(adm, float(attempt), "timeout")
        assert transition == Transition(
            Health.UNKNOWN, Health.DOWN, "dial failed: timeout", float(attempt)
        )
        assert isinstance(retry, Lease)
        seen.append(retry.index)
    transition, final = router.dial_failed(adm, 3.0, "timeout")
    assert transition == Transition(Health.UNKNOWN, Health.DOWN, "dial failed: timeout", 3.0)
    assert isinstance(final, Rejected)
    assert final.decision == "dial_failed"
    assert "timeout" in final.reason
    assert sorted(seen) == [0, 1, 2]
    assert_idle(router)

    adm.release()  # releasing after the rejection is harmless
    assert_idle(router)


def test_dial_failed_only_retries_allowed_upstreams() -> None:
    router = make_router(
        rules=[{"client": "client.a", "action": "deny", "upstream": "127.0.0.1:8001"}]
    )
    adm = admission(router.admit("client.a", 0.0))
    _, retry = router.dial_failed(adm, 1.0, "refused")
    assert isinstance(retry, Lease)
    assert {adm.tried[0], retry.upstream.key} == {UPSTREAMS[0], UPSTREAMS[2]}
    _, final = router.dial_failed(adm, 2.0, "refused")
    assert isinstance(final, Rejected)
    assert final.decision == "dial_failed"
    assert router.pool.health[1].state is Health.UNKNOWN  # never tried, never marked
    assert_idle(router)


@pytest.mark.parametrize("balancer", BALANCERS)
def test_dial_retry_skips_tried_upstreams_even_if_they_recovered(balancer: BalancerName) -> None:
    router = make_router(balancer=balancer)
    adm = admission(router.admit("client.a", 0.0))
    _, retry = router.dial_failed(adm, 1.0, "refused")
    assert isinstance(retry, Lease)
    _, retry2 = router.dial_failed(adm, 2.0, "refused")
    assert isinstance(retry2, Lease)
    first, second, third = (UPSTREAMS.index(key) for key in adm.tried)
    assert sorted(adm.tried) == UPSTREAMS
    # the first two come back (active checks pass) while the third dial is going on
    router.check_result(first, True, 2.5, "ok")
    router.check_result(second, True, 2.5, "ok")
    assert router.pool.health[second].state is Health.UP
    _, final = router.dial_failed(adm, 3.0, "refused")
    assert isinstance(final, Rejected)  # not a fourth attempt on an upstream already tried
    assert final.decision == "dial_failed"
    assert adm.tried == [UPSTREAMS[i] for i in (first, second, third)]
    assert_idle(router)


def test_dial_failed_on_an_already_down_upstream_has_no_transition() -> None:
    router = make_router(balancer="round_robin")
    adm1 = admission(router.admit("client.a", 0.0))
    adm2 = admission(router.admit("client.b", 0.0))
    adm2_first = adm2.lease.index
    transition, _ = router.dial_failed(adm1, 1.0, "refused")
    assert transition == Transition(Health.UNKNOWN, Health.DOWN, "dial failed: refused", 1.0)
    # adm2's upstream goes down (say, a health check) before adm2's dial fails too
    router.pool.health[adm2_first].mark_down(1.0, "also down")
    transition2, retry = router.dial_failed(adm2, 2.0, "refused")
    assert transition2 is None
    assert isinstance(retry, Lease)
    adm1.release()
    adm2.release()
    assert_idle(router)


def test_admission_release_twice_is_harmless() -> None:
    router = make_router(max_concurrent=5)
    one = admission(router.admit("client.a", 0.0))
    two = admission(router.admit("client.a", 0.0))
    one.release()
    one.release()
    assert sum(router.pool.active) == 1
    assert router.limiter.open == {"client.a": 1}
    assert router.pool.active[two.lease.index] == 1
    two.release()
    assert_idle(router)


def test_no_healthy_upstream_after_a_dial_failure_marks_the_last_one_down() -> None:
    router = make_router()
    down(router, 1)
    down(router, 2)
    adm = admission(router.admit("client.a", 0.0))
    assert adm.lease.index == 0
    transition, final = router.dial_failed(adm, 1.0, "reset")
    assert transition == Transition(Health.UNKNOWN, Health.DOWN, "dial failed: reset", 1.0)
    assert isinstance(final, Rejected)
    assert final.decision == "dial_failed"
    assert_idle(router)
    assert router.admit("client.a", 2.0) == Rejected(
        "no_healthy_upstream", "all 3 allowed upstreams are down"
    )
    assert_idle(router)


# -------------------------------------------------------------------------- the property

IDENTITIES = ["client.a", "client.b", "client.c"]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("admit"), st.sampled_from(IDENTITIES), st.floats(0.0, 2.0)),
        st.tuples(st.just("dial_failed"), st.integers(0, 30), st.floats(0.0, 2.0)),
        st.tuples(st.just("release"), st.integers(0, 30), st.just(0.0)),
        st.tuples(st.just("check"), st.tuples(st.integers(0, 2), st.booleans()), st.just(0.5)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(
    balancer=st.sampled_from(BALANCERS),
    rate=st.sampled_from([0.5, 2.0, 100.0]),
    burst=st.integers(1, 4),
    max_concurrent=st.integers(0, 3),
    rise=st.integers(1, 2),
    fall=st.integers(1, 2),
    seed=st.integers(0, 1000),
    steps=ops,
)
def test_no_counter_drift_on_any_path(
    balancer: BalancerName,
    rate: float,
    burst: int,
    max_concurrent: int,
    rise: int,
    fall: int,
    seed: int,
    steps: list[tuple[str, Any, float]],
) -> None:
    router = make_router(
        balancer=balancer,
        rate=rate,
        burst=burst,
        max_concurrent=max_concurrent,
        rise=rise,
        fall=fall,
        seed=seed,
        rules=[
            {"client": "client.a", "action": "deny", "upstream": "127.0.0.1:8000"},
            {"client": "client.c", "action": "deny", "upstream": UPSTREAMS[:2]},
        ],
    )
    now = 0.0
    live: list[Admission] = []
    tried: dict[int, list[int]] = {}  # id(admission) -> upstreams it was given, in order
    finished: list[Admission] = []
    for op, arg, dt in steps:
        now += dt
        if op == "admit":
            result = router.admit(arg, now)
            if isinstance(result, Admission):
                assert result.lease.index in result.allowed
                live.append(result)
                tried[id(result)] = [result.lease.index]
        elif op == "dial_failed" and live:
            adm = live[arg % len(live)]
            _, outcome = router.dial_failed(adm, now, "refused")
            if isinstance(outcome, Rejected):
                assert outcome.decision == "dial_failed"
                live.remove(adm)
                finished.append(adm)
            else:
                assert outcome.index in adm.allowed
                assert outcome.index not in tried[id(adm)]
                assert router.pool.health[outcome.index].state is not Health.DOWN
                tried[id(adm)].append(outcome.index)
        elif op == "release" and live:
            adm = live.pop(arg % len(live))
            adm.release()
            finished.append(adm)
        elif op == "check":
            index, ok = arg
            router.check_result(index, ok, now, "check")

        # at every step the counters equal what the live admissions hold
        per_upstream = Counter(a.lease.index for a in live)
        assert router.pool.active == [per_upstream[i] for i in range(3)]
        assert router.limiter.open == dict(Counter(a.identity for a in live))

    for adm in live + finished:  # release everything, some of it twice
        adm.release()
    assert_idle(router)


@pytest.mark.parametrize("balancer", BALANCERS)
def test_every_balancer_retries_and_drains(balancer: BalancerName) -> None:
    router = make_router(balancer=balancer, seed=3)
    held = [admission(router.admit(f"client-{i}", 0.0)) for i in range(9)]
    first = [adm.lease.index for adm in held[:3]]
    assert sorted(first) == [0, 1, 2]  # with this seed, whatever the balancer
    outcomes = []
    for adm in held[:3]:
        transition, outcome = router.dial_failed(adm, 1.0, "refused")
        assert transition == Transition(Health.UNKNOWN, Health.DOWN, "dial failed: refused", 1.0)
        outcomes.append(outcome)
    # The first retry goes to either upstream still up (the balancer's choice); the
    # second to the only one left; the third finds every upstream down.
    retry, last, final = outcomes
    assert isinstance(retry, Lease)
    assert retry.index in {first[1], first[2]}
    assert isinstance(last, Lease)
    assert last.index == first[2]
    assert final == Rejected("dial_failed", "refused (after 1 attempt(s))")
    assert sum(router.pool.active) == 8  # 9 held, 1 refused
    assert router.limiter.open == {f"client-{i}": 1 for i in range(9) if i != 2}
    for adm in held:
        adm.release()
    assert_idle(router)


# ------------------------------------------------------------------------ reload


def test_reload_applies_new_rules_to_new_admissions_only() -> None:
    router = make_router()
    before = admission(router.admit("client.a", 0.0))
    router.reconfigure(router_config(default="deny"))
    denied = router.admit("client.a", 0.0)
    assert isinstance(denied, Rejected)
    assert denied.decision == "denied"
    assert router.pool.active[before.lease.index] == 1  # the open one keeps its slot
    before.release()
    assert_idle(router)


def test_reload_keeps_token_buckets_so_a_reload_is_no_way_around_the_rate_limit() -> None:
    router = make_router(rate=1.0, burst=2)
    for _ in range(2):
        admission(router.admit("client.a", 0.0)).release()
    router.reconfigure(router_config(rate=1.0, burst=2))
    limited = router.admit("client.a", 0.0)
    assert isinstance(limited, Rejected)
    assert limited.decision == "rate_limited"


def test_reload_removing_an_upstream_retires_it_and_its_connections_release_cleanly() -> None:
    router = make_router()
    held = [admission(router.admit(f"c{i}", 0.0)) for i in range(3)]
    assert sorted(a.lease.index for a in held) == [0, 1, 2]
    router.reconfigure(router_config(upstreams=UPSTREAMS[1:]))
    assert router.pool.retired == {UPSTREAMS[0]: 1}
    new = [admission(router.admit(f"n{i}", 0.0)) for i in range(4)]
    assert all(a.lease.upstream.key != UPSTREAMS[0] for a in new)
    for a in held + new:
        a.release()
    assert_idle(router)
    assert router.pool.retired == {}


def test_dial_retry_after_a_reload_follows_the_new_rules_and_upstream_list() -> None:
    router = make_router()
    adm = admission(router.admit("client.a", 0.0))
    first = adm.lease.upstream.key
    others = [key for key in UPSTREAMS if key != first]
    # The reload removes one of the others and denies client.a the last one.
    _removed, denied = others
    rules = [{"client": "client.a", "action": "deny", "upstream": denied}]
    router.reconfigure(router_config(upstreams=[first, denied], rules=rules))
    transition, outcome = router.dial_failed(adm, 1.0, "refused")
    # The failed upstream is still in the pool: marked down.
    assert transition == Transition(Health.UNKNOWN, Health.DOWN, "dial failed: refused", 1.0)
    assert [m.state for m in router.pool.health] == [Health.DOWN, Health.UNKNOWN]
    assert isinstance(outcome, Rejected)  # removed is gone, denied is denied, first was tried
    assert outcome.decision == "dial_failed"
    assert_idle(router)


def test_dial_failure_on_a_removed_upstream_marks_nothing_and_retries_elsewhere() -> None:
    router = make_router()
    adm = admission(router.admit("client.a", 0.0))
    gone = adm.lease.upstream.key
    router.reconfigure(router_config(upstreams=[k for k in UPSTREAMS if k != gone]))
    transition, outcome = router.dial_failed(adm, 1.0, "refused")
    assert transition is None
    assert isinstance(outcome, Lease)
    assert outcome.upstream.key != gone
    assert router.pool.retired == {}
    adm.release()
    assert_idle(router)
