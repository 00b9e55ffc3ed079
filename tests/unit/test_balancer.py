"""Unit tests for l4proxy.balancer: the upstream pool, its leases and the four strategies."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from l4proxy.balancer import (
    ConsistentHash,
    Lease,
    LeastConnections,
    NoUpstream,
    Rotation,
    UpstreamPool,
    make_strategy,
)
from l4proxy.config import BALANCERS, Address, BalancerName, Upstream
from l4proxy.health import Health


def upstreams(n: int) -> tuple[Upstream, ...]:
    return tuple(Upstream(Address("127.0.0.1", 8000 + i), f"u{i}") for i in range(n))


def make_pool(
    name: BalancerName, n: int, *, seed: int = 0, rise: int = 1, fall: int = 1
) -> UpstreamPool:
    ups = upstreams(n)
    return UpstreamPool(ups, make_strategy(name, ups, random.Random(seed)), rise=rise, fall=fall)


def lease(result: Lease | NoUpstream) -> Lease:
    assert isinstance(result, Lease), result
    return result


def pick_index(pool: UpstreamPool, allowed: Sequence[int], key: str = "k") -> int:
    """Pick, note the index, give the slot straight back."""
    got = lease(pool.pick(allowed, key))
    got.release()
    return got.index


def set_down(pool: UpstreamPool, index: int) -> None:
    pool.health[index].mark_down(0.0, "test")
    assert pool.health[index].state is Health.DOWN


def set_up(pool: UpstreamPool, index: int) -> None:
    pool.health[index].observe(True, 0.0)
    assert pool.health[index].state is Health.UP


ALL4 = (0, 1, 2, 3)


# --------------------------------------------------------------------- least_connections


@pytest.mark.parametrize(
    ("load", "expected"),
    [([3, 1, 2, 5], 1), ([0, 1, 1, 1], 0), ([4, 4, 4, 0], 3), ([2, 9, 1, 7], 2)],
)
def test_least_connections_picks_the_minimum_active_count(load: list[int], expected: int) -> None:
    pool = make_pool("least_connections", 4)
    pool.active[:] = load
    got = lease(pool.pick(ALL4, "k"))
    assert got.index == expected
    assert pool.active[expected] == load[expected] + 1


def test_least_connections_counts_real_leases() -> None:
    pool = make_pool("least_connections", 3)
    held = [lease(pool.pick((0, 1, 2), "k")) for _ in range(6)]
    assert pool.active == [2, 2, 2]
    held[0].release()  # one slot free on held[0]'s upstream
    assert lease(pool.pick((0, 1, 2), "k")).index == held[0].index


def test_least_connections_ties_rotate_instead_of_always_the_first() -> None:
    pool = make_pool("least_connections", 4)
    picks = [pick_index(pool, ALL4) for _ in range(4)]
    assert sorted(picks) == [0, 1, 2, 3]
    assert pool.active == [0, 0, 0, 0]


def test_least_connections_ties_rotate_among_a_subset() -> None:
    pool = make_pool("least_connections", 4)
    picks = [pick_index(pool, (1, 3)) for _ in range(4)]
    assert Counter(picks) == {1: 2, 3: 2}


@pytest.mark.parametrize("name", ["least_connections", "round_robin"])
def test_clients_with_different_rules_each_rotate_through_their_own(name: BalancerName) -> None:
    """Three rule classes picking in turn (0-2, 3-5, and 5 alone), as lab/topologies/
    large.yaml's 200 identities do: each class spreads its picks evenly. With one
    cursor shared by all, the last class's pick wrapped it to 0, so the first class got
    0 every time and the second 3 every time."""
    pool = make_pool(name, 6)
    classes = {"a": (0, 1, 2), "b": (3, 4, 5), "c": (5,)}
    picks: dict[str, Counter[int]] = {k: Counter() for k in classes}
    for _ in range(30):
        for label, allowed in classes.items():
            picks[label][pick_index(pool, allowed)] += 1
    assert picks["a"] == {0: 10, 1: 10, 2: 10}
    assert picks["b"] == {3: 10, 4: 10, 5: 10}
    assert picks["c"] == {5: 30}


def test_rotation_forgets_candidate_sets_beyond_its_limit() -> None:
    rotation = Rotation(4)
    rotation.LIMIT = 2
    assert [rotation.next((0, 1), (0, 1)) for _ in range(3)] == [0, 1, 0]
    rotation.next((2, 3), (2, 3))
    rotation.next((1, 3), (1, 3))  # a third set: the memory starts afresh
    assert rotation.next((0, 1), (0, 1)) == 0


@given(
    st.lists(st.integers(0, 20), min_size=1, max_size=8).flatmap(
        lambda load: st.tuples(
            st.just(load),
            st.lists(st.sampled_from(range(len(load))), min_size=1, unique=True).map(sorted),
        )
    )
)
def test_least_connections_choice_always_has_the_minimum(
    case: tuple[list[int], list[int]],
) -> None:
    load, candidates = case
    chosen = LeastConnections(len(load)).choose(candidates, load, "k")
    assert chosen in candidates
    assert load[chosen] == min(load[i] for i in candidates)


# ----------------------------------------------------------------------- exact counting


class PoolMachine(RuleBasedStateMachine):
    """Interleave picks (random allowed/exclude subsets), releases (including double
    releases) and health changes; the pool's counts must match the open leases exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = make_pool("least_connections", 1)
        self.n = 1
        self.leases: list[Lease] = []
        self.now = 0.0

    @initialize(
        name=st.sampled_from(BALANCERS),
        n=st.integers(1, 5),
        seed=st.integers(0, 2**16),
        rise=st.integers(1, 3),
        fall=st.integers(1, 3),
    )
    def setup(self, name: BalancerName, n: int, seed: int, rise: int, fall: int) -> None:
        self.pool = make_pool(name, n, seed=seed, rise=rise, fall=fall)
        self.n = n
        self.rise, self.fall = rise, fall

    def _subset(self, raw: list[int]) -> list[int]:
        return sorted({i % self.n for i in raw})

    @rule(
        allowed=st.lists(st.integers(0, 9), max_size=6),
        exclude=st.lists(st.integers(0, 9), max_size=3),
        key=st.text(max_size=5),
    )
    def pick(self, allowed: list[int], exclude: list[int], key: str) -> None:
        allowed_set = self._subset(allowed)
        excluded = self._subset(exclude)
        eligible = [
            i
            for i in allowed_set
            if i not in excluded and self.pool.health[i].state is not Health.DOWN
        ]
        before = list(self.pool.active)
        result = self.pool.pick(allowed_set, key, exclude=excluded)
        if isinstance(result, NoUpstream):
            assert eligible == []
            assert result.reason == "no_healthy_upstream"
            assert self.pool.active == before
        else:
            assert result.index in eligible
            assert result.upstream is self.pool.upstreams[result.index]
            self.leases.append(result)

    @rule(which=st.integers(0, 50), twice=st.booleans())
    def release(self, which: int, twice: bool) -> None:
        if not self.leases:
            return
        chosen = self.leases[which % len(self.leases)]
        chosen.release()
        if twice:
            chosen.release()
        assert chosen.released

    @rule(index=st.integers(0, 9), ok=st.booleans())
    def check(self, index: int, ok: bool) -> None:
        self.now += 1.0
        self.pool.health[index % self.n].observe(ok, self.now)

    @rule(index=st.integers(0, 9))
    def dial_failed(self, index: int) -> None:
        self.now += 1.0
        self.pool.health[index % self.n].mark_down(self.now, "dial failed")

    @rule(
        chosen=st.lists(st.integers(0, 5), min_size=1, max_size=6, unique=True),
        name=st.sampled_from(BALANCERS),
    )
    def reconfigure(self, chosen: list[int], name: BalancerName) -> None:
        """A reload: any subset of a six-upstream universe, in any order."""
        universe = upstreams(6)
        new = tuple(universe[i] for i in chosen)
        before = {
            u.key: m.state for u, m in zip(self.pool.upstreams, self.pool.health, strict=True)
        }
        self.pool.reconfigure(
            new, make_strategy(name, new, random.Random(0)), rise=self.rise, fall=self.fall
        )
        self.n = len(new)
        for upstream, machine in zip(self.pool.upstreams, self.pool.health, strict=True):
            assert machine.state is before.get(upstream.key, Health.UNKNOWN)

    @invariant()
    def counts_are_exact(self) -> None:
        """Every open lease counts once, against its upstream's key, wherever it now is."""
        open_per_key = Counter(lease.upstream.key for lease in self.leases if not lease.released)
        in_pool = [u.key for u in self.pool.upstreams]
        assert self.pool.active == [open_per_key[key] for key in in_pool]
        assert self.pool.retired == {
            key: count for key, count in open_per_key.items() if key not in in_pool
        }
        assert all(count >= 0 for count in self.pool.active)
        assert self.pool.total_active() == sum(open_per_key.values())


TestPoolCounts = PoolMachine.TestCase
TestPoolCounts.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


def test_releasing_a_lease_twice_changes_nothing() -> None:
    pool = make_pool("round_robin", 2)
    first = lease(pool.pick((0,), "k"))
    second = lease(pool.pick((0,), "k"))
    assert pool.active == [2, 0]
    first.release()
    first.release()
    assert pool.active == [1, 0]
    assert first.released
    assert not second.released
    second.release()
    assert pool.active == [0, 0]


def test_a_released_lease_still_names_its_upstream_for_the_log() -> None:
    pool = make_pool("round_robin", 2)
    got = lease(pool.pick((0, 1), "k"))
    assert got.upstream == pool.upstreams[got.index]
    got.release()
    assert got.upstream == pool.upstreams[got.index]


# ------------------------------------------------------------------------ reconfigure


def reconfigure(pool: UpstreamPool, new: Sequence[Upstream]) -> None:
    pool.reconfigure(new, make_strategy("least_connections", new), rise=1, fall=1)


def test_reconfigure_keeps_counts_and_health_of_upstreams_that_stay() -> None:
    ups = upstreams(3)
    pool = make_pool("least_connections", 3)
    held = [lease(pool.pick((1,), "k")) for _ in range(2)]
    set_down(pool, 2)
    set_up(pool, 1)
    reconfigure(pool, (ups[2], ups[1]))  # reordered, u0 removed
    assert pool.upstreams == (ups[2], ups[1])
    assert pool.active == [0, 2]
    assert [m.state for m in pool.health] == [Health.DOWN, Health.UP]
    assert pool.retired == {}
    for got in held:
        got.release()
    assert pool.active == [0, 0]


def test_a_removed_upstream_gets_no_new_picks_and_retires_when_its_last_lease_ends() -> None:
    ups = upstreams(2)
    pool = make_pool("least_connections", 2)
    old = [lease(pool.pick((0,), "k")) for _ in range(3)]
    reconfigure(pool, (ups[1],))
    assert pool.retired == {ups[0].key: 3}
    assert pool.total_active() == 3
    assert all(lease(pool.pick((0,), "k")).upstream == ups[1] for _ in range(4))
    old[0].release()
    old[0].release()  # twice changes nothing, as before
    assert pool.retired == {ups[0].key: 2}
    old[1].release()
    old[2].release()
    assert pool.retired == {}
    assert pool.active == [4]


def test_an_upstream_removed_and_added_back_takes_its_open_leases_with_it() -> None:
    ups = upstreams(2)
    pool = make_pool("least_connections", 2)
    held = lease(pool.pick((0,), "k"))
    reconfigure(pool, (ups[1],))
    reconfigure(pool, (ups[1], ups[0]))
    assert pool.retired == {}
    assert pool.active == [0, 1]
    assert pool.health[1].state is Health.UNKNOWN  # a new arrival is checked afresh
    held.release()
    assert pool.active == [0, 0]


def test_reconfigure_applies_new_rise_and_fall_to_kept_machines() -> None:
    ups = upstreams(1)
    pool = make_pool("least_connections", 1)
    pool.reconfigure(ups, make_strategy("least_connections", ups), rise=3, fall=2)
    assert (pool.health[0].rise, pool.health[0].fall) == (3, 2)


def test_reconfigure_to_no_upstreams_retires_them_all_and_picks_nothing() -> None:
    """A discovered group whose name stops answering leaves the pool empty: every open
    lease still finds its (retired) slot, and nothing new is picked."""
    ups = upstreams(2)
    pool = make_pool("least_connections", 2)
    held = lease(pool.pick((0, 1), "k"))
    reconfigure(pool, ())
    assert (pool.upstreams, pool.active, pool.retired) == ((), [], {held.upstream.key: 1})
    assert pool.pick((), "k") == NoUpstream("no_healthy_upstream")
    held.release()
    assert pool.retired == {}
    reconfigure(pool, ups[:1])
    assert pool.active == [0]


# ------------------------------------------------------------------------ eligibility


@pytest.mark.parametrize("name", BALANCERS)
def test_pick_stays_inside_allowed_not_excluded_not_down(name: BalancerName) -> None:
    pool = make_pool(name, 6, seed=7)
    set_down(pool, 2)
    set_up(pool, 4)
    allowed = (1, 2, 3, 4, 5)
    exclude = (5,)
    seen: set[int] = set()
    held: list[Lease] = []
    for i in range(200):
        got = lease(pool.pick(allowed, f"client-{i}", exclude=exclude))
        seen.add(got.index)
        held.append(got)
        if i % 3 == 0:
            held.pop(0).release()
    assert seen <= {1, 3, 4}
    assert seen == {1, 3, 4}


@pytest.mark.parametrize("name", BALANCERS)
def test_no_upstream_when_nothing_is_eligible(name: BalancerName) -> None:
    pool = make_pool(name, 3)
    set_down(pool, 0)
    set_down(pool, 1)
    assert pool.pick((0, 1), "k") == NoUpstream("no_healthy_upstream")
    assert pool.pick((), "k") == NoUpstream("no_healthy_upstream")
    assert pool.pick((0, 1, 2), "k", exclude=(2,)) == NoUpstream("no_healthy_upstream")
    set_down(pool, 2)
    assert pool.pick((0, 1, 2), "k") == NoUpstream("no_healthy_upstream")
    assert pool.active == [0, 0, 0]


@pytest.mark.parametrize("name", BALANCERS)
def test_unknown_upstreams_are_eligible(name: BalancerName) -> None:
    pool = make_pool(name, 3)
    assert [h.state for h in pool.health] == [Health.UNKNOWN] * 3
    assert pool.eligible((0, 1, 2)) == [0, 1, 2]
    set_down(pool, 0)
    set_up(pool, 1)
    assert pool.eligible((0, 1, 2)) == [1, 2]
    assert lease(pool.pick((0, 2), "k")).index == 2


@pytest.mark.parametrize("name", BALANCERS)
def test_an_empty_pool_picks_nothing(name: BalancerName) -> None:
    """Config validation asks for at least one upstream entry; a discovered group with no
    members yet can still leave the pool empty."""
    pool = UpstreamPool((), make_strategy(name, ()))
    assert pool.pick((), "k") == NoUpstream("no_healthy_upstream")
    assert pool.total_active() == 0


# ---------------------------------------------------------------------------- round_robin


def test_round_robin_visits_candidates_in_order() -> None:
    pool = make_pool("round_robin", 4)
    held = [lease(pool.pick(ALL4, "k")) for _ in range(8)]  # load does not matter
    assert [h.index for h in held] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_round_robin_skips_ineligible_upstreams() -> None:
    pool = make_pool("round_robin", 4)
    set_down(pool, 1)
    assert [pick_index(pool, ALL4) for _ in range(6)] == [0, 2, 3, 0, 2, 3]


def test_round_robin_over_a_subset_and_with_exclusions() -> None:
    pool = make_pool("round_robin", 5)
    assert [pick_index(pool, (1, 3, 4)) for _ in range(6)] == [1, 3, 4, 1, 3, 4]
    picks = [lease(pool.pick((0, 1, 2, 3), "k", exclude=(2,))).index for _ in range(3)]
    assert picks == [0, 1, 3]


def test_round_robin_continues_after_an_upstream_recovers() -> None:
    pool = make_pool("round_robin", 3)
    set_down(pool, 1)
    assert [pick_index(pool, (0, 1, 2)) for _ in range(2)] == [0, 2]
    set_up(pool, 1)
    assert [pick_index(pool, (0, 1, 2)) for _ in range(3)] == [0, 1, 2]


# --------------------------------------------------------------------------- power_of_two


@pytest.mark.parametrize("seed", range(5))
def test_power_of_two_with_two_candidates_always_picks_the_less_loaded(seed: int) -> None:
    pool = make_pool("power_of_two", 2, seed=seed)
    loads = random.Random(seed)
    for _ in range(200):
        a, b = loads.sample(range(10), 2)  # always different
        pool.active[:] = [a, b]
        got = lease(pool.pick((0, 1), "k"))
        assert got.index == (0 if a < b else 1)
        got.release()
        assert pool.active == [a, b]


@pytest.mark.parametrize("seed", range(5))
def test_power_of_two_never_picks_the_single_most_loaded(seed: int) -> None:
    pool = make_pool("power_of_two", 4, seed=seed)
    pool.active[:] = [3, 9, 0, 5]
    picks = Counter(pick_index(pool, ALL4) for _ in range(300))
    assert 1 not in picks
    assert set(picks) <= {0, 2, 3}
    assert len(picks) >= 2  # it is random among the two drawn, not fixed


def test_power_of_two_single_candidate() -> None:
    pool = make_pool("power_of_two", 3)
    pool.active[:] = [0, 7, 0]
    assert pick_index(pool, (1,)) == 1


def test_power_of_two_is_reproducible_with_a_seed() -> None:
    one = make_pool("power_of_two", 5, seed=42)
    two = make_pool("power_of_two", 5, seed=42)
    all5 = (0, 1, 2, 3, 4)
    assert [pick_index(one, all5) for _ in range(50)] == [pick_index(two, all5) for _ in range(50)]


# ------------------------------------------------------------------------ consistent_hash

KEYS = [f"spiffe://layer4lab/client-{i}" for i in range(1000)]


def test_consistent_hash_same_key_same_upstream() -> None:
    pool = make_pool("consistent_hash", 4)
    for key in ("client.a", "client-b", "spiffe://layer4lab/c"):
        first = lease(pool.pick(ALL4, key))  # held: loads change between picks
        for _ in range(20):
            assert lease(pool.pick(ALL4, key)).index == first.index


def test_consistent_hash_is_a_function_of_key_and_upstreams_only() -> None:
    ups = upstreams(3)
    one, two = ConsistentHash(ups), ConsistentHash(ups)
    for key in KEYS[:100]:
        assert one.choose([0, 1, 2], [0, 0, 0], key) == two.choose([0, 1, 2], [5, 0, 9], key)


def test_consistent_hash_spreads_keys_over_all_upstreams() -> None:
    pool = make_pool("consistent_hash", 3)
    counts = Counter(pick_index(pool, (0, 1, 2), key) for key in KEYS)
    assert set(counts) == {0, 1, 2}
    assert min(counts.values()) >= 200


@pytest.mark.parametrize("gone", [0, 1, 2])
def test_consistent_hash_only_keys_on_an_excluded_upstream_move(gone: int) -> None:
    pool = make_pool("consistent_hash", 3)
    before = {key: pick_index(pool, (0, 1, 2), key) for key in KEYS}
    excluded = {key: lease(pool.pick((0, 1, 2), key, exclude=(gone,))).index for key in KEYS}
    set_down(pool, gone)
    down = {key: pick_index(pool, (0, 1, 2), key) for key in KEYS}
    for after in (excluded, down):
        for key in KEYS:
            if before[key] == gone:
                assert after[key] != gone
            else:
                assert after[key] == before[key], key
    moved = [key for key in KEYS if before[key] == gone]
    assert moved  # the upstream did have keys; they spread over the other two
    assert {down[key] for key in moved} == {0, 1, 2} - {gone}


def test_make_strategy_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown balancer"):
        make_strategy("fastest", upstreams(1))  # type: ignore[arg-type]
