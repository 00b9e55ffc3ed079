"""The compose lab end to end: build, ``up``, traffic through the proxy, ``down -v``.

Needs a docker engine (skipped without one; failed when CI=true). The images are built
by ``scripts/setup`` (see conftest); the lab runs under a unique compose project name
and is always taken down, after which nothing with its project label may remain.
Nothing sleeps for a fixed time: the test polls the clients' JSON logs with a deadline.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest

from tests.e2e.conftest import ComposeProject, json_lines

pytestmark = pytest.mark.e2e

DEADLINE = 60.0  # seconds from `up -d` returning to the traffic condition holding
POLL = 0.5
ENOUGH = 3  # ok attempts per watched client


@dataclass
class Traffic:
    """What the watched clients have seen so far."""

    ok: dict[str, Counter[str]] = field(default_factory=dict)
    other: dict[str, Counter[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, lab: ComposeProject, services: tuple[str, ...]) -> Traffic:
        traffic = cls()
        for service in services:
            ok: Counter[str] = Counter()
            other: Counter[str] = Counter()
            for attempt in lab.attempts(service):
                if attempt.get("outcome") == "ok" and attempt.get("upstream"):
                    ok[str(attempt["upstream"])] += 1
                else:
                    other[str(attempt.get("outcome"))] += 1
            traffic.ok[service], traffic.other[service] = ok, other
        return traffic

    def violations(self) -> list[str]:
        """Routing that the reference config forbids (fail at once, do not wait)."""
        problems = []
        if self.ok["client-a"]["u1"]:
            problems.append(f"client.a reached u1 (denied): {dict(self.ok['client-a'])}")
        if set(self.ok["client-c"]) - {"u3"}:
            problems.append(f"client.c reached more than u3: {dict(self.ok['client-c'])}")
        return problems

    def done(self) -> bool:
        return all(self.ok[s].total() >= ENOUGH for s in ("client-a", "client-b", "client-c"))

    def __str__(self) -> str:
        return ", ".join(f"{s}: ok {dict(self.ok[s])} other {dict(self.other[s])}" for s in self.ok)


def wait_for_traffic(lab: ComposeProject) -> Traffic:
    """Poll the client logs until the condition holds; fail on a violation or timeout."""
    watched = ("client-a", "client-b", "client-c")
    deadline = time.monotonic() + DEADLINE
    while True:
        traffic = Traffic.read(lab, watched)
        problems = traffic.violations()
        if problems:
            pytest.fail("; ".join(problems) + "\n" + lab.diagnostics(), pytrace=False)
        if traffic.done():
            return traffic
        if time.monotonic() > deadline:
            pytest.fail(
                f"no {ENOUGH} ok attempts per client within {DEADLINE:.0f} s: {traffic}\n"
                + lab.diagnostics(),
                pytrace=False,
            )
        time.sleep(POLL)


def certs_listing(lab: ComposeProject) -> dict[str, str]:
    """``path -> "mode uid:gid"`` for some files in the proxy's /certs."""
    files = ("/certs/ca.pem", "/certs/server.pem", "/certs/server.key", "/certs/client.b.key")
    proc = lab.compose("exec", "-T", "proxy", "stat", "-c", "%n %a %u:%g", *files)
    return dict(line.split(" ", 1) for line in proc.stdout.splitlines())


def utc_now() -> str:
    """Now in the logs' ``ts`` format, so timestamps compare as strings."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def attempts_since(lab: ComposeProject, services: tuple[str, ...], since: str) -> Counter[str]:
    return Counter(
        str(a.get("outcome"))
        for service in services
        for a in lab.attempts(service)
        if str(a.get("ts", "")) > since
    )


def survive_a_stopped_upstream(lab: ComposeProject) -> Counter[str]:
    """``docker compose stop upstream2``, then every client attempt must still succeed.

    Upstreams are reached by name here: a stopped container's name hangs in Docker's
    resolver for ~10 s per lookup, which once starved every dial (see resolver.py)."""
    watched = ("client-a", "client-b", "client-d", "client-e")
    lab.compose("stop", "upstream2")
    stopped = utc_now()
    deadline = time.monotonic() + DEADLINE
    while True:
        outcomes = attempts_since(lab, watched, stopped)
        if outcomes.total() - outcomes["ok"]:
            pytest.fail(
                f"attempts failed after upstream2 stopped: {dict(outcomes)}\n" + lab.diagnostics(),
                pytrace=False,
            )
        if outcomes["ok"] >= 100:  # ~15 s of traffic from four clients: past DNS timeouts
            return outcomes
        if time.monotonic() > deadline:
            pytest.fail(f"too little traffic after the stop: {dict(outcomes)}", pytrace=False)
        time.sleep(POLL)


def identities_at(lab: ComposeProject, service: str) -> set[str]:
    """Identities an upstream learned from PROXY v2 headers, checked against the message."""
    found = set()
    for record in lab.records(service):
        if record.get("event") == "connection" and record.get("proxy_protocol") == "v2-proxy":
            assert record["message"] == f"Hello from {record['identity']}", record
            found.add(str(record["identity"]))
    return found


def test_lab_routes_clients_and_leaves_nothing(compose: ComposeProject) -> None:
    lab = compose
    try:
        lab.up()
        traffic = wait_for_traffic(lab)
        assert set(traffic.ok["client-b"]) <= {"u1", "u2", "u3"}, traffic
        assert set(traffic.ok["client-c"]) == {"u3"}, traffic
        assert "u1" not in traffic.ok["client-a"], traffic

        health = lab.compose("ps", "--format", "{{.Service}} {{.Health}}", "proxy").stdout
        assert health.split() == ["proxy", "healthy"], health

        # Keys readable by the services' uid only; certificates world-readable.
        assert certs_listing(lab) == {
            "/certs/ca.pem": "644 10001:10001",
            "/certs/server.pem": "644 10001:10001",
            "/certs/server.key": "600 10001:10001",
            "/certs/client.b.key": "600 10001:10001",
        }

        # The upstreams learn each client's identity from the proxy (PROXY v2).
        assert identities_at(lab, "upstream3") >= {"client.c"}

        # An upstream container stops: nobody notices but the proxy.
        survive_a_stopped_upstream(lab)

        # certgen is idempotent: a re-run keeps every file.
        rerun = json_lines(lab.compose("run", "--rm", "--no-deps", "certgen").stdout)
        assert rerun, "certgen printed no summary"
        assert rerun[-1]["created"] == [], rerun
        assert {"ca", "server", "client.a", "client.e"} <= set(rerun[-1]["kept"]), rerun
    finally:
        lab.down()
    assert lab.leftovers() == {"containers": [], "networks": [], "volumes": []}
