"""Helpers and judges shared by several scenarios (pure: they read a :class:`Ctx`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from ..logs import Access, Attempt, HealthEvent, LogLine, ReloadEvent, reloads_of
from .steps import SLACK, Ctx

TRANSFER_SETTLE = 0.5  # seconds for a transfer to be connected after its client said so
TRANSFER_LEFT = 1.5  # seconds a transfer must still have to run when the change comes


def names(attempts: Sequence[Attempt]) -> str:
    """``u1=4, u2=3``: who answered."""
    return ck.describe_counts(ck.counts_by_upstream(attempts))


def outcomes(attempts: Sequence[Attempt]) -> str:
    return ck.describe_counts(ck.outcome_counts(attempts))


def evidence(items: Iterable[Attempt | Access | HealthEvent | LogLine]) -> list[str]:
    return [(item if isinstance(item, LogLine) else item.line).evidence() for item in items]


def rules_text(allowed: set[str]) -> str:
    return ", ".join(sorted(allowed)) if allowed else "denied"


def identity(ctx: Ctx) -> Iterable[Check]:
    """Every upstream connection that carried a client's bytes names that client."""
    lines = [
        line for name in ctx.topology.upstream_names() for line in ctx.events(name, "connection")
    ]
    carried = [line for line in lines if (line.record or {}).get("outcome") != "empty"]
    bad = ck.identity_problems(lines)
    yield check(
        "upstreams learned each client's identity from the PROXY v2 header",
        bool(carried) and not bad,
        f"{len(carried)} upstream connections with payload, {len(bad)} without a "
        "v2-proxy header naming the client that sent the message",
        evidence(bad or carried[:2]),
    )


def transfers_in_flight(ctx: Ctx, clients: Sequence[str], now: float) -> bool:
    """Is every transfer client connected (for :data:`TRANSFER_SETTLE`) with at least
    :data:`TRANSFER_LEFT` of its current transfer still to run? (Transfers run back to
    back: the current one began when the last one ended, or when the client started.)
    Clients start one after another, so "every one less than half done" could become
    impossible on a slow machine; a fixed margin before the end cannot."""
    for client in clients:
        spec = ctx.topology.client(client)
        ends = [a.end for a in ctx.attempts([client])]
        started = ctx.events(client, "started")
        if not started or (spec.count is not None and len(ends) >= spec.count):
            return False  # not started yet, or done
        began = ends[-1] if ends else started[0].ts
        planned = topo.parse_duration(spec.transfer_time or "0s")
        if not TRANSFER_SETTLE <= now - began <= planned - TRANSFER_LEFT:
            return False
    return True


def reload_after(ctx: Ctx, after: float) -> ReloadEvent | None:
    """The proxy's first 'reload' line (either result) from ``after`` on."""
    found = [r for r in reloads_of(ctx.lines("proxy")) if r.ts >= after - SLACK]
    return found[0] if found else None
