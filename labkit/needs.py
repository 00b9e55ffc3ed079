"""What a scenario needs of a topology, and what it derives from it (pure).

A topology file describes structure (upstreams, clients, proxy overrides, certificates);
what a scenario does is the scenario's: which upstream a fault hits
(:func:`fault_target`), what a reload changes (:func:`reload_authorization`). Both come
from the run's proxy config and the topology, so any scenario runs on any topology that
has what it needs -- and :func:`missing` says in words what is not there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import topology as topo
from .checks import allowed_upstreams


def allowed(config: Mapping[str, Any], topology: topo.Topology) -> dict[str, set[str]]:
    """Which upstreams each client of ``topology`` may reach under ``config``."""
    authorization = config.get("authorization") or {}
    return {
        c.id: allowed_upstreams(c.id, config["upstreams"], authorization) for c in topology.clients
    }


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


def _reply_upstreams(topology: topo.Topology) -> list[str]:
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
    replies = _reply_upstreams(topology)
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


def missing(scenario: str, config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    """What ``topology`` (with its proxy ``config``) lacks for ``scenario``; [] if nothing."""
    upstreams = topology.upstream_names()
    clients = topology.clients
    steady = steady_clients(topology)
    needs: list[str] = []
    known = {*upstreams, *(str(u["address"]) for u in config["upstreams"]), "*"}
    rules = (config.get("authorization") or {}).get("rules") or []
    named = {
        str(t)
        for rule in rules
        for t in (rule["upstream"] if isinstance(rule["upstream"], list) else [rule["upstream"]])
    }
    if named - known:
        strangers = ", ".join(sorted(named - known))
        needs.append(
            f"authorization rules that name its own upstreams (they name {strangers}; "
            "set proxy.authorization in the topology)"
        )
    if scenario in {"failover", "hang", "partition"}:
        if len(upstreams) < 2:
            needs.append("two upstreams")
        if not steady:
            needs.append("a steady request/reply client (no count, duration, burst, transfer)")
        target = fault_target(config, topology)
        if steady and len(upstreams) >= 2 and target is None:
            needs.append(
                "an upstream that some steady client may reach, whose clients may all reach "
                "another upstream too"
            )
        if scenario == "hang" and target is not None:
            spec = next(u for u in topology.upstreams if u.name == target)
            if spec.somaxconn is None:
                needs.append(
                    f"a capped listen backlog on {target} (somaxconn: a paused process's "
                    "kernel accepts connections until its queue is full)"
                )
    elif scenario == "authz":
        if not steady:
            needs.append("a steady request/reply client")
    elif scenario == "ratelimit":
        enabled, rate, _ = topo.rate_limit(config)
        if not enabled:
            needs.append("rate_limit enabled in the proxy config")
        if not any(c.burst and c.finite for c in clients):
            needs.append("a --burst client that stops by itself (count or duration)")
        polite = [
            c for c in clients if not c.burst and c.finite and not c.transfer and c.expect is None
        ]
        if not polite:
            needs.append("a polite client that stops by itself (count or duration)")
        elif enabled and not any(topo.parse_duration(c.interval_min) >= 1 / rate for c in polite):
            needs.append(f"a polite client whose interval is at least 1/rate ({1 / rate:g}s)")
    elif scenario == "mtls":
        if not any(c.expect for c in clients):
            needs.append("a client with bad credentials and the proxy's expected reason (expect)")
        if not any(c.expect is None and c.finite for c in clients):
            needs.append("a valid client that stops by itself (count or duration)")
    elif scenario == "reload":
        echo = {u.name for u in topology.upstreams if u.mode == "echo"}
        if not echo or not any(c.transfer and c.autostart for c in clients):
            needs.append("a transfer client and an echo upstream")
        if len([c for c in clients if not c.transfer]) < 3:
            needs.append("three request/reply clients (one moved, one denied, one allowed)")
        if len(_reply_upstreams(topology)) < 2:
            needs.append("two reply upstreams")
    elif scenario == "drain":
        if not any(c.transfer and c.autostart and c.finite for c in clients):
            needs.append("a transfer client that stops by itself")
        if not any(c.transfer and not c.autostart for c in clients):
            needs.append("a transfer client the scenario starts itself (autostart: false)")
    elif scenario == "isolation":
        if len(upstreams) < 2:
            needs.append("two upstreams")
        if not clients:
            needs.append("a client")
    return needs
