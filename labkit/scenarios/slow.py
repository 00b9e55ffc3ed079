"""slow: an upstream's application hangs after accepting (``hang`` through its control
socket: TCP connects, health checks pass, nothing is ever answered). Connections the
proxy sends it end at the proxy's idle timeout with that reason, the clients see them
end without a reply, least connections steers new ones elsewhere, and every other
attempt is served. Cleared, it answers again."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from ..logs import Access
from .common import evidence, names, outcomes
from .fault_cycle import choose_target, replies_again, target_needs, toolkit
from .steps import (
    OBSERVE_ATTEMPTS,
    SLACK,
    STEADY_REPLIES,
    Await,
    Choose,
    Ctx,
    Inject,
    Judge,
    Recover,
    Scenario,
    Start,
    Steady,
    StopClients,
    attempts_since,
    watched,
)

HANG = toolkit("hang")
IDLE_SLACK = 1.5  # seconds past the idle timeout within which the proxy must end it


def _idle_of(config: Mapping[str, Any]) -> float:
    """The proxy's idle timeout (timeouts.idle; 300s by default)."""
    return topo.parse_duration(str((config.get("timeouts") or {}).get("idle", "300s")))


def _idle(ctx: Ctx) -> float:
    return _idle_of(ctx.config)


def _hung(ctx: Ctx) -> list[Access]:
    """Access lines of connections the hung target never answered: forwarded to it
    after the switch, not a byte back (one accepted just before may have been answered)."""
    at, until = ctx.facts["fault"], ctx.facts.get("recover", float("inf"))
    return [
        a
        for a in ctx.access()
        if a.upstream_name == ctx.target
        and at - SLACK <= a.start <= until
        and not (a.line.record or {}).get("bytes_down")
    ]


def _one_timed_out(ctx: Ctx) -> list[Access] | None:
    ended = [a for a in _hung(ctx) if a.reason == "idle_timeout"]
    return ended or None


def _first_timeout(ctx: Ctx) -> float:
    return min(a.ts for a in _one_timed_out(ctx) or [])


def ended_at_idle(ctx: Ctx) -> Iterable[Check]:
    idle, hung = _idle(ctx), _hung(ctx)
    at, until = ctx.facts["fault"], ctx.facts["recover"]
    answered = [
        a
        for a in ctx.access()
        if a.upstream_name == ctx.target and at <= a.start <= until and a not in hung
    ]
    wrong = [
        a
        for a in hung
        if a.reason != "idle_timeout" or not idle - SLACK <= a.duration < idle + IDLE_SLACK
    ]
    yield check(
        f"connections sent to the hung {ctx.target} end at the proxy's idle timeout ({idle:g}s)",
        bool(hung) and not wrong,
        f"{len(hung)} connection(s) forwarded to {ctx.target} and never answered while it "
        f"hung ({len(answered)} answered before the switch took hold), "
        f"{len(wrong)} not ended by idle_timeout within {idle:g}-{idle + IDLE_SLACK:g}s "
        f"(durations {', '.join(f'{a.duration:.2f}s' for a in hung[:6])})",
        evidence(wrong or hung[:3]),
    )
    attempts = ctx.attempts(watched(ctx))
    theirs = [a for a in attempts if ck.access_for(a, hung, SLACK)]
    clean = [a for a in theirs if a.ok]
    yield check(
        "their clients saw them end without a reply (never a reply, never ok)",
        bool(theirs) and not clean,
        f"{len(theirs)} client attempt(s) matched to them: {outcomes(theirs)}",
        evidence(clean or theirs[:3]),
    )


def others_served(ctx: Ctx) -> Iterable[Check]:
    at, until = ctx.facts["fault"], ctx.facts["recover"]
    hung = _hung(ctx)
    # Also those accepted a moment before the switch whose request came after it.
    waited = [
        a for a in ctx.access() if a.upstream_name == ctx.target and a.reason == "idle_timeout"
    ]
    during = [a for a in ctx.attempts(watched(ctx)) if at <= a.start <= until]
    failed = [a for a in during if not a.ok and not ck.access_for(a, waited, SLACK)]
    yield check(
        f"every other attempt while {ctx.target} hung was served",
        not failed and len(during) >= OBSERVE_ATTEMPTS,
        f"{len(during)} attempts while it hung ({names(during)}): {outcomes(during)}; "
        f"{len(failed)} failed without having been sent to {ctx.target}",
        evidence(failed),
    )
    downs = [
        h
        for h in ctx.health()
        if h.upstream_name == ctx.target and h.new == "down" and at <= h.ts <= until
    ]
    yield check(
        f"{ctx.target} stayed up in the health checks (a hung application still accepts TCP)",
        not downs,
        f"{len(downs)} down transition(s) while it hung; least connections steered away "
        f"from it instead: {len(hung)} connection(s) sent to it",
        evidence(downs),
    )


def slow_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    lacking = target_needs(config, topology)
    idle = _idle_of(config)
    shortest = min((topo.parse_duration(c.timeout) for c in topology.clients), default=0.0)
    if not 0 < idle < shortest:
        lacking.append(
            f"a proxy idle timeout (timeouts.idle, {idle:g}s) shorter than the clients' "
            f"own timeout ({shortest:g}s)"
        )
    return lacking


SCENARIO = Scenario(
    "slow",
    "an upstream accepts and never answers (hang), then recovers",
    topology="slow",
    needs=slow_needs,
    steps=(
        Start(),
        Choose("target", choose_target, "hang target {target}"),
        Steady(watched),
        Inject(HANG),
        Await(
            "a connection to the hung {target} to end at the proxy's idle timeout",
            _one_timed_out,
            lambda ctx: _idle(ctx) + 10,
            sources=["proxy"],
        ),
        Await(
            f"{OBSERVE_ATTEMPTS} attempts per client after the first idle timeout",
            attempts_since(watched, _first_timeout, OBSERVE_ATTEMPTS),
            deadline=20,
            sources=watched,
        ),
        Recover(HANG),
        Await(
            f"{STEADY_REPLIES} replies from {{target}} again",
            replies_again(lambda ctx: ctx.facts["recover"]),
            15,
            watched,
        ),
        StopClients(),
        Judge(ended_at_idle),
        Judge(others_served),
    ),
)
