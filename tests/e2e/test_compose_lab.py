"""The compose lab itself (compose.yaml) under testcontainers' DockerCompose, as a
project of its own (``l4tc-<session>-<n>``): a developer's running ``layer4lab`` is
never touched. Replies are read from the clients' logs (``get_logs``), the proxy's
status through ``exec_in_container``.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from collections import Counter
from typing import Any

import pytest

from labkit import checks as ck
from labkit import fault_cli
from labkit import topology as topo
from labkit.cli import parser
from labkit.compose_isolation import isolation_on_compose
from labkit.engine import Engine
from labkit.faulting import LABEL_FAULT
from labkit.logs import Attempt
from labkit.progress import Progress
from labkit.testing import LabCompose, compose_lab, wait_until
from labkit.testing.session import COMPOSE_PROJECT, Session

pytestmark = pytest.mark.e2e

WATCHED = ("client-a", "client-b", "client-c")
STEADY = ("client-a", "client-b", "client-d", "client-e")  # allowed on u1 or u3 too
ENOUGH = 3  # ok replies per watched client


def identity(service: str) -> str:
    return "client." + service.removeprefix("client-")


def replies_of_every_watched_client(lab: LabCompose) -> dict[str, list[Attempt]] | None:
    found = {s: lab.attempts(s) for s in WATCHED}
    return found if all(len([a for a in found[s] if a.ok]) >= ENOUGH for s in WATCHED) else None


def attempts_since(lab: LabCompose, services: tuple[str, ...], since: float) -> list[Attempt]:
    return [a for s in services for a in lab.attempts(s) if a.start > since]


def prometheus_query(port: int, query: str) -> list[dict[str, Any]]:
    """One instant query through Prometheus' HTTP API: the result vector."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def prometheus_sees_the_proxy(lab: LabCompose) -> None:
    """Prometheus (compose.yaml) is published on the host's loopback only, and within
    15 s of the lab being up its query API has the proxy's accepted connections and a
    health series per upstream, raw and recorded."""
    (container,) = [c for c in lab.get_containers() if c.Service == "prometheus"]
    published = [p for p in container.Publishers or [] if p.PublishedPort]
    assert published, container.Publishers
    assert {p.URL for p in published} == {"127.0.0.1"}, published
    every = [p for c in lab.get_containers() for p in c.Publishers or [] if p.PublishedPort]
    assert {p.URL for p in every} == {"127.0.0.1"}, every  # nothing else is published
    port = int(lab.get_service_port("prometheus", 9090) or 0)
    names = {"u1", "u2", "u3"}

    def by_name(query: str) -> dict[str, float]:
        return {r["metric"]["name"]: float(r["value"][1]) for r in prometheus_query(port, query)}

    def series() -> tuple[list[float], dict[str, float], dict[str, float]]:
        accepted = [
            float(r["value"][1])
            for r in prometheus_query(port, "l4proxy_connections_accepted_total")
        ]
        health = by_name('l4proxy_upstream_health{state="up"}')
        return accepted, health, by_name("upstream:l4proxy_upstream_up")

    def ready() -> tuple[list[float], dict[str, float], dict[str, float]] | None:
        found = series()
        accepted, health, recorded = found
        full = accepted and accepted[0] > 0 and set(health) == set(recorded) == names
        return found if full else None

    _, health, recorded = wait_until(
        "Prometheus' series of the proxy", ready, timeout=15, evidence=lambda: str(series())
    )
    assert health == dict.fromkeys(names, 1.0)
    assert recorded == dict.fromkeys(names, 1.0)
    (target,) = prometheus_query(port, 'up{job="l4proxy"}')
    assert target["value"][1] == "1"


def test_the_compose_lab_routes_by_the_reference_rules(
    compose_plugin: None, lab_session: Session
) -> None:
    reference = topo.load_reference_config()
    with compose_lab(session=lab_session) as lab:
        assert lab.project.startswith(f"l4tc-{lab_session.id}-")
        assert {c.Project for c in lab.get_containers()} == {lab.project}

        found = wait_until(
            f"{ENOUGH} replies for each of {', '.join(WATCHED)}",
            lambda: replies_of_every_watched_client(lab),
            timeout=60,
            evidence=lambda: str({s: ck.outcome_counts(lab.attempts(s)) for s in WATCHED}),
            poll=0.5,
        )
        for service, attempts in found.items():
            allowed = ck.allowed_upstreams(
                identity(service), reference["upstreams"], reference["authorization"]
            )
            ok = [a for a in attempts if a.ok]
            assert {a.upstream for a in ok} <= allowed, (service, Counter(a.upstream for a in ok))

        stdout, _, code = lab.adminctl("status")
        assert code == 0
        status = json.loads(stdout)
        assert status["state"] == "serving"
        health = {u["name"]: u["health"] for u in status["upstreams"]}
        assert health == {"u1": "up", "u2": "up", "u3": "up"}

        # Upstreams learn each client's identity from the proxy (PROXY v2).
        lines = lab.records("upstream3")
        assert not ck.identity_problems(lines), [x.text for x in ck.identity_problems(lines)]

        prometheus_sees_the_proxy(lab)

        # Keys are readable by the services' uid only; certificates world-readable.
        files = ("/certs/ca.pem", "/certs/server.pem", "/certs/server.key")
        stdout, _, _ = lab.exec_in_container(["stat", "-c", "%n %a %u", *files], "proxy")
        assert dict(line.split(" ", 1) for line in stdout.splitlines()) == {
            "/certs/ca.pem": "644 10001",
            "/certs/server.pem": "644 10001",
            "/certs/server.key": "600 10001",
        }

        # The lab cannot be walked around: clients reach no upstream, forge no header,
        # read no key but their own; the proxy holds no CA key (lab.py's probes).
        engine = Engine.connect()
        try:
            isolation = isolation_on_compose(engine, lab.project, Progress(quiet=True))
        finally:
            engine.close()
        failed = [f"{c.name}: {c.detail}" for c in isolation.checks if not c.passed]
        assert isolation.passed, failed or isolation.error
        # five clients, the proxy, the metrics listener from client-a and upstream1,
        # forgery, served
        assert len(isolation.checks) == 5 * 3 + 1 + 2 + 2

        # `lab.py fault` on the compose lab: a network fault (a helper in upstream3's
        # namespace) and an application fault (upstream1's control socket), listed
        # with their time left, then cleared: no helper and no rule left.
        engine = Engine.connect()
        try:

            def fault(*argv: str) -> int:
                where = ["--compose", "--project", lab.project]
                return fault_cli.main(
                    parser().parse_args(["fault", *argv, *where]), engine, Progress(quiet=True)
                )

            compose = parser().parse_args(["fault", "list", "--compose", "--project", lab.project])
            assert fault("add", "upstream3", "bandwidth", "50mbit", "--for", "60s") == 0
            assert fault("add", "upstream1", "delay", "10ms", "--for", "60s") == 0
            active = {
                f.target: f for f in fault_cli.faults_of(engine, fault_cli.locate(engine, compose))
            }
            assert (active["upstream3"].family, active["upstream1"].family) == (
                "network",
                "application",
            )
            assert 0 < (active["upstream3"].left(time.time()) or 0) <= 60
            assert fault("clear") == 0
            assert fault_cli.faults_of(engine, fault_cli.locate(engine, compose)) == []
            assert not [
                i
                for i in engine.labelled(LABEL_FAULT)
                if i.kind == "container" and i.labels.get(COMPOSE_PROJECT) == lab.project
            ]
        finally:
            engine.close()

        # An upstream container stops: nobody notices but the proxy. (Docker's resolver
        # hangs ~10 s on a stopped container's name; that once starved every dial.)
        upstream2 = lab.get_container("upstream2")
        assert upstream2.ID is not None
        engine = Engine.connect()
        try:
            stopped = time.time()
            engine.kill(upstream2.ID, "SIGTERM")
            assert engine.wait(upstream2.ID, 15) == 0
        finally:
            engine.close()

        def a_hundred_after_the_stop() -> list[Attempt] | None:
            after = attempts_since(lab, STEADY, stopped)
            failed = [a for a in after if not a.ok]
            assert not failed, [a.line.text for a in failed]
            return after if len(after) >= 100 else None

        wait_until("100 attempts after the stop", a_hundred_after_the_stop, timeout=60, poll=1)
    # `down --volumes` left nothing of the project.
    engine = Engine.connect()
    try:
        assert engine.labelled(f"{COMPOSE_PROJECT}={lab.project}") == []
    finally:
        engine.close()
