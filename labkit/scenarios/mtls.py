"""mtls: no certificate, another CA, an expired certificate and the server's own
certificate are refused at the handshake with the expected reason; a valid client is
served, and no refused client's bytes ever reach an upstream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import topology as topo
from ..checks import Check, check
from .common import evidence, names, outcomes
from .steps import Await, Ctx, Judge, Scenario, Start, preconditions


def _finished(ctx: Ctx) -> bool | None:
    return all(ctx.events(c, "summary") for c in ctx.clients()) or None


def valid_served(ctx: Ctx) -> Iterable[Check]:
    for spec in (c for c in ctx.topology.clients if c.expect is None):
        attempts = ctx.attempts([spec.id])
        failed = [a for a in attempts if not a.ok]
        yield check(
            f"{spec.id} (valid certificate) served",
            bool(attempts) and not failed,
            f"{len(attempts)} attempts: {names(attempts)}; {len(failed)} failed",
            evidence(failed),
        )


def refused_at_handshake(ctx: Ctx) -> Iterable[Check]:
    addresses = ctx.run.addresses
    assert addresses is not None
    access = ctx.access()
    for spec in (c for c in ctx.topology.clients if c.expect is not None):
        attempts = ctx.attempts([spec.id])
        how = "no certificate" if spec.no_cert else f"certificate {spec.cert_stem or spec.id}"
        ok = [a for a in attempts if a.ok]
        yield check(
            f"{spec.id} ({how}) refused",
            bool(attempts) and not ok,
            f"{len(attempts)} attempts, outcomes {outcomes(attempts)}",
            evidence(ok or attempts[:1]),
        )
        ip = addresses.clients[spec.container_name]  # of its own (mtls_needs)
        mine = [a for a in access if a.peer_ip == ip]
        wrong = [
            a
            for a in mine
            if a.decision != "tls_failed" or a.reason != spec.expect or a.upstream_name
        ]
        yield check(
            f"proxy: {spec.id} tls_failed with '{spec.expect}'",
            len(mine) == len(attempts) and bool(mine) and not wrong,
            f"{len(mine)} access lines from {ip} for {len(attempts)} attempts; "
            f"{len(wrong)} with another decision or reason",
            evidence(wrong or mine[:1]),
        )


def nothing_leaked(ctx: Ctx) -> Iterable[Check]:
    bad = [c.id for c in ctx.topology.clients if c.expect is not None]
    leaked = [
        line
        for name in ctx.topology.upstream_names()
        for line in ctx.events(name, "connection")
        if any(f"from {b}" in str((line.record or {}).get("message") or "") for b in bad)
    ]
    yield check(
        "no refused client's message reached an upstream",
        not leaked,
        f"{len(leaked)} upstream connection(s) carried a refused client's message",
        evidence(leaked),
    )


def mtls_needs(_config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    clients = topology.clients
    return preconditions(
        (
            any(c.expect for c in clients),
            "a client with bad credentials and the proxy's expected reason (expect)",
        ),
        (
            any(c.expect is None and c.finite for c in clients),
            "a valid client that stops by itself (count or duration)",
        ),
        (
            all(len(box.clients) == 1 for box in topology.containers() if box.clients[0].expect),
            "each client with bad credentials in a container of its own (the proxy knows "
            "a refused handshake by its address only)",
        ),
    )


SCENARIO = Scenario(
    "mtls",
    "bad client certificates refused, valid one served",
    topology="mtls",
    needs=mtls_needs,
    steps=(
        Start(),
        Await("every client to finish (--count) and log its summary", _finished, 60),
        Judge(valid_served),
        Judge(refused_at_handshake),
        Judge(nothing_leaked),
    ),
)
