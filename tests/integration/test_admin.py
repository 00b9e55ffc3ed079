"""The admin listener over real HTTP: /ready, /status, /metrics after known traffic."""

from __future__ import annotations

import asyncio
import socket

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import Lab
from tests.support.tlsclient import End, TlsClient, client_context, exchange

REPLY = b"Reply from upstream "


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def metric(lab: Lab, metric_name: str, /, **labels: str) -> float:
    status, headers, body = lab.admin("/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    return samples(body).get((metric_name, tuple(sorted(labels.items()))), 0.0)


def test_ready_needs_an_upstream_that_is_up(lab: Lab) -> None:
    (upstream,) = lab.start_upstreams(["echo"])
    lab.start_proxy()
    assert lab.admin_json("/ready") == (200, {"ready": True, "reason": "ready"})
    lab.up_loop.run(upstream.stop())
    lab.logs.wait_for("health", new="down")
    assert lab.admin_json("/ready") == (503, {"ready": False, "reason": "no upstream is up"})
    lab.up_loop.run(upstream.start())
    lab.logs.wait_for("health", new="up", old="down")
    assert lab.admin_json("/ready")[0] == 200


def test_status_shows_upstreams_config_and_certificate(lab: Lab) -> None:
    ups = lab.start_upstreams(["reply", "reply"])
    path = lab.write_config(lab.certs / "status.yaml")
    lab.start_proxy(path=path)
    status, body = lab.admin_json("/status")
    assert status == 200
    assert body["state"] == "serving"
    assert body["ready"] is True
    assert body["config"]["path"] == str(path)
    assert len(body["config"]["sha256"]) == 64
    assert body["config"]["last_reload"] is None
    assert body["tls"]["certificate"]["subject"].startswith("CN=")
    assert [u["address"] for u in body["upstreams"]] == [u.address for u in ups]
    for entry in body["upstreams"]:
        assert entry["health"] == "up"
        assert entry["active_connections"] == 0
        assert entry["last_check"]["ok"] is True
        assert entry["last_check"]["reason"] == "connected"
    assert body["connections"] == {
        "open": 0,
        "forwarding": 0,
        "max_connections": 0,
        "accepted": 0,
    }


def test_metrics_count_known_traffic(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    rules = [{"client": "client.d", "action": "deny", "upstream": "*"}]
    lab.start_proxy(
        lab.config(
            rate_limit={"enabled": True, "rate": 0.001, "burst": 2},
            authorization={"default": "allow", "rules": rules},
        )
    )
    up = lab.upstreams[0].address

    async def traffic() -> list[tuple[bytes, End | None]]:
        results = []
        for payload in (b"a" * 1000, b"b" * 234):
            results.append(
                await exchange(lab.address, client_context(lab.certs, "client.b"), payload)
            )
        results.append(await exchange(lab.address, client_context(lab.certs, "client.b")))
        results.append(await exchange(lab.address, client_context(lab.certs, "client.d")))
        return results

    results = uvloop.run(traffic())
    assert [len(data) for data, _ in results] == [1000, 234, 0, 0]
    with socket.create_connection(lab.address):
        pass  # a TCP probe: a handshake failure with reason closed_without_data
    lab.logs.wait_for("access", count=5)

    assert metric(lab, "l4proxy_connections_accepted_total") == 5
    assert metric(lab, "l4proxy_connections_closed_total", decision="forwarded") == 2
    assert metric(lab, "l4proxy_connections_closed_total", decision="rate_limited") == 1
    assert metric(lab, "l4proxy_connections_closed_total", decision="denied") == 1
    assert metric(lab, "l4proxy_connections_closed_total", decision="tls_failed") == 1
    assert metric(lab, "l4proxy_bytes_total", upstream=up, direction="up") == 1234
    assert metric(lab, "l4proxy_bytes_total", upstream=up, direction="down") == 1234
    assert metric(lab, "l4proxy_rate_limited_total", client="client.b", reason="rate") == 1
    assert metric(lab, "l4proxy_denied_total", client="client.d") == 1
    assert metric(lab, "l4proxy_handshake_failures_total", reason="closed_without_data") == 1
    assert metric(lab, "l4proxy_upstream_health", upstream=up, name=up, state="up") == 1
    assert metric(lab, "l4proxy_upstream_health", upstream=up, name=up, state="down") == 0
    assert metric(lab, "l4proxy_connections_active", state="forwarding") == 0
    checks = metric(lab, "l4proxy_health_checks_total", upstream=up, result="ok")
    assert checks >= 1
    assert metric(lab, "l4proxy_health_check_duration_seconds_count", upstream=up) >= checks
    assert metric(lab, "l4proxy_health_check_duration_seconds_bucket", upstream=up, le="+Inf") >= 1
    assert metric(lab, "l4proxy_draining") == 0
    assert metric(lab, "process_open_fds") > 0


def test_open_connections_show_in_active_gauges_and_bytes_as_they_flow(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    up = lab.upstreams[0].address

    async def main() -> tuple[float, float, float]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"x" * 100)
            assert await client.recv_exactly(100) == b"x" * 100
            return await asyncio.to_thread(
                lambda: (
                    metric(lab, "l4proxy_connections_active", state="forwarding"),
                    metric(lab, "l4proxy_upstream_active_connections", upstream=up, name=up),
                    metric(lab, "l4proxy_bytes_total", upstream=up, direction="down"),
                )
            )
        finally:
            await client.aclose()

    forwarding, on_upstream, down = uvloop.run(main())
    assert (forwarding, on_upstream, down) == (1, 1, 100)


def test_admin_http_edges(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    status, _, body = lab.admin("/nope")
    assert status == 404
    status, headers, _ = lab.admin("/metrics", method="POST")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"
    status, headers, _ = lab.admin("/reload")
    assert (status, headers["Allow"]) == (405, "POST")
    status, headers, body = lab.admin("/status", method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) > 0
    assert lab.admin("/")[0] == 200
    # Not HTTP at all: a 400, and the proxy keeps serving.
    assert lab.proxy is not None
    assert lab.proxy.admin_address is not None
    with socket.create_connection(lab.proxy.admin_address, timeout=5) as raw:
        raw.sendall(b"hello there\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 400 ")
    with socket.create_connection(lab.proxy.admin_address, timeout=5) as raw:
        raw.sendall(b"GET /status HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n")
        assert raw.recv(100).startswith(b"HTTP/1.1 431 ")
    assert lab.admin_json("/ready")[0] == 200


def test_admin_listener_can_be_turned_off(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    proxy = lab.start_proxy(lab.config(admin={"listen": ""}))
    assert proxy.admin_address is None
    (listening,) = lab.logs.events("listening")
    assert listening["admin"] is None
