"""The admission pipeline for one authenticated connection (pure).

rate limit -> authorization -> health -> balancer -> (dial; on failure: passive health
and the next eligible upstream). Every outcome that is not a lease on an upstream is a
:class:`Rejected` value whose ``decision`` and ``reason`` go into the access log.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .authz import Authorizer
from .balancer import Lease, NoUpstream, UpstreamPool, make_strategy
from .config import Config, Upstream
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
        hc = config.health_check
        rl = config.rate_limit
        self.config = config
        self.rng = rng
        self.pool = UpstreamPool(
            config.upstreams,
            make_strategy(config.balancer, config.upstreams, rng),
            rise=hc.rise,
            fall=hc.fall,
        )
        self.authorizer = Authorizer(
            config.authorization.rules, config.authorization.default, config.upstreams
        )
        self.limiter = RateLimiter(
            rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent, enabled=rl.enabled
        )

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config to new admissions. Open admissions keep their slots:
        counts, health and token buckets carry over for upstreams and clients that stay."""
        hc = config.health_check
        rl = config.rate_limit
        self.pool.reconfigure(
            config.upstreams,
            make_strategy(config.balancer, config.upstreams, self.rng),
            rise=hc.rise,
            fall=hc.fall,
        )
        self.authorizer = Authorizer(
            config.authorization.rules, config.authorization.default, config.upstreams
        )
        self.limiter.reconfigure(
            rl.rate, rl.burst, rl.cleanup_interval, rl.max_concurrent, enabled=rl.enabled
        )
        self.config = config

    def admit(self, identity: str, now: float) -> Admission | Rejected:
        ticket = self.limiter.admit(identity, now)
        if isinstance(ticket, Limited):
            return Rejected("rate_limited", ticket.reason)
        allowed = self.authorizer.allowed(identity)
        if not allowed:
            ticket.release()
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
