"""blackhole: drop every packet to and from an upstream (no reset: iptables DROP in its
network namespace), then let them through again. Dials to it time out and are retried
on another upstream; it is marked down within connect timeout + health-check window; no
client allowed elsewhere loses more than the connections in flight on it; and once the
packets flow again it comes back only after ``rise`` successful checks."""

from __future__ import annotations

from collections.abc import Iterable

from .. import topology as topo
from ..checks import Check, check
from .common import evidence
from .fault_cycle import connect_allowance, fault_cycle, target_needs, toolkit
from .steps import SLACK, Ctx, Judge, Scenario

BLACKHOLE = toolkit("blackhole", allowance=connect_allowance)


def redialled(ctx: Ctx) -> Iterable[Check]:
    """Connections the proxy dialled to the target while its packets were dropped were
    dialled again to another upstream (access ``attempts`` > 1), never served by it."""
    at, down = ctx.facts["fault"], ctx.facts["down"].ts
    again = [a for a in ctx.access() if a.attempts > 1 and a.start >= at - SLACK]
    wrong = [a for a in again if a.upstream_name == ctx.target or a.decision != "forwarded"]
    during = [a for a in again if a.start <= down + SLACK]
    yield check(
        f"dials to {ctx.target} timed out and were retried on another upstream",
        not wrong,
        f"{len(again)} connection(s) dialled more than once after the blackhole "
        f"({len(during)} before it was marked down), all forwarded elsewhere"
        if not wrong
        else f"{len(wrong)} of {len(again)} re-dialled connections not forwarded elsewhere",
        evidence(wrong or again[:3]),
    )


def flowing_again(ctx: Ctx) -> float:
    """The earliest moment the target's packets could flow again: when its helper began
    removing the rules (its ``fault_cleared`` line's ``began``). The ``recover`` mark is
    when it had finished, which can be a tenth of a second later on a busy host."""
    for line in reversed(ctx.run.fault_log.get(ctx.target, [])):
        if line.get("event") == "fault_cleared" and line.get("began") is not None:
            return float(line["began"])
    return float(ctx.facts["recover"])


def rise_respected(ctx: Ctx) -> Iterable[Check]:
    """Back only after ``rise`` successful active checks: never sooner than
    (rise - 1) check intervals after the packets could flow again."""
    timing = topo.timing(ctx.config)
    up, cleared = ctx.facts["up"], flowing_again(ctx)
    soonest = (timing.rise - 1) * timing.interval
    yield check(
        f"{ctx.target} marked up only after rise ({timing.rise}) successful checks",
        up.source == "active" and up.ts - cleared >= soonest - SLACK,
        f"up {up.ts - cleared:.2f}s after the packets flowed again ({up.source}: "
        f"{up.reason}); rise {timing.rise} x interval {timing.interval:g}s allows no "
        f"sooner than {soonest:.2f}s",
        [up.line.evidence()],
    )


SCENARIO = Scenario(
    "blackhole",
    "drop an upstream's packets (no reset), then let them through",
    topology="blackhole",
    steps=(*fault_cycle(BLACKHOLE), Judge(redialled), Judge(rise_respected)),
    needs=target_needs,
)
