"""``python lab.py scenario isolation --compose``: the isolation probes against a running
compose lab (``make up``; project ``layer4lab`` unless told otherwise).

Nothing is started or removed here: the lab is the user's. Containers are found by
compose's labels; upstreams are the hosts of the proxy's own config (read inside the
proxy container), probed by name and by every address their containers have.
"""

from __future__ import annotations

import time
from typing import Any

import yaml

from . import isolation as iso
from .checks import Check, allowed_upstreams, check
from .engine import Engine
from .faulting import LABEL_FAULT
from .logs import LogLine, TailState, attempts_of, take_new_lines
from .progress import Progress
from .result import ScenarioResult
from .run import LABEL_RUN, LabError
from .topology import PROXY_CONFIG_PATH
from .waiting import wait_until

PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
ONEOFF_LABEL = "com.docker.compose.oneoff"


def compose_services(engine: Engine, project: str, *, running: bool = True) -> dict[str, str]:
    """Service name -> container id of compose project ``project`` (only the running
    ones with ``running``). Fault helpers and labkit runs' containers are not services,
    whatever labels their images gave them."""
    return {
        item.labels.get(SERVICE_LABEL, item.name): item.id
        for item in engine.labelled(f"{PROJECT_LABEL}={project}")
        if item.kind == "container"
        and (item.state == "running" or not running)
        and LABEL_FAULT not in item.labels
        and LABEL_RUN not in item.labels
        and item.labels.get(ONEOFF_LABEL) != "True"
    }


def _services(engine: Engine, project: str) -> dict[str, str]:
    """Running service name -> container id."""
    found = compose_services(engine, project)
    if not found:
        raise LabError(
            f"no running container of compose project {project!r}: start the lab with "
            "`make up` (or name the project with --project)"
        )
    return found


def _lines(engine: Engine, container: str, source: str, since: float | None) -> list[LogLine]:
    return take_new_lines(engine.logs(container, since), source, TailState())


def isolation_on_compose(engine: Engine, project: str, progress: Progress) -> ScenarioResult:
    started = time.time()
    clock = time.monotonic()
    result = ScenarioResult("isolation", f"compose:{project}", project, started)
    out: list[Check] = []
    try:
        _probe_everything(engine, project, progress, out)
    except (LabError, TimeoutError) as exc:
        result.error = str(exc)
        evidence = exc.evidence if isinstance(exc, LabError) else []
        out.append(check("scenario ran to completion", False, str(exc), evidence))
    result.checks = out
    result.duration = time.monotonic() - clock
    return result


def _probe_metrics_listener(
    engine: Engine,
    proxy: str,
    config: dict[str, Any],
    probers: dict[str, str],
    progress: Progress,
) -> list[Check]:
    """The proxy's read-only metrics listener (admin.metrics_listen) is Prometheus'
    alone: from each of ``probers`` its name does not resolve and its address (looked
    up inside the proxy) does not answer."""
    listen = str((config.get("admin") or {}).get("metrics_listen") or "")
    if not listen:
        return []
    host, _, port = listen.rpartition(":")
    code, text = engine.exec_run(
        proxy, ["python3", "-c", f"import socket; print(socket.gethostbyname({host!r}))"]
    )
    if code != 0:
        return [check(f"the proxy resolves its metrics listener {host}", False, text.strip())]
    address = f"{text.strip()}:{port}"
    progress.say(f"probing the metrics listener {listen} ({address}) from {', '.join(probers)}")
    return iso.probe_unreached(engine.exec_run, probers, [host], [address])


def _probe_everything(engine: Engine, project: str, progress: Progress, out: list[Check]) -> None:
    services = _services(engine, project)
    if "proxy" not in services:
        raise LabError(f"compose project {project!r} has no running proxy service")
    code, text = engine.exec_run(services["proxy"], ["cat", PROXY_CONFIG_PATH])
    if code != 0:
        raise LabError(f"cannot read the proxy's config: {text.strip()}")
    config: dict[str, Any] = yaml.safe_load(text) or {}
    targets = [str(u["address"] if isinstance(u, dict) else u) for u in config["upstreams"]]
    hosts = [t.rpartition(":")[0] for t in targets]
    port = targets[0].rpartition(":")[2]
    upstreams = {h: services[h] for h in hosts if h in services}
    if len(upstreams) < 2:
        raise LabError(f"isolation needs two running upstreams; found {sorted(upstreams)}")
    ips = {h: engine.addresses(c) for h, c in upstreams.items()}
    addresses = targets + [f"{ip}:{port}" for nets in ips.values() for ip in nets.values() if ip]
    clients = {name: c for name, c in services.items() if name.startswith("client")}
    holders: dict[str, iso.Holder] = {}
    for name, container in sorted(clients.items()):
        lines = _lines(engine, container, name, None)
        started = [line.record for line in lines if line.event == "started" and line.record]
        record = started[-1] if started else {}
        stem = record.get("cert")
        holders[name] = iso.Holder(
            container, str(record.get("client", name)), str(stem) if stem else None
        )
    ids = [holder.identity for holder in holders.values()]
    progress.say(f"probing from {', '.join(clients)} (upstream look-ups take ~10 s)")
    probed = time.time()
    out.extend(iso.probe_clients(engine.exec_run, holders, hosts, addresses))
    out.append(iso.probe_proxy(engine.exec_run, services["proxy"]))
    # One client and one upstream: neither may reach the metrics listener.
    probers = {name: clients[name] for name in sorted(clients)[:1]}
    probers.update({name: upstreams[name] for name in sorted(upstreams)[:1]})
    out.extend(_probe_metrics_listener(engine, services["proxy"], config, probers, progress))

    forger, victim = hosts[0], hosts[1]
    shared = set(ips[forger]) & set(ips[victim])
    forger_ip = next(ips[forger][n] for n in sorted(shared)) if shared else ""
    forged = iso.forged_identity(ids, "")
    at = time.time()
    engine.exec_run(
        upstreams[forger], iso.probe_command([], [targets[1]], forge=forged, keys=False)
    )

    def victim_lines() -> list[dict[str, Any]] | None:
        lines = _lines(engine, upstreams[victim], victim, at - 1)
        records = [ln.record for ln in lines if ln.event == "connection" and ln.record]
        return records if iso.from_peer(records, forger_ip) else None

    out.append(
        iso.judge_forgery(
            forger_ip,
            forged,
            victim,
            wait_until(f"{victim}'s log of the forgery", victim_lines, timeout=10, poll=0.5),
        )
    )

    rules = {
        holder.identity: allowed_upstreams(
            holder.identity, config["upstreams"], config.get("authorization") or {}
        )
        for holder in holders.values()
    }

    def served() -> list[str] | None:
        after = [
            a for name, c in clients.items() for a in attempts_of(_lines(engine, c, name, probed))
        ]
        return iso.served_as_ruled([a for a in after if a.start > probed], rules)

    out.append(
        check(
            "every client is still treated as its rules say",
            True,
            "; ".join(
                wait_until("every client treated as its rules say", served, timeout=20, poll=0.5)
            ),
        )
    )
