"""reset: an echo upstream resets every established connection (a TCP reset from its
namespace) while transfers stream through it. The transfers it carried end with an
error at their clients, never a clean end of stream; the proxy's access lines name the
upstream error; no transfer anywhere is reported ok unless byte-exact; and once the
clients are done, /status counts no connection on any upstream."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import needs
from .. import topology as topo
from ..checks import Check, check
from ..logs import Access, Attempt
from .common import evidence, outcomes
from .fault_cycle import toolkit
from .steps import (
    SLACK,
    Admin,
    Await,
    Choose,
    Ctx,
    Inject,
    Judge,
    Recover,
    Scenario,
    Start,
    StopClients,
    json_object,
    preconditions,
    transfers,
)

RESET = toolkit("reset", "established")


def echo_target(config: Mapping[str, Any], topology: topo.Topology) -> str | None:
    """The last echo upstream some transfer client reaches, whose transfer clients may
    all reach another echo upstream too."""
    reach = needs.allowed(config, topology)
    echo = [u.name for u in topology.upstreams if u.mode == "echo"]
    movers = [c.id for c in topology.clients if c.transfer and c.autostart]
    fits = [
        u
        for u in echo
        if any(u in reach[c] for c in movers)
        and all((reach[c] & set(echo)) - {u} for c in movers if u in reach[c])
    ]
    return fits[-1] if fits else None


def _on_target(ctx: Ctx) -> bool | None:
    """Two transfers streaming through the target (least connections spreads them), so
    that at least one is still in flight when the resets begin a moment later."""
    code, text = ctx.run.adminctl("status")
    ups = json_object(text).get("upstreams") or []
    count = next((u.get("active_connections") for u in ups if u.get("name") == ctx.target), 0)
    return (code == 0 and isinstance(count, int) and count >= 2) or None


def _carried(ctx: Ctx) -> list[Attempt]:
    """Transfers open on the target when the resets began (matched to access lines)."""
    at, access = ctx.facts["fault"], ctx.access()
    return [
        a
        for a in ck.in_flight(ctx.attempts(transfers(ctx)), at)
        if any(line.upstream_name == ctx.target for line in ck.access_for(a, access, SLACK))
    ]


def _carried_ended(ctx: Ctx) -> list[Access] | None:
    """Access lines of connections open on the target at the fault that have ended."""
    at = ctx.facts["fault"]
    ended = [a for a in ctx.access() if a.upstream_name == ctx.target and a.start < at <= a.ts]
    return ended or None


def _lines(ctx: Ctx, attempt: Attempt) -> list[Access]:
    return [a for a in ck.access_for(attempt, ctx.access(), SLACK) if a.upstream_name == ctx.target]


def reset_seen(ctx: Ctx) -> Iterable[Check]:
    carried = _carried(ctx)
    clean = [a for a in carried if a.ok]
    yield check(
        f"transfers {ctx.target} carried when it reset them ended with an error at the client",
        bool(carried) and not clean,
        f"{len(carried)} transfer(s) in flight on {ctx.target}: {outcomes(carried)}",
        evidence(clean or carried[:3]),
    )
    lines = [line for a in carried for line in _lines(ctx, a)]
    unnamed = [line for line in lines if not line.reason.startswith("upstream_error")]
    yield check(
        "the proxy's access lines name the upstream's error",
        bool(lines) and not unnamed,
        f"{len(lines)} access line(s): reasons "
        f"{ck.describe_counts(Counter(line.reason for line in lines))}",
        evidence(unnamed or lines[:2]),
    )


def nothing_silent(ctx: Ctx) -> Iterable[Check]:
    moved = ctx.attempts(transfers(ctx))
    short = [a for a in moved if a.ok and not ck.transfer_intact(a)]
    yield check(
        "no transfer reported ok unless byte-exact (none silently short or corrupted)",
        bool(moved) and not short,
        f"{len(moved)} transfers: {outcomes(moved)}; {len(short)} ok but not byte-exact",
        evidence(short),
    )


def nothing_counted(ctx: Ctx) -> Iterable[Check]:
    status = ctx.facts["status"]
    ups = status.json.get("upstreams") or []
    counted = {u.get("name"): u.get("active_connections") for u in ups}
    yield check(
        "afterwards /status counts no connection on any upstream",
        status.code == 0 and bool(counted) and not any(counted.values()),
        f"active_connections {counted}",
        [f"adminctl status: {status.evidence()}"],
    )


def reset_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    return preconditions(
        (
            echo_target(config, topology) is not None,
            "an echo upstream that transfer clients reach, each of them allowed another "
            "echo upstream too",
        ),
    )


def choose_echo_target(ctx: Ctx) -> str:
    """:func:`echo_target` of the run (its needs were checked before it started)."""
    target = echo_target(ctx.config, ctx.topology)
    assert target is not None, "run_scenario checks the needs before starting"
    return target


SCENARIO = Scenario(
    "reset",
    "an echo upstream resets its connections mid-stream",
    topology="reset",
    needs=reset_needs,
    steps=(
        Start(),
        Choose("target", choose_echo_target, "reset target {target}"),
        Await(
            "two transfers streaming through {target} (adminctl status)",
            _on_target,
            20,
            sources=lambda ctx: ["proxy", *transfers(ctx)],
        ),
        Inject(RESET),
        Await(
            "the proxy to log the end of the connections open on {target}",
            _carried_ended,
            15,
            sources=["proxy"],
        ),
        Recover(RESET),
        StopClients(),
        Admin("status", "status"),
        Judge(reset_seen),
        Judge(nothing_silent),
        Judge(nothing_counted),
    ),
)
