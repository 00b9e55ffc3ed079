"""The admission pipeline for one authenticated connection (pure).

rate limit -> authorization -> health -> balancer -> (dial; on failure: passive health
and the next eligible upstream). Every outcome that is not a lease on an upstream is a
:class:`Rejected` value whose ``decision`` and ``reason`` go into the access log.

The router also holds the members of discovered groups: the pool's upstreams are the
configured ones followed by each group's members, and a lookup's :class:`MemberChange`
is applied with the pool's ``reconfigure``, the path a reload takes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .authz import Authorizer
from .balancer import Lease, NoUpstream, UpstreamPool, make_strategy
from .config import Config, Upstream, member
from .discovery import GroupState, MemberChange, Resolution, noteworthy, ordered, plan
from .health import Transition
from .ratelimit import Limited, RateLimiter, Ticket


@dataclass(frozen=True, slots=True)
class Rejected:
    decision: str  # denied | rate_limited | no_healthy_upstream | dial_failed
    reason: str


@dataclass(slots=True)
class Admission:
    """An admitted connection: its concurrency ticket, its current upstream lease and the
    upstreams it has tried (keys). :meth:`release` returns every slot it holds, once."""

    identity: str
    ticket: Ticket
    allowed: tuple[int, ...]  # pool indices at ``lease.generation``
    lease: Lease
    tried: list[str] = field(default_factory=list)

    def release(self) -> None:
        self.lease.release()
        self.ticket.release()


class Router:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        rl = config.rate_limit
        self.config = config
        self.rng = rng
        self.groups: dict[str, GroupState] = {g.name: GroupState(g) for g in config.groups}
        upstreams = self.upstreams()
        self.pool = UpstreamPool(
            upstreams,
            make_strategy(config.balancer, upstreams, rng),
            rise=config.health_check.rise,
            fall=config.health_check.fall,
        )
        self.authorizer = Authorizer(
            config.authorization.rules, config.authorization.default, upstreams
        )
        self.limiter = RateLimiter(
            rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent, enabled=rl.enabled
        )

    def upstreams(self) -> tuple[Upstream, ...]:
        """The pool's upstreams: the configured ones, then each group's members."""
        members = (m for state in self.groups.values() for m in state.members)
        return (*self.config.upstreams, *members)

    def _rebuild(self) -> None:
        """Give the pool and the authorizer the current upstream list. Counts and health
        carry over by address; an upstream no longer listed is retired (reconfigure)."""
        config = self.config
        upstreams = self.upstreams()
        self.pool.reconfigure(
            upstreams,
            make_strategy(config.balancer, upstreams, self.rng),
            rise=config.health_check.rise,
            fall=config.health_check.fall,
        )
        self.authorizer = Authorizer(
            config.authorization.rules, config.authorization.default, upstreams
        )

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config to new admissions. Open admissions keep their slots:
        counts, health and token buckets carry over for upstreams and clients that stay.

        A group that stays (same name, same name to look up) keeps its members, rebuilt
        with its new settings; one that goes, or now looks up another name, has its
        members retired (a new group starts with none: its first lookup runs at once)."""
        rl = config.rate_limit
        fixed = {u.key for u in config.upstreams}
        groups: dict[str, GroupState] = {}
        for group in config.groups:
            state = GroupState(group)
            before = self.groups.get(group.name)
            if before is not None and before.group.address == group.address:
                state.last = before.last
                state.members = ordered(
                    member(group, m.address.host) for m in before.members if m.key not in fixed
                )
            groups[group.name] = state
        self.groups = groups
        self.config = config
        self._rebuild()
        self.limiter.reconfigure(
            rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent, enabled=rl.enabled
        )

    def discovered(
        self, name: str, resolution: Resolution, now: float
    ) -> tuple[MemberChange, bool] | None:
        """Apply one lookup of group ``name``: its :class:`MemberChange` and whether it is
        worth a log line (:func:`~l4proxy.discovery.noteworthy`); None if no such group
        is configured (any more)."""
        state = self.groups.get(name)
        if state is None:
            return None
        taken = {u.key for u in self.config.upstreams}
        for other in self.groups.values():
            if other is not state:
                taken.update(m.key for m in other.members)
        change = plan(state.group, state.members, resolution, now, taken)
        note = noteworthy(state.last, change)
        state.last = change
        if change.changed:
            state.members = change.members
            self._rebuild()
        return change, note

    def admit(self, identity: str, now: float) -> Admission | Rejected:
        ticket = self.limiter.admit(identity, now)
        if isinstance(ticket, Limited):
            return Rejected("rate_limited", ticket.reason)
        allowed = self.authorizer.allowed(identity)
        if not allowed:
            ticket.release()
            waiting = [
                name
                for name, state in self.groups.items()
                if not state.members and self.authorizer.group_allows(identity, name)
            ]
            if waiting:  # allowed, but DNS has named no member yet (or none any more)
                return Rejected(
                    "no_healthy_upstream",
                    f"discovered group {', '.join(waiting)} has no members",
                )
            return Rejected("denied", "no_allowed_upstream")
        picked = self.pool.pick(allowed, identity)
        if isinstance(picked, NoUpstream):
            ticket.release()
            return Rejected("no_healthy_upstream", f"all {len(allowed)} allowed upstreams are down")
        return Admission(identity, ticket, allowed, picked, [picked.upstream.key])

    def dial_failed(
        self, admission: Admission, now: float, reason: str
    ) -> tuple[Transition | None, Lease | Rejected]:
        """The dial on ``admission.lease`` failed: mark that upstream down, give its slot
        back and pick the next eligible allowed upstream not tried yet.

        After a reload the retry follows the new rules and the new upstream list."""
        lease = admission.lease
        machine = self.pool.health_of(lease)
        lease.release()
        transition = None
        if machine is not None:
            transition = machine.mark_down(now, f"dial failed: {reason}")
        if lease.generation != self.pool.generation:
            admission.allowed = self.authorizer.allowed(admission.identity)
        exclude = [i for i in map(self.pool.index_of, admission.tried) if i is not None]
        picked = self.pool.pick(admission.allowed, admission.identity, exclude=exclude)
        if isinstance(picked, NoUpstream):
            admission.ticket.release()
            attempts = len(admission.tried)
            return transition, Rejected("dial_failed", f"{reason} (after {attempts} attempt(s))")
        admission.lease = picked
        admission.tried.append(picked.upstream.key)
        return transition, picked

    def permits(self, identity: str, upstream: Upstream) -> bool:
        """May ``identity`` reach ``upstream`` under the current rules (revocation on
        reload asks this of every open connection)."""
        return self.authorizer.decide(identity, upstream).allowed

    def check_result(self, index: int, ok: bool, now: float, reason: str) -> Transition | None:
        return self.pool.health[index].observe(ok, now, reason)
