"""Unit tests for l4proxy.discovery: what one DNS lookup does to a discovered group's
members (a table, then properties over arbitrary sequences of lookups), and the router
applying those changes to the pool through the reload path."""

from __future__ import annotations

import ipaddress
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from l4proxy.balancer import Lease
from l4proxy.config import Address, Config, Group, Upstream, member, member_name, parse_config
from l4proxy.discovery import (
    Answer,
    LookupFailed,
    MemberChange,
    Resolution,
    noteworthy,
    plan,
)
from l4proxy.health import Health
from l4proxy.router import Admission, Rejected, Router

UP = Group("up", Address("tasks.upstream", 8000))


def m(ip: str, group: Group = UP) -> Upstream:
    return member(group, ip)


def keys(upstreams: tuple[Upstream, ...]) -> list[str]:
    return [u.key for u in upstreams]


# ------------------------------------------------------------------------------- naming


@pytest.mark.parametrize(
    ("ip", "name", "key"),
    [
        ("10.0.1.7", "up@10.0.1.7", "10.0.1.7:8000"),
        ("fd00::7", "up@[fd00::7]", "[fd00::7]:8000"),
        ("fd00:0:0::7", "up@[fd00::7]", "[fd00::7]:8000"),  # one spelling per address
        ("FD00::7", "up@[fd00::7]", "[fd00::7]:8000"),
    ],
)
def test_a_member_is_named_by_its_group_and_address(ip: str, name: str, key: str) -> None:
    found = m(ip)
    assert (found.name, found.key, found.group) == (name, key, "up")
    assert found.proxy_protocol == UP.proxy_protocol
    assert member_name("up", str(ipaddress.ip_address(ip))) == name


def test_a_member_takes_its_groups_proxy_protocol() -> None:
    assert member(Group("pp", Address("n", 9), "v2"), "10.0.0.1").proxy_protocol == "v2"


def test_a_member_must_be_an_ip_literal() -> None:
    with pytest.raises(ValueError, match="does not appear to be an IPv4 or IPv6 address"):
        m("tasks.upstream")


# -------------------------------------------------------------------------------- table

A, B, C, D, E = (m(f"10.0.0.{i}") for i in range(1, 6))
V6 = m("fd00::1")


def answer(*ips: str) -> Answer:
    return Answer(tuple(ips))


@pytest.mark.parametrize(
    ("current", "resolution", "taken", "expected"),
    [
        pytest.param(
            (),
            answer("10.0.0.1", "10.0.0.2", "10.0.0.3"),
            (),
            MemberChange("up", "ok", "answer", 5.0, added=(A, B, C)),
            id="first-answer",
        ),
        pytest.param(
            (A, B, C),
            answer("10.0.0.5", "10.0.0.4", "10.0.0.3", "10.0.0.2", "10.0.0.1"),
            (),
            MemberChange("up", "ok", "answer", 5.0, added=(D, E), kept=(A, B, C)),
            id="three-to-five",
        ),
        pytest.param(
            (A, B, C, D, E),
            answer("10.0.0.1"),
            (),
            MemberChange("up", "ok", "answer", 5.0, removed=(B, C, D, E), kept=(A,)),
            id="five-to-one",
        ),
        pytest.param(
            (A, B),
            answer("10.0.0.2", "10.0.0.3"),
            (),
            MemberChange("up", "ok", "answer", 5.0, added=(C,), removed=(A,), kept=(B,)),
            id="swap",
        ),
        pytest.param(
            (A, B),
            answer("10.0.0.2", "10.0.0.1"),
            (),
            MemberChange("up", "ok", "answer", 5.0, kept=(A, B)),
            id="same-set-other-order",
        ),
        pytest.param(
            (A,),
            answer("10.0.0.1", "10.0.0.1", "fd00::1", "fd00:0::1"),
            (),
            MemberChange("up", "ok", "answer", 5.0, added=(V6,), kept=(A,)),
            id="duplicates-and-spellings-count-once",
        ),
        pytest.param(
            (A, B),
            answer(),
            (),
            MemberChange("up", "empty", "no address records", 5.0, removed=(A, B)),
            id="empty-answer-retires-all",
        ),
        pytest.param(
            (A, B),
            LookupFailed("dns: Name or service not known"),
            (),
            MemberChange("up", "failed", "dns: Name or service not known", 5.0, kept=(A, B)),
            id="nxdomain-keeps-members",
        ),
        pytest.param(
            (A, B),
            LookupFailed("timeout"),
            (),
            MemberChange("up", "failed", "timeout", 5.0, kept=(A, B)),
            id="timeout-keeps-members",
        ),
        pytest.param(
            (),
            LookupFailed("timeout"),
            (),
            MemberChange("up", "failed", "timeout", 5.0),
            id="failure-before-any-answer",
        ),
        pytest.param(
            (A,),
            answer("10.0.0.1", "10.0.0.2", "not-an-ip"),
            ("10.0.0.2:8000",),
            MemberChange(
                "up", "ok", "answer", 5.0, kept=(A,), ignored=("10.0.0.2:8000", "not-an-ip")
            ),
            id="taken-and-garbage-are-ignored",
        ),
        pytest.param(
            (A, B),
            answer("10.0.0.2"),
            ("10.0.0.2:8000",),
            MemberChange("up", "ok", "answer", 5.0, removed=(A, B), ignored=("10.0.0.2:8000",)),
            id="a-member-taken-by-a-fixed-upstream-leaves",
        ),
    ],
)
def test_plan(
    current: tuple[Upstream, ...],
    resolution: Resolution,
    taken: tuple[str, ...],
    expected: MemberChange,
) -> None:
    assert plan(UP, current, resolution, 5.0, taken) == expected


def test_the_members_after_a_change_are_kept_plus_added_in_address_order() -> None:
    change = plan(UP, (V6, C), answer("fd00::1", "10.0.0.3", "10.0.0.1"), 0.0)
    assert change.members == (A, C, V6)
    assert change.changed
    assert not plan(UP, change.members, LookupFailed("x"), 1.0).changed


@pytest.mark.parametrize(
    ("previous", "change", "logged"),
    [
        (None, plan(UP, (), LookupFailed("timeout"), 0), True),
        (None, plan(UP, (), answer(), 0), True),
        (plan(UP, (), answer("10.0.0.1"), 0), plan(UP, (A,), answer("10.0.0.1"), 1), False),
        (plan(UP, (), answer("10.0.0.1"), 0), plan(UP, (A,), answer("10.0.0.2"), 1), True),
        (
            plan(UP, (A,), LookupFailed("timeout"), 0),
            plan(UP, (A,), LookupFailed("timeout"), 1),
            False,
        ),
        (
            plan(UP, (A,), LookupFailed("timeout"), 0),
            plan(UP, (A,), LookupFailed("dns: x"), 1),
            True,
        ),
        (plan(UP, (A,), LookupFailed("timeout"), 0), plan(UP, (A,), answer("10.0.0.1"), 1), True),
        (plan(UP, (A,), answer("10.0.0.1"), 0), plan(UP, (A,), LookupFailed("timeout"), 1), True),
        (plan(UP, (), answer(), 0), plan(UP, (), answer(), 1), False),
    ],
    ids=[
        "first-failure",
        "first-empty",
        "same-answer",
        "new-answer",
        "same-failure",
        "failure-changes-reason",
        "answers-again",
        "starts-failing",
        "still-empty",
    ],
)
def test_a_resolve_line_is_written_for_changes_of_members_or_outcome(
    previous: MemberChange | None, change: MemberChange, logged: bool
) -> None:
    assert noteworthy(previous, change) is logged


# --------------------------------------------------------------------------- properties

IPS = [f"10.0.0.{i}" for i in range(1, 7)] + ["fd00::1", "fd00::2"]
# Other spellings the system may return for the same addresses.
SPELLINGS = {"fd00::1": ["fd00:0::1", "FD00::1"], "fd00::2": ["fd00:0:0:0:0:0:0:2"]}
FAILURES = ["dns: Name or service not known", "dns: Temporary failure", "timeout"]


@st.composite
def spelled(draw: st.DrawFn) -> str:
    ip = draw(st.sampled_from(IPS))
    return draw(st.sampled_from([ip, *SPELLINGS.get(ip, [])]))


RESOLUTIONS: st.SearchStrategy[Resolution] = st.one_of(
    st.lists(spelled(), max_size=8).map(lambda ips: Answer(tuple(ips))),
    st.sampled_from(FAILURES).map(LookupFailed),
)


def canonical_keys(ips: tuple[str, ...]) -> set[str]:
    return {m(ip).key for ip in ips}


@settings(max_examples=300, deadline=None)  # the machine may be busy: no per-example deadline
@given(st.lists(RESOLUTIONS, max_size=20))
def test_members_are_always_the_last_good_answer(resolutions: list[Resolution]) -> None:
    """Whatever happened before, the members are the addresses of the last answer (none
    before the first); failures in between change nothing."""
    members: tuple[Upstream, ...] = ()
    last_answer: set[str] = set()
    for at, resolution in enumerate(resolutions):
        change = plan(UP, members, resolution, float(at))
        members = change.members
        if isinstance(resolution, Answer):
            last_answer = canonical_keys(resolution.addresses)
        assert {u.key for u in members} == last_answer
        assert len(members) == len(last_answer)  # no address twice


@settings(deadline=None)
@given(st.lists(spelled(), max_size=8, unique=True), st.sampled_from(FAILURES))
def test_a_failed_lookup_changes_nothing(ips: list[str], reason: str) -> None:
    members = plan(UP, (), Answer(tuple(ips)), 0.0).members
    change = plan(UP, members, LookupFailed(reason), 1.0)
    assert (change.added, change.removed, change.members) == ((), (), members)
    assert (change.result, change.reason, change.changed) == ("failed", reason, False)


@settings(deadline=None)
@given(st.lists(spelled(), max_size=8), st.lists(spelled(), max_size=8), st.randoms())
def test_names_are_stable(first: list[str], second: list[str], rng: random.Random) -> None:
    """A member's name and key depend on its address only: not on the order of the
    answer, duplicates, spellings or history."""
    shuffled = list(first)
    rng.shuffle(shuffled)
    one = plan(UP, (), Answer(tuple(first)), 0.0).members
    two = plan(UP, plan(UP, (), Answer(tuple(second)), 0.0).members, Answer(tuple(shuffled)), 1.0)
    assert two.members == one
    for upstream in one:
        ip = ipaddress.ip_address(upstream.address.host)
        assert upstream.name == member_name("up", str(ip))
        assert upstream == m(str(ip))


@settings(max_examples=300, deadline=None)  # the machine may be busy: no per-example deadline
@given(st.lists(RESOLUTIONS, max_size=20))
def test_changes_never_retire_a_member_twice_nor_add_one_twice(
    resolutions: list[Resolution],
) -> None:
    """Applied one after another, changes only retire members that are there and only
    add addresses that are not: so the pool never retires one upstream twice."""
    members: tuple[Upstream, ...] = ()
    alive: set[str] = set()
    for at, resolution in enumerate(resolutions):
        change = plan(UP, members, resolution, float(at))
        for gone in change.removed:
            assert gone.key in alive
            alive.remove(gone.key)
        for new in change.added:
            assert new.key not in alive
            alive.add(new.key)
        assert {u.key for u in change.kept} <= alive
        members = change.members
        assert {u.key for u in members} == alive


# ----------------------------------------------------- the router applies it to the pool


def router_config(rules: list[dict[str, Any]] | None = None, fixed: int = 1) -> Config:
    return parse_config(
        {
            "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
            "upstreams": [
                *(f"10.9.9.{i}:7000" for i in range(1, fixed + 1)),
                {"discover": "tasks.upstream:8000", "name": "up"},
            ],
            "balancer": "least_connections",
            "rate_limit": {"enabled": False},
            "authorization": {"default": "allow", "rules": rules or []},
        },
        Path("/etc/layer4lab"),
    )


class DiscoveryMachine(RuleBasedStateMachine):
    """Lookups (answers, empty answers, failures), admissions and releases, reloads that
    keep or drop the group, in any order: the pool's counts always equal the open
    leases (members retired by a lookup or a reload included), members are always the
    last good answer, and every lease gives its slot back exactly once."""

    def __init__(self) -> None:
        super().__init__()
        self.router = Router(router_config())
        self.admissions: list[Admission] = []
        self.answer: set[str] = set()
        self.now = 0.0

    @initialize(fixed=st.integers(0, 2))
    def setup(self, fixed: int) -> None:
        self.router = Router(router_config(fixed=fixed))
        self.fixed = fixed

    @rule(resolution=RESOLUTIONS)
    def lookup(self, resolution: Resolution) -> None:
        self.now += 1.0
        if "up" not in self.router.groups:
            assert self.router.discovered("up", resolution, self.now) is None
            return
        found = self.router.discovered("up", resolution, self.now)
        assert found is not None
        if found[0].removed and self.router.pool.retired:
            event("a lookup retired a member with open connections")
        if isinstance(resolution, Answer):
            self.answer = canonical_keys(resolution.addresses)

    @rule(client=st.sampled_from(["client.a", "client.b"]))
    def admit(self, client: str) -> None:
        result = self.router.admit(client, self.now)
        if isinstance(result, Rejected):
            assert result.decision == "no_healthy_upstream"
            assert self.router.pool.eligible(range(len(self.router.pool.upstreams))) == []
        else:
            assert result.lease.upstream in self.router.upstreams()
            self.admissions.append(result)

    @rule(which=st.integers(0, 40), twice=st.booleans())
    def release(self, which: int, twice: bool) -> None:
        if self.admissions:
            admission = self.admissions[which % len(self.admissions)]
            admission.release()
            if twice:
                admission.release()

    @rule(index=st.integers(0, 9), ok=st.booleans())
    def check(self, index: int, ok: bool) -> None:
        if self.router.pool.upstreams:
            self.now += 1.0
            self.router.check_result(index % len(self.router.pool.upstreams), ok, self.now, "")

    @rule(keep=st.booleans())
    def reload(self, keep: bool) -> None:
        """A reload that keeps the group (its members stay) or drops it (all retire)."""
        if keep:
            had_group = "up" in self.router.groups
            self.router.reconfigure(router_config(fixed=self.fixed))
            if not had_group:
                self.answer = set()  # back, as a new group: no members until it answers
        else:
            self.fixed = max(self.fixed, 1)  # a config needs one upstream entry
            fixed_only = parse_config(
                {
                    "tls": {"ca": "ca.pem", "cert": "s.pem", "key": "s.key"},
                    "upstreams": [f"10.9.9.{i}:7000" for i in range(1, self.fixed + 1)],
                    "rate_limit": {"enabled": False},
                },
                Path("/etc/layer4lab"),
            )
            self.router.reconfigure(fixed_only)
            self.answer = set()
            if self.router.pool.retired:
                event("a reload retired members with open connections")

    @invariant()
    def members_are_the_last_answer(self) -> None:
        state = self.router.groups.get("up")
        members = set() if state is None else {u.key for u in state.members}
        assert members == self.answer
        pool_keys = [u.key for u in self.router.pool.upstreams]
        assert pool_keys == [u.key for u in self.router.upstreams()]
        assert len(set(pool_keys)) == len(pool_keys)

    @invariant()
    def counts_are_exact(self) -> None:
        leases: list[Lease] = [a.lease for a in self.admissions]
        open_per_key = Counter(lease.upstream.key for lease in leases if not lease.released)
        pool = self.router.pool
        in_pool = [u.key for u in pool.upstreams]
        assert pool.active == [open_per_key[key] for key in in_pool]
        assert pool.retired == {k: n for k, n in open_per_key.items() if k not in in_pool}
        assert pool.total_active() == sum(open_per_key.values())

    def teardown(self) -> None:
        for admission in self.admissions:
            admission.release()
        assert self.router.pool.total_active() == 0
        assert self.router.pool.retired == {}


TestDiscoveryCounts = DiscoveryMachine.TestCase
TestDiscoveryCounts.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


def test_a_reload_that_keeps_the_group_keeps_its_members_counts_and_health() -> None:
    router = Router(router_config())
    router.discovered("up", answer("10.0.0.1", "10.0.0.2"), 1.0)
    index = router.pool.index_of("10.0.0.2:8000")
    assert index is not None
    router.check_result(index, True, 2.0, "connected")
    admission = router.admit("client.a", 3.0)
    assert isinstance(admission, Admission)
    held = admission.lease.upstream.key
    router.reconfigure(router_config())
    assert keys(router.pool.upstreams) == ["10.9.9.1:7000", "10.0.0.1:8000", "10.0.0.2:8000"]
    assert router.pool.retired == {}
    assert router.pool.active[router.pool.index_of(held) or 0] == 1
    assert router.pool.health[router.pool.index_of("10.0.0.2:8000") or 0].state is Health.UP
    admission.release()
    assert router.pool.total_active() == 0


def test_a_reload_that_drops_the_group_retires_its_members() -> None:
    router = Router(router_config(fixed=0))
    router.discovered("up", answer("10.0.0.1"), 1.0)
    admission = router.admit("client.a", 2.0)
    assert isinstance(admission, Admission)
    fixed_only = parse_config(
        {"tls": {"ca": "a", "cert": "b", "key": "c"}, "upstreams": ["10.9.9.1:7000"]},
        Path("/x"),
    )
    router.reconfigure(fixed_only)
    assert router.groups == {}
    assert router.pool.retired == {"10.0.0.1:8000": 1}
    assert router.discovered("up", answer("10.0.0.2"), 3.0) is None  # a late lookup: ignored
    admission.release()
    assert router.pool.retired == {}


def test_a_group_with_no_members_yet_is_no_healthy_upstream_not_denied() -> None:
    router = Router(
        router_config(rules=[{"client": "client.c", "action": "deny", "upstream": "up"}], fixed=0)
    )
    allowed = router.admit("client.a", 0.0)
    assert allowed == Rejected("no_healthy_upstream", "discovered group up has no members")
    assert router.admit("client.c", 0.0) == Rejected("denied", "no_allowed_upstream")
    router.discovered("up", answer("10.0.0.1"), 1.0)
    admission = router.admit("client.a", 1.0)
    assert isinstance(admission, Admission)
    assert admission.lease.upstream.name == "up@10.0.0.1"
    admission.release()
