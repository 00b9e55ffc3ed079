"""isolation: from inside every client, no upstream name resolves, no upstream address
answers (so no forged PROXY header arrives), no private key is readable but its own.
From inside an upstream, a header forged to another upstream is refused. The proxy holds
its own key, never the CA's. And every client is still served (or refused) as its rules
say. The probes themselves live in :mod:`labkit.isolation`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import isolation as iso
from .. import topology as topo
from ..checks import Check, check
from .steps import Await, Choose, Ctx, Judge, Probe, Scenario, Start, preconditions


def _addresses(ctx: Ctx) -> dict[str, str]:
    assert ctx.run.addresses is not None
    return {u: f"{ip}:{topo.UPSTREAM_PORT}" for u, ip in ctx.run.addresses.upstreams.items()}


def from_clients(ctx: Ctx) -> Iterable[Check]:
    """Probe every client container once (one running several identities may read
    their keys, and no other)."""
    started = set(ctx.clients())
    holders = {
        box.name: iso.Holder(
            box.name, box.ids[0], box.clients[0].cert_file_stem, tuple(box.ids[1:])
        )
        for box in ctx.topology.containers()
        if box.ids[0] in started
    }
    names = ctx.topology.upstream_names()
    return iso.probe_clients(ctx.run.exec, holders, names, list(_addresses(ctx).values()))


def from_proxy(ctx: Ctx) -> Iterable[Check]:
    return [iso.probe_proxy(ctx.run.exec, "proxy")]


def _pair(ctx: Ctx) -> tuple[str, str]:
    names = ctx.topology.upstream_names()
    return names[0], names[1]


def forge(ctx: Ctx) -> Iterable[Check]:
    """The first upstream sends the second a PROXY header naming a client (judged from
    the victim's log by :func:`forgery_refused`)."""
    forger, victim = _pair(ctx)
    ctx.facts["forged"] = iso.forged_identity(ctx.run.topology_client_ids(), "")
    command = iso.probe_command(
        [], [_addresses(ctx)[victim]], forge=ctx.facts["forged"], keys=False
    )
    ctx.run.exec(forger, command)
    return []


def _forger_ip(ctx: Ctx) -> str:
    assert ctx.run.addresses is not None
    return ctx.run.addresses.upstreams[_pair(ctx)[0]]


def _from_forger(ctx: Ctx) -> list[dict[str, Any]] | None:
    records = [line.record for line in ctx.events(_pair(ctx)[1], "connection") if line.record]
    return records if iso.from_peer(records, _forger_ip(ctx)) else None


def forgery_refused(ctx: Ctx) -> Iterable[Check]:
    victim = _pair(ctx)[1]
    return [iso.judge_forgery(_forger_ip(ctx), ctx.facts["forged"], victim, ctx.facts["records"])]


def _served(ctx: Ctx) -> list[str] | None:
    started = set(ctx.clients())
    rules = {c: allowed for c, allowed in ctx.allowed.items() if c in started}
    probed = ctx.facts["probed"]
    return iso.served_as_ruled([a for a in ctx.attempts() if a.start > probed], rules)


def still_served(ctx: Ctx) -> Iterable[Check]:
    yield check(
        "every client is still treated as its rules say", True, "; ".join(ctx.facts["served"])
    )


def isolation_needs(_config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    return preconditions(
        (len(topology.upstreams) >= 2, "two upstreams"),
        (bool(topology.clients), "a client"),
    )


SCENARIO = Scenario(
    "isolation",
    "clients cannot reach upstreams, forge headers or read others' keys",
    topology="isolation",
    needs=isolation_needs,
    steps=(
        Start(),
        Choose("probed", lambda ctx: ctx.run.mark("phase", "probes from inside the containers")),
        Probe("probing from inside every client", from_clients),
        Probe("probing the proxy's files", from_proxy),
        Probe("forging a PROXY header from one upstream to another", forge),
        Await(
            "the forged connection in the other upstream's log",
            _from_forger,
            10,
            sources=lambda ctx: [_pair(ctx)[1]],
            save="records",
        ),
        Judge(forgery_refused),
        Await("every client treated as its rules say after the probes", _served, 20, save="served"),
        Judge(still_served),
    ),
)
