"""bandwidth: an echo upstream's outgoing link is throttled to 1 Mbit/s for 20 s while
transfer clients keep starting 512 KiB transfers. Least connections sends fewer of the
new transfers to it (it keeps them longer): its share of the transfers begun while it is
throttled stays below a bound; every transfer is byte-exact or reported failed."""

from __future__ import annotations

from collections.abc import Iterable

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from ..logs import Attempt
from .common import evidence, outcomes
from .fault_cycle import fault_ended, toolkit
from .reset import choose_echo_target, reset_needs
from .steps import (
    SLACK,
    Await,
    Choose,
    Ctx,
    Inject,
    Judge,
    Recover,
    Scenario,
    Start,
    StopClients,
    transfers,
)

RATE, LASTING = "1mbit", "20s"
THROTTLE = toolkit("bandwidth", RATE, lasting=LASTING)
SHARE_BOUND = 0.35  # of the transfers begun while throttled, at most this share on it
SETTLE = 5.0  # seconds after the throttle before counting (transfers then in flight)


def _two_each(ctx: Ctx) -> bool | None:
    return all(len(ctx.attempts([c])) >= 2 for c in transfers(ctx)) or None


def _share(ctx: Ctx, begun: list[Attempt]) -> tuple[int, int]:
    access = ctx.access()
    on = sum(1 for a in begun if ck.went_to(a, access, ctx.target, SLACK))
    return on, len(begun)


def steered_away(ctx: Ctx) -> Iterable[Check]:
    at = ctx.facts["fault"]
    end = at + topo.parse_duration(LASTING)
    moved = ctx.attempts(transfers(ctx))
    before = [a for a in moved if a.start < at]
    during = [a for a in moved if at + SETTLE <= a.start < end]
    on_before, n_before = _share(ctx, before)
    on_during, n_during = _share(ctx, during)
    share = on_during / n_during if n_during else 1.0
    yield check(
        f"least connections moved new transfers away from the throttled {ctx.target}",
        n_during >= 8 and share <= SHARE_BOUND,
        f"transfers begun while it was throttled (from {SETTLE:g}s in): {on_during} of "
        f"{n_during} on {ctx.target} ({share:.0%}; bound {SHARE_BOUND:.0%}); before: "
        f"{on_before} of {n_before}",
        evidence(during[:3]),
    )


def transfers_accounted(ctx: Ctx) -> Iterable[Check]:
    moved = ctx.attempts(transfers(ctx))
    short = [a for a in moved if a.ok and not ck.transfer_intact(a)]
    yield check(
        "every transfer byte-exact or reported failed",
        bool(moved) and not short,
        f"{len(moved)} transfers: {outcomes(moved)}; {len(short)} ok but not byte-exact",
        evidence(short),
    )


SCENARIO = Scenario(
    "bandwidth",
    "an echo upstream throttled to 1 Mbit/s for 20 s under transfers",
    topology="bandwidth",
    needs=reset_needs,
    steps=(
        Start(),
        Choose("target", choose_echo_target, "throttle target {target}"),
        Await("two transfers per client", _two_each, 30),
        Inject(THROTTLE),
        Await(
            f"the throttle to end by itself ({LASTING})",
            fault_ended,
            lambda ctx: topo.parse_duration(LASTING) + 15,
            sources=["proxy"],
        ),
        Recover(THROTTLE),
        StopClients(),
        Judge(steered_away),
        Judge(transfers_accounted),
    ),
)
