"""ratelimit: a --burst client is admitted at the token bucket's pace (rate and burst
from the run's proxy config); a client keeping to the rate at the same time is never
refused."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from .common import evidence, outcomes
from .steps import Await, Ctx, Judge, Scenario, Start, preconditions


def _finished(ctx: Ctx) -> bool | None:
    return all(ctx.events(c, "summary") for c in ctx.clients()) or None


def _longest(ctx: Ctx) -> float:
    return max(topo.parse_duration(c.duration or "10s") for c in ctx.topology.clients) + 20


def greedy_paced(ctx: Ctx) -> Iterable[Check]:
    _, rate, burst = topo.rate_limit(ctx.config)
    access = ctx.access()
    for spec in (c for c in ctx.topology.clients if c.burst):
        mine = [a for a in access if a.client == spec.id]
        verdict = ck.bucket_verdict(mine, rate, burst)
        limited = Counter(a.reason for a in mine if a.decision == "rate_limited")
        yield check(
            f"{spec.id} (--burst) admitted at rate {rate:g}/s after a burst of {burst}",
            verdict.within,
            verdict.describe(rate, burst),
            [a.line.evidence() for a in mine[:2] + mine[-2:]],
        )
        yield check(
            f"{spec.id} was pushed beyond the bucket",
            verdict.limited > 0,
            f"{verdict.limited} connections rate-limited (reason {ck.describe_counts(limited)})",
        )
        attempts = ctx.attempts([spec.id])
        seen = ck.outcome_counts(attempts)
        agree = seen["ok"] == verdict.admitted and seen["rejected"] == verdict.limited
        yield check(
            f"{spec.id}'s own log agrees with the proxy",
            agree and seen["ok"] + seen["rejected"] == len(attempts),
            f"client outcomes {ck.describe_counts(seen)}; proxy admitted "
            f"{verdict.admitted}, rate-limited {verdict.limited}",
        )


def polite_served(ctx: Ctx) -> Iterable[Check]:
    _, rate, _ = topo.rate_limit(ctx.config)
    access = ctx.access()
    for spec in (c for c in ctx.topology.clients if not c.burst):
        gap = topo.parse_duration(spec.interval_min)
        attempts = ctx.attempts([spec.id])
        refused = [a for a in access if a.client == spec.id and a.decision == "rate_limited"]
        failed = [a for a in attempts if not a.ok]
        yield check(
            f"{spec.id} (interval >= {gap:g}s >= 1/rate) never rate-limited",
            bool(attempts) and not refused and not failed and gap >= 1 / rate,
            f"{len(attempts)} attempts, outcomes {outcomes(attempts)}; "
            f"{len(refused)} rate_limited access lines",
            evidence(failed) + [a.line.evidence() for a in refused],
        )


def ratelimit_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    enabled, rate, _ = topo.rate_limit(config)
    clients = topology.clients
    polite = [
        c for c in clients if not c.burst and c.finite and not c.transfer and c.expect is None
    ]
    return preconditions(
        (enabled, "rate_limit enabled in the proxy config"),
        (
            any(c.burst and c.finite for c in clients),
            "a --burst client that stops by itself (count or duration)",
        ),
        (bool(polite), "a polite client that stops by itself (count or duration)"),
        (
            not polite
            or not enabled
            or any(topo.parse_duration(c.interval_min) >= 1 / rate for c in polite),
            f"a polite client whose interval is at least 1/rate ({1 / rate if rate else 0:g}s)",
        ),
    )


SCENARIO = Scenario(
    "ratelimit",
    "token bucket: --burst client vs polite client",
    topology="ratelimit",
    needs=ratelimit_needs,
    steps=(
        Start(),
        Await("every client to finish (--duration) and log its summary", _finished, _longest),
        Judge(greedy_paced),
        Judge(polite_served),
    ),
)
