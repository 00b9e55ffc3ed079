"""authz: replies come only from allowed upstreams; a client allowed nowhere is always
rejected (client ``rejected``, proxy ``denied``); upstreams learn who sent each message.

Before judging, every client makes :data:`ATTEMPTS` attempts and reaches
:data:`DISTINCT` of its allowed upstreams (all of them if it has fewer: on the small
topologies, where no client is allowed more than three, that is every one), and each
*class* of clients (those the rules allow the same upstreams) reaches every upstream of
its class between them. So with 24 upstreams and 200 identities the wait stays short
(each identity need not try all 24: ~90 attempts each), and still no allowed upstream
goes unexercised. With more than :data:`ONE_LINE_EACH` clients the verdicts are one
line per class rather than per client."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from .. import checks as ck
from .. import needs
from .. import topology as topo
from ..checks import Check, check
from ..logs import Access, Attempt
from .common import evidence, identity, names
from .steps import Await, Ctx, Judge, Scenario, Start, StopClients

ATTEMPTS = 12  # per client
DISTINCT = 3  # allowed upstreams each client must reach (all, if it is allowed fewer)
ONE_LINE_EACH = 12  # up to this many clients, a verdict line each; beyond, one per class

_Item = TypeVar("_Item", Attempt, Access)


def by_client(items: Iterable[_Item]) -> dict[str | None, list[_Item]]:
    """Attempts or access lines grouped by client identity, in one pass."""
    grouped: dict[str | None, list[_Item]] = defaultdict(list)
    for item in items:
        grouped[item.client].append(item)
    return grouped


def classes(allowed: Mapping[str, set[str]], clients: Sequence[str]) -> list[list[str]]:
    """``clients`` grouped by what the rules allow them (in order of first appearance)."""
    grouped: dict[frozenset[str], list[str]] = {}
    for client in clients:
        grouped.setdefault(frozenset(allowed[client]), []).append(client)
    return list(grouped.values())


def covered(
    attempts: Iterable[Attempt], allowed: Mapping[str, set[str]], clients: Sequence[str]
) -> bool:
    """Has every client made :data:`ATTEMPTS` attempts and reached :data:`DISTINCT` of
    its allowed upstreams (or all, if fewer), and every class all of its upstreams?"""
    mine = by_client(attempts)
    reached = {c: {a.upstream for a in mine[c] if a.ok} & allowed[c] for c in clients}
    if any(
        len(mine[c]) < ATTEMPTS or len(reached[c]) < min(DISTINCT, len(allowed[c])) for c in clients
    ):
        return False
    return all(
        set().union(*(reached[c] for c in group)) >= allowed[group[0]]
        for group in classes(allowed, clients)
    )


def _covered(ctx: Ctx) -> bool | None:
    return covered(ctx.attempts(), ctx.allowed, ctx.clients()) or None


def _deadline(ctx: Ctx) -> float:
    """30 s, or longer for clients that wait longer between attempts (and are
    staggered by up to one interval): ATTEMPTS + 2 of their slowest intervals, + 10 s."""
    slowest = max(topo.parse_duration(c.interval_max) for c in ctx.topology.clients)
    return max(30.0, (ATTEMPTS + 2) * slowest + 10.0)


def span(clients: Sequence[str]) -> str:
    """``client.a`` / ``client.001..client.060 (60)``: a class of clients, briefly."""
    if len(clients) == 1:
        return clients[0]
    return f"{clients[0]}..{clients[-1]} ({len(clients)})"


def as_ruled(ctx: Ctx) -> Iterable[Check]:
    allowed = ctx.allowed
    clients = ctx.clients()
    attempts, access = by_client(ctx.attempts()), by_client(ctx.access())
    groups = [[c] for c in clients] if len(clients) <= ONE_LINE_EACH else classes(allowed, clients)
    for group in groups:
        who, ruled = span(group), allowed[group[0]]
        mine = [a for c in group for a in attempts[c]]
        if ruled:
            wrong = [a for a in mine if a.ok and a.upstream not in ruled]
            failed = [a for a in mine if not a.ok]
            idle = [c for c in group if not attempts[c]]
            yield check(
                f"{who} served only by {'its' if len(group) == 1 else 'their'} allowed "
                f"upstreams ({', '.join(sorted(ruled))})",
                not wrong and not failed and not idle,
                f"{len(mine)} attempts: {names(mine)}; {len(wrong)} from a denied upstream, "
                f"{len(failed)} failed" + (f"; no attempt from {', '.join(idle)}" if idle else ""),
                evidence(wrong + failed),
            )
            continue
        not_rejected = [a for a in mine if a.outcome != "rejected"]
        proxy = [a for c in group for a in access[c]]
        not_denied = [
            a for a in proxy if (a.decision, a.reason) != ("denied", "no_allowed_upstream")
        ]
        silent = [c for c in group if not attempts[c]]
        yield check(
            f"{who} (allowed nowhere) rejected every time",
            bool(mine) and not not_rejected and not silent,
            f"{len(mine)} attempts, outcomes {ck.describe_counts(ck.outcome_counts(mine))}"
            + (f"; no attempt from {', '.join(silent)}" if silent else ""),
            evidence(not_rejected),
        )
        yield check(
            f"proxy denied {who} every time (denied / no_allowed_upstream)",
            len(proxy) == len(mine) and not not_denied,
            f"{len(proxy)} access lines for {len(mine)} attempts, "
            f"{len(not_denied)} with another decision",
            evidence(not_denied or proxy[:3]),
        )


def authz_needs(_config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    return [] if needs.steady_clients(topology) else ["a steady request/reply client"]


SCENARIO = Scenario(
    "authz",
    "replies only from allowed upstreams; denied client",
    topology="authz",
    needs=authz_needs,
    steps=(
        Start(),
        Await(
            f">= {ATTEMPTS} attempts per client, {DISTINCT} (or all) of its allowed upstreams "
            "reached, and every allowed upstream by its class",
            _covered,
            _deadline,
        ),
        StopClients(),
        Judge(as_ruled),
        Judge(identity),
    ),
)
