"""authz: replies come only from allowed upstreams; a client allowed nowhere is always
rejected (client ``rejected``, proxy ``denied``); upstreams learn who sent each message."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import needs
from .. import topology as topo
from ..checks import Check, check
from .common import evidence, identity, names
from .steps import Await, Ctx, Judge, Scenario, Start, StopClients

ATTEMPTS = 12  # per client, each allowed upstream reached among them


def _covered(ctx: Ctx) -> bool | None:
    attempts = ctx.attempts()
    allowed = ctx.allowed
    for client in ctx.clients():
        mine = [a for a in attempts if a.client == client]
        if len(mine) < ATTEMPTS or not allowed[client] <= {a.upstream for a in mine if a.ok}:
            return None
    return True


def as_ruled(ctx: Ctx) -> Iterable[Check]:
    attempts, access, allowed = ctx.attempts(), ctx.access(), ctx.allowed
    for client in ctx.clients():
        mine = [a for a in attempts if a.client == client]
        if allowed[client]:
            wrong = [a for a in mine if a.ok and a.upstream not in allowed[client]]
            failed = [a for a in mine if not a.ok]
            yield check(
                f"{client} served only by its allowed upstreams "
                f"({', '.join(sorted(allowed[client]))})",
                not wrong and not failed,
                f"{len(mine)} attempts: {names(mine)}; {len(wrong)} from a denied upstream, "
                f"{len(failed)} failed",
                evidence(wrong + failed),
            )
            continue
        not_rejected = [a for a in mine if a.outcome != "rejected"]
        proxy = [a for a in access if a.client == client]
        not_denied = [
            a for a in proxy if (a.decision, a.reason) != ("denied", "no_allowed_upstream")
        ]
        yield check(
            f"{client} (allowed nowhere) rejected every time",
            bool(mine) and not not_rejected,
            f"{len(mine)} attempts, outcomes {ck.describe_counts(ck.outcome_counts(mine))}",
            evidence(not_rejected),
        )
        yield check(
            f"proxy denied {client} every time (denied / no_allowed_upstream)",
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
        Await(f">= {ATTEMPTS} attempts per client, each allowed upstream reached", _covered, 30),
        StopClients(),
        Judge(as_ruled),
        Judge(identity),
    ),
)
