"""What a scenario needs of a topology, and what it derives from it (pure).

A topology file describes structure (upstreams, clients, proxy overrides, certificates);
what a scenario does is the scenario's: which upstream a fault hits
(:func:`fault_target`), what a reload changes (:func:`reload_authorization`). Both come
from the run's proxy config and the topology, so any scenario runs on any topology that
has what it needs. Each scenario says in words what it needs (its ``needs``);
:func:`labkit.scenarios.missing` adds :func:`rules_known`, which every one needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import topology as topo
from .checks import allowed_table


def allowed(config: Mapping[str, Any], topology: topo.Topology) -> dict[str, set[str]]:
    """Which upstreams each client of ``topology`` may reach under ``config``."""
    authorization = config.get("authorization") or {}
    return allowed_table([c.id for c in topology.clients], config["upstreams"], authorization)


def steady_clients(topology: topo.Topology) -> list[str]:
    """Clients that send request/reply traffic until stopped, with a valid certificate:
    what fault scenarios watch."""
    return [
        c.id
        for c in topology.clients
        if c.autostart
        and not c.finite
        and not c.transfer
        and not c.burst
        and not c.no_cert
        and c.expect is None
        and c.id not in topology.expired
        and c.id not in topology.other_ca
    ]


def reply_upstreams(topology: topo.Topology) -> list[str]:
    return [u.name for u in topology.upstreams if u.mode == "reply"]


def fault_target(config: Mapping[str, Any], topology: topo.Topology) -> str | None:
    """The upstream a fault hits: one that some steady client reaches, and every steady
    client reaching it may also reach another (so "clients allowed elsewhere lose only
    connections in flight" can be judged). The middle such upstream; None if none."""
    reach = allowed(config, topology)
    steady = steady_clients(topology)
    candidates = [
        name
        for name in topology.upstream_names()
        if any(name in reach[c] for c in steady)
        and all(reach[c] - {name} for c in steady if name in reach[c])
    ]
    return candidates[len(candidates) // 2] if candidates else None


def reload_authorization(config: Mapping[str, Any], topology: topo.Topology) -> dict[str, Any]:
    """The reload scenario's new rules, as a change a reviewer can follow: default deny;
    every transfer client keeps what it had; of the request/reply clients (in order) the
    first moves to reply upstreams it could not reach, the second is denied everywhere,
    the third gains one upstream; the rest keep what they had."""
    reach = allowed(config, topology)
    replies = reply_upstreams(topology)
    rules: list[dict[str, Any]] = []
    talkers = [c.id for c in topology.clients if not c.transfer]
    for client in topology.clients:
        now = sorted(reach[client.id])
        if client.transfer or client.id not in talkers[:3]:
            new = now
        elif client.id == talkers[0]:
            new = [u for u in replies if u not in now][:1] or now
        elif client.id == talkers[1]:
            new = []
        else:
            extra = [u for u in replies if u not in now][:1]
            new = sorted({*now, *extra})
        if new:
            rules.append({"client": client.id, "action": "allow", "upstream": new})
    return {"default": "deny", "rules": rules}


def rules_known(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    """What every scenario needs: authorization rules that name the topology's own
    upstreams (a rule naming another would judge traffic against a phantom)."""
    known = {*topology.upstream_names(), *(str(u["address"]) for u in config["upstreams"]), "*"}
    rules = (config.get("authorization") or {}).get("rules") or []
    named = {
        str(t)
        for rule in rules
        for t in (rule["upstream"] if isinstance(rule["upstream"], list) else [rule["upstream"]])
    }
    if not named - known:
        return []
    strangers = ", ".join(sorted(named - known))
    return [
        f"authorization rules that name its own upstreams (they name {strangers}; "
        "set proxy.authorization in the topology)"
    ]
