"""flap: an upstream's packets are dropped and let through in turn, every 1.5 s for
20 s (one helper toggling a blackhole). Its health transitions stay within what the
phases and rise allow (at most one per phase; never up sooner than rise checks after
the packets flowed again), and no client allowed elsewhere loses more than the
connections in flight on it while it was cut off."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from ..logs import HealthEvent, format_ts
from .common import evidence, outcomes
from .fault_cycle import (
    Window,
    choose_target,
    connect_allowance,
    fault_ended,
    replies_again,
    target_needs,
    toolkit,
)
from .steps import (
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
    elsewhere,
    watched,
)

PERIOD, LASTING = "1.5s", "20s"
FLAP = toolkit("blackhole", allowance=connect_allowance, lasting=LASTING, flap=PERIOD)


def _phases(ctx: Ctx) -> list[tuple[float, bool]]:
    """(when, cut off?) for each phase, from what the helper said: when it began
    changing the rules (the change took effect between then and its ``ts``)."""
    phases: list[tuple[float, bool]] = []
    for line in ctx.run.fault_log.get(ctx.target, []):
        event, began = line.get("event"), float(line.get("began") or line["ts"])
        if event == "fault_applied":
            phases.append((began, True))
        elif event == "flap":
            phases.append((began, line.get("state") == "on"))
        elif event == "fault_cleared":
            phases.append((began, False))
    return phases


def _span(ctx: Ctx) -> tuple[float, float]:
    phases = _phases(ctx)
    return phases[0][0], phases[-1][0] + ctx.facts["window"][0]


def _transitions(ctx: Ctx) -> list[HealthEvent]:
    start, end = _span(ctx)
    return [h for h in ctx.health() if h.upstream_name == ctx.target and start <= h.ts <= end]


def _up_again(ctx: Ctx) -> Any:
    return ck.first_transition(ctx.health(), ctx.target, "up", ctx.facts["recover"] - 1.0) or (
        ctx.run.health_state(ctx.target) == "up" or None
    )


def transitions_bounded(ctx: Ctx) -> Iterable[Check]:
    phases, moves = _phases(ctx), _transitions(ctx)
    timing = topo.timing(ctx.config)
    late = []
    for move in (m for m in moves if m.new == "up"):
        freed = max((t for t, cut in phases if not cut and t <= move.ts), default=None)
        if freed is None or move.ts - freed < (timing.rise - 1) * timing.interval - SLACK:
            late.append(move)
    ups = sum(1 for m in moves if m.new == "up")
    yield check(
        f"{ctx.target}'s health transitions stay within what the phases and rise allow",
        len(phases) >= 4 and len(moves) <= len(phases) and not late,
        f"{len(phases)} phases of {PERIOD} over {LASTING}, {len(moves)} transitions "
        f"({ups} up, {len(moves) - ups} down; at most one per phase); {len(late)} up sooner "
        f"than rise {timing.rise} x interval {timing.interval:g}s after the packets flowed",
        evidence(late or moves[:4])
        + [
            f"phase from {format_ts(t)}: {'cut off' if cut else 'packets flow'}"
            for t, cut in phases
        ],
    )


def only_in_flight_lost(ctx: Ctx) -> Iterable[Check]:
    phases, access = _phases(ctx), ctx.access()
    window = ctx.facts["window"][0]
    cut = [
        (t, phases[i + 1][0] if i + 1 < len(phases) else t)
        for i, (t, off) in enumerate(phases)
        if off
    ]
    others = elsewhere(ctx)
    attempts = ctx.attempts(others)
    start, end = _span(ctx)
    during = [a for a in attempts if start <= a.start <= end]
    unexplained = [
        a
        for a in during
        if not a.ok
        and not (
            ck.went_to(a, access, ctx.target, SLACK)
            and any(a.start <= b + window and a.end >= s - SLACK for s, b in cut)
        )
    ]
    yield check(
        f"clients allowed elsewhere ({', '.join(others)}) lost only connections in flight "
        f"on {ctx.target} while it was cut off",
        bool(during) and not unexplained,
        f"{len(during)} attempts during the flapping: {outcomes(during)}; "
        f"{len(unexplained)} failed otherwise",
        evidence(unexplained),
    )


SCENARIO = Scenario(
    "flap",
    "an upstream cut off and back every 1.5 s for 20 s",
    topology="blackhole",
    needs=target_needs,
    steps=(
        Start(),
        Choose("target", choose_target, "flap target {target}"),
        Choose("window", Window(FLAP)),
        Steady(watched),
        Inject(FLAP),
        Await(
            f"the flapping to end by itself ({LASTING})",
            fault_ended,
            lambda ctx: topo.parse_duration(LASTING) + 15,
            sources=["proxy"],
        ),
        Recover(FLAP),
        Await(
            "the proxy to have {target} up",
            _up_again,
            lambda ctx: ctx.facts["window"][0] + 15,
            ["proxy"],
        ),
        Await(
            f"{STEADY_REPLIES} replies from {{target}} again",
            replies_again(lambda ctx: ctx.facts["recover"]),
            15,
            watched,
        ),
        StopClients(),
        Judge(transitions_bounded),
        Judge(only_in_flight_lost),
    ),
)
