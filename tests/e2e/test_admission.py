"""Admission end to end: authorization, PROXY v2 identities, rate limit and mTLS refusal,
on one topology started through testcontainers: the reference proxy config
(``lab/proxy.yaml``) in front of three upstreams, plus one rule denying client.x
everywhere. Segmented as the lab is: clients and the proxy on the front network, the
proxy and the upstreams on the back one, and the upstreams trust only the proxy.
Expectations are computed from that config, not written out by hand.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from labkit import checks as ck
from labkit import topology as topo
from labkit.logs import Attempt
from labkit.testing import (
    Certificates,
    ClientContainer,
    LabNetwork,
    ProxyContainer,
    UpstreamContainer,
    proxy_config,
)

pytestmark = pytest.mark.e2e

DENIED_EVERYWHERE = "client.x"
ROUTED = ("client.a", "client.b", "client.c", DENIED_EVERYWHERE)


@dataclass
class Lab:
    network: LabNetwork
    certificates: Certificates
    upstreams: list[UpstreamContainer]
    proxy: ProxyContainer
    config: dict[str, Any]

    def client(self, client_id: str) -> ClientContainer:
        return ClientContainer(client_id, self.certificates, network=self.network)

    def allowed(self, client_id: str) -> set[str]:
        return ck.allowed_upstreams(
            client_id, self.config["upstreams"], self.config["authorization"]
        )

    def upstream_identities(self) -> dict[str, set[str]]:
        return {u.lab_name: u.identities() for u in self.upstreams}


@pytest.fixture(scope="module")
def lab(
    lab_network: LabNetwork, lab_upstream_network: LabNetwork, certificates: Certificates
) -> Iterator[Lab]:
    reference = topo.load_reference_config()
    rules = [*reference["authorization"]["rules"]]
    rules.append({"client": DENIED_EVERYWHERE, "action": "deny", "upstream": "*"})
    upstreams = [
        UpstreamContainer(name, network=lab_upstream_network)
        .with_proxy_protocol("v2")
        .with_trusted_proxy("proxy")
        for name in ("u1", "u2", "u3")
    ]
    for upstream in upstreams:
        upstream.start()
    try:
        config = proxy_config(
            upstreams,
            {"authorization": {"rules": rules}, "health_check": {"interval": "1s"}},
        )
        proxy = ProxyContainer(
            certificates, config, network=lab_network, upstream_network=lab_upstream_network
        )
        with proxy:
            yield Lab(lab_network, certificates, upstreams, proxy, config)
    finally:
        for upstream in upstreams:
            upstream.stop()


@pytest.fixture(scope="module")
def routed(lab: Lab) -> dict[str, list[Attempt]]:
    """client.a, .b, .c and .x, 8 attempts each at intervals (>= 0.5 s) that keep every
    one of them under the reference rate limit (2/s, burst 4)."""
    clients = [lab.client(c).with_count(8).with_interval("500ms", "700ms") for c in ROUTED]
    for client in clients:
        client.start()
    try:
        return {c.lab_name: c.finish(timeout=60) for c in clients}
    finally:
        for client in clients:
            client.stop()


def replies(attempts: list[Attempt]) -> Counter[str]:
    return ck.counts_by_upstream(attempts)


def test_authorization_follows_the_reference_rules(
    lab: Lab, routed: dict[str, list[Attempt]]
) -> None:
    # The reference rules, as the issue states them, are what the config says.
    assert lab.allowed("client.a") == {"u2", "u3"}
    assert lab.allowed("client.c") == {"u3"}
    assert lab.allowed(DENIED_EVERYWHERE) == set()

    for client_id, attempts in routed.items():
        allowed = lab.allowed(client_id)
        assert len(attempts) == 8, (client_id, attempts)
        wrong = [a for a in attempts if not ck.follows_rules(a, allowed)]
        assert not wrong, f"{client_id} (allowed {sorted(allowed)}): {wrong}"
    # Not asserted: that client.a's 8 replies name both u2 and u3. With connections this
    # short, least connections meets ties and takes the upstream after the last pick,
    # whoever made it: right after client.c's pick (always u3) that is u2, so all 8 can
    # land on u2 (seen once). Balancing is held by test_admission (integration).
    assert set(replies(routed["client.a"])) <= {"u2", "u3"}
    assert set(replies(routed["client.c"])) == {"u3"}

    # The proxy says why: each of client.x's connections denied, none forwarded.
    mine = [a for a in lab.proxy.access() if a.client == DENIED_EVERYWHERE]
    assert len(mine) == 8
    assert {(a.decision, a.reason) for a in mine} == {("denied", "no_allowed_upstream")}
    # ... and no upstream ever saw client.x.
    seen = lab.upstream_identities()
    assert all(DENIED_EVERYWHERE not in identities for identities in seen.values()), seen


def test_each_upstream_learns_the_identity_whose_bytes_it_got(
    lab: Lab, routed: dict[str, list[Attempt]]
) -> None:
    for upstream in lab.upstreams:
        lines = [line for line in upstream.lines() if line.event == "connection"]
        # Every connection that carried bytes came with a PROXY v2 header naming the
        # client, and the message in it is that client's ("Hello from <identity>").
        assert not ck.identity_problems(lines), [x.text for x in ck.identity_problems(lines)]
        expected = {c for c, attempts in routed.items() if replies(attempts)[upstream.lab_name]}
        assert expected <= upstream.identities(), (upstream.lab_name, expected)


def test_a_burst_client_is_admitted_at_rate_and_burst_and_a_polite_one_never_refused(
    lab: Lab,
) -> None:
    enabled, rate, burst = topo.rate_limit(lab.config)
    assert enabled
    gap = 1.0 / rate + 0.1  # the polite client keeps under the rate
    greedy = lab.client("client.burst").with_burst().with_duration("4s").with_timeout("3s")
    polite = lab.client("client.polite").with_interval(f"{gap:.2f}s", f"{gap + 0.2:.2f}s")
    with greedy, polite.with_duration("4s"):
        greedy_attempts = greedy.finish(timeout=30)
        polite_attempts = polite.finish(timeout=30)
    access = lab.proxy.access()

    mine = [a for a in access if a.client == "client.burst"]
    verdict = ck.bucket_verdict(mine, rate, burst)
    assert verdict.within, verdict.describe(rate, burst)
    assert verdict.limited > 0, verdict.describe(rate, burst)
    assert {a.reason for a in mine if a.decision == "rate_limited"} == {"rate"}
    outcomes = ck.outcome_counts(greedy_attempts)
    assert outcomes["ok"] == verdict.admitted, (outcomes, verdict)
    assert outcomes["rejected"] == verdict.limited, (outcomes, verdict)

    assert polite_attempts, "the polite client made no attempt"
    assert all(a.ok for a in polite_attempts), ck.outcome_counts(polite_attempts)
    refused = [a for a in access if a.client == "client.polite" and a.decision != "forwarded"]
    assert not refused, [a.line.text for a in refused]


BAD_CREDENTIALS = {
    # client id: (how it is built, the proxy's tls_failed reason)
    "client.nocert": ("without", "peer_did_not_return_a_certificate"),
    "client.otherca": ("own", "certificate: unable to get local issuer certificate"),
    "client.expired": ("own", "certificate: certificate has expired"),
    "client.server": ("server", "certificate: unsuitable certificate purpose"),
}


def test_bad_client_certificates_are_refused_and_reach_no_upstream(lab: Lab) -> None:
    clients: list[ClientContainer] = []
    for client_id, (how, _) in BAD_CREDENTIALS.items():
        client = lab.client(client_id).with_count(3).with_interval("100ms", "200ms")
        if how == "without":
            client.without_certificate()
        elif how == "server":
            client.with_certificate("server")
        clients.append(client)
    valid = lab.client("client.d").with_count(3).with_interval("500ms", "600ms")
    for client in [*clients, valid]:
        client.start()
    try:
        results = {c.lab_name: c.finish(timeout=60) for c in [*clients, valid]}
    finally:
        for client in [*clients, valid]:
            client.stop()

    for client_id in BAD_CREDENTIALS:
        attempts = results[client_id]
        assert len(attempts) == 3, attempts
        assert not [a for a in attempts if a.ok], attempts
    assert [a.outcome for a in results["client.d"]] == ["ok"] * 3

    # The proxy refused each at the handshake, with the reason; nothing was forwarded.
    refused = [a for a in lab.proxy.access() if a.decision == "tls_failed"]
    reasons = Counter(a.reason for a in refused)
    for client_id, (_, reason) in BAD_CREDENTIALS.items():
        assert reasons[reason] >= 3, (client_id, reason, reasons)
    forwarded_to = lab.upstream_identities()
    for identities in forwarded_to.values():
        assert not identities & set(BAD_CREDENTIALS), forwarded_to
