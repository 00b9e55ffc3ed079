"""Failover end to end: an upstream is killed under steady traffic, then started again.

Three upstreams, the reference rules, health checks every 500 ms; clients a, b, c and d
connect every 100-300 ms (rate limit off: that is faster than the reference 2/s).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from labkit import checks as ck
from labkit.logs import Attempt
from labkit.testing import (
    Certificates,
    ClientContainer,
    LabContainer,
    LabNetwork,
    ProxyContainer,
    UpstreamContainer,
    proxy_config,
)

pytestmark = pytest.mark.e2e

CLIENTS = ("client.a", "client.b", "client.c", "client.d")
TARGET = "u2"
SLACK = 0.05  # seconds: the logs' millisecond timestamps, the engine's clock


@pytest.fixture
def steady(
    lab_network: LabNetwork, lab_upstream_network: LabNetwork, certificates: Certificates
) -> Iterator[tuple[list[UpstreamContainer], ProxyContainer, list[ClientContainer]]]:
    upstreams = [
        UpstreamContainer(name, network=lab_upstream_network)
        .with_proxy_protocol("v2")
        .with_trusted_proxy("proxy")
        for name in ("u1", "u2", "u3")
    ]
    config = proxy_config(
        upstreams,
        {
            "health_check": {"interval": "500ms", "timeout": "300ms"},
            "timeouts": {"connect": "500ms"},
            "rate_limit": {"enabled": False},
        },
    )
    proxy = ProxyContainer(
        certificates, config, network=lab_network, upstream_network=lab_upstream_network
    )
    clients = [
        ClientContainer(c, certificates, network=lab_network)
        .with_interval("100ms", "300ms")
        .with_timeout("2s")
        for c in CLIENTS
    ]
    started: list[LabContainer] = []
    try:
        for container in [*upstreams, proxy, *clients]:
            container.start()
            started.append(container)
        yield upstreams, proxy, clients
    finally:
        for container in reversed(started):
            container.stop()


def all_attempts(clients: list[ClientContainer]) -> list[Attempt]:
    return sorted((a for c in clients for a in c.attempts()), key=lambda a: a.end)


def test_a_killed_upstream_gets_no_traffic_and_costs_only_connections_in_flight(
    steady: tuple[list[UpstreamContainer], ProxyContainer, list[ClientContainer]],
) -> None:
    upstreams, proxy, clients = steady
    target = next(u for u in upstreams if u.lab_name == TARGET)

    proxy.wait_for(
        f"replies from {TARGET}",
        lambda: ck.replies_from(all_attempts(clients), TARGET, 0.0) or None,
        timeout=20,
    )
    fault_at = target.kill()
    down = proxy.wait_for(
        f"the proxy to mark {TARGET} down",
        lambda: ck.first_transition(proxy.health(), TARGET, "down", fault_at),
        timeout=10,
    )
    # Health window: one interval, one timeout, and the check in flight.
    assert down.ts - fault_at < 0.5 + 0.3 + 1.0, down

    def after_down() -> list[Attempt] | None:
        found = [a for a in all_attempts(clients) if a.start > down.ts + SLACK]
        return found if len(found) >= 20 else None

    later = proxy.wait_for("20 attempts after the mark-down", after_down, timeout=20)
    stray = ck.replies_from(all_attempts(clients), TARGET, down.ts + SLACK)
    assert not stray, [a.line.text for a in stray]
    assert all(a.ok for a in later), ck.outcome_counts(later)

    restarted = target.restart()
    up = proxy.wait_for(
        f"the proxy to mark {TARGET} up again",
        lambda: ck.first_transition(proxy.health(), TARGET, "up", restarted),
        timeout=15,
    )
    proxy.wait_for(
        f"replies from {TARGET} again",
        lambda: ck.replies_from(all_attempts(clients), TARGET, up.ts) or None,
        timeout=15,
    )

    attempts = [a for c in clients for a in c.finish()]
    account = ck.account_failures(
        attempts,
        proxy.access(),
        clients=CLIENTS,
        target=TARGET,
        fault_at=fault_at,
        detected=down.ts,
        slack=SLACK,
    )
    assert not account.unexplained, [a.line.text for a in account.unexplained]
    assert len(attempts) > 40, ck.outcome_counts(attempts)
