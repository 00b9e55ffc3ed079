"""The admin listener over real HTTP: /ready, /status, /metrics after known traffic."""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from l4proxy import admin, adminctl
from l4proxy.admin import ADMIN_HEADER, AdminServer, Request, Response
from labkit import topology as topo
from tests.support.harness import Lab
from tests.support.loops import wait_for
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


def test_labkits_ready_probe_follows_ready(lab: Lab) -> None:
    """The run's container health check (labkit's READY_PROBE, a bare Python): exit 0
    while /ready says 200, 1 once it says 503."""
    (upstream,) = lab.start_upstreams(["echo"])
    proxy = lab.start_proxy()
    assert proxy.admin_address is not None
    host, port = proxy.admin_address
    argv = topo.ready_probe({"admin": {"listen": f"{host}:{port}"}})
    assert argv[:4] == ["python3", "-I", "-S", "-c"]

    def probe() -> int:
        done = subprocess.run([sys.executable, *argv[1:]], timeout=10, check=False)
        return done.returncode

    assert probe() == 0
    lab.up_loop.run(upstream.stop())
    lab.logs.wait_for("health", new="down")
    assert probe() == 1


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
        "handshaking": 0,
        "closing": 0,
        "max_connections": 0,
        "max_handshakes": 256,
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


def test_the_metrics_listener_serves_metrics_and_ready_and_nothing_else(lab: Lab) -> None:
    """admin.metrics_listen: what a scraper on another network may reach. It reads the
    same counters; /status and POST /reload are not there, even with the admin header."""
    lab.start_upstreams(["echo"])
    proxy = lab.start_proxy(
        lab.config(admin={"listen": "127.0.0.1:0", "metrics_listen": "localhost:0"})
    )
    metrics = proxy.metrics_address
    assert metrics is not None
    assert metrics != proxy.admin_address
    (listening,) = lab.logs.events("listening")
    assert listening["metrics"] == f"{metrics[0]}:{metrics[1]}"
    uvloop.run(exchange(lab.address, client_context(lab.certs, "client.b"), b"ping"))
    lab.logs.wait_for("access")
    status, headers, body = lab.admin("/metrics", address=metrics)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    up = lab.upstreams[0].address
    found = samples(body)
    assert found["l4proxy_connections_accepted_total", ()] == 1
    assert found["l4proxy_upstream_forwarded_total", (("upstream", up),)] == 1
    assert lab.admin("/ready", address=metrics)[0] == 200
    assert lab.admin("/status", address=metrics)[0] == 404
    assert lab.admin("/reload", method="POST", address=metrics)[0] == 404
    assert lab.admin("/", address=metrics)[2] == b"layer4lab proxy admin: GET /metrics /ready\n"
    assert lab.admin("/status")[0] == 200  # the admin listener still has everything
    lab.proxy_loop.run(proxy.stop())
    lab.proxy = None  # stopped here
    assert not lab.logs.events("error")
    with pytest.raises(ConnectionRefusedError):  # closed with the proxy
        socket.create_connection(metrics, timeout=2).close()


# --- hardening: CSRF, strict parsing, slot deadline, bounded close ---------------------------


def admin_server(lab: Lab) -> AdminServer:
    assert lab.proxy is not None
    assert lab.proxy.admin is not None
    return lab.proxy.admin


def admin_address(lab: Lab) -> tuple[str, int]:
    assert lab.proxy is not None
    assert lab.proxy.admin_address is not None
    return lab.proxy.admin_address


def open_handlers(lab: Lab) -> int:
    server = admin_server(lab)
    return lab.proxy_loop.call(lambda: len(server.handlers))


def read_to_end(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (EOF or reset)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_post_reload_from_a_browser_is_refused_and_reloads_nothing(
    lab: Lab, tmp_path: Path
) -> None:
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml")
    lab.start_proxy(path=path)
    _, before = lab.admin_json("/status")
    deny_b = {
        "default": "allow",
        "rules": [{"client": "client.b", "action": "deny", "upstream": "*"}],
    }
    lab.write_config(path, authorization=deny_b)  # a valid edit a reload would apply
    refusals = [
        {ADMIN_HEADER: "1", "Origin": "http://example.invalid"},
        {ADMIN_HEADER: "1", "Origin": "null"},
        {ADMIN_HEADER: "1", "Sec-Fetch-Site": "cross-site"},
        {},  # what a cross-site form or fetch() without a preflight can send
        {"Content-Type": "text/plain", "Origin": "http://example.invalid"},
    ]
    for headers in refusals:
        status, _, body = lab.admin("/reload", "POST", headers=headers)
        assert status == 403, headers
        assert body.decode().strip() == admin.CSRF_REFUSAL
    _, after = lab.admin_json("/status")
    assert after["config"]["sha256"] == before["config"]["sha256"]
    assert after["config"]["last_reload"] is None
    assert lab.logs.events("reload") == []
    # Our own client (adminctl sends the header) still reloads, and the edit applies.
    status, body = adminctl.request(*admin_address(lab), "POST", "/reload")
    assert status == 200, body
    _, reloaded = lab.admin_json("/status")
    assert reloaded["config"]["sha256"] != before["config"]["sha256"]
    assert reloaded["config"]["last_reload"]["result"] == "ok"


@pytest.mark.parametrize(
    "length",
    [b"\xb2", "\u00b2".encode(), "\u0663".encode(), b"1 2", b"+5", b"9" * 5000],
    ids=["superscript-latin1", "superscript-utf8", "arabic-indic", "two", "sign", "huge"],
)
def test_a_bad_content_length_gets_400_or_413_and_logs_no_error(lab: Lab, length: bytes) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    with socket.create_connection(admin_address(lab), timeout=5) as raw:
        raw.sendall(
            b"POST /reload HTTP/1.1\r\nHost: x\r\n"
            + f"{ADMIN_HEADER}: 1\r\n".encode()
            + b"Content-Length: "
            + length
            + b"\r\n\r\n"
        )
        answer = read_to_end(raw)
    expected = b"HTTP/1.1 413 " if length.isdigit() else b"HTTP/1.1 400 "
    assert answer.startswith(expected), answer
    assert lab.admin_json("/ready")[0] == 200  # still serving
    assert lab.logs.events("error") == []
    assert lab.logs.events("reload") == []


def test_a_connection_beyond_max_clients_gets_503_at_the_slot_deadline(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    slot_timeout = 0.3
    monkeypatch.setattr(admin, "MAX_CLIENTS", 2)
    monkeypatch.setattr(admin, "SLOT_TIMEOUT", slot_timeout)
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    address = admin_address(lab)
    # Two connections that send nothing hold both slots (for REQUEST_TIMEOUT, 5 s).
    holders = [socket.create_connection(address, timeout=5) for _ in range(2)]
    try:
        wait_for("both slots taken", lambda: open_handlers(lab) == 2)
        # One that gives up while it waits (a reset): nothing to answer, nothing logged.
        quitter = socket.create_connection(address, timeout=5)
        wait_for("the quitter waiting", lambda: open_handlers(lab) == 3)
        quitter.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        quitter.close()
        wait_for("the quitter gone", lambda: open_handlers(lab) == 2)
        with socket.create_connection(address, timeout=5) as extra:
            started = time.monotonic()
            extra.sendall(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_to_end(extra)
            waited = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert b"\r\nRetry-After: 1\r\n" in answer
        assert waited < slot_timeout + 1.0
    finally:
        for sock in holders:
            sock.close()
    # The holders' slots come back when they go; none leaked to the refused one.
    wait_for("the holders gone", lambda: open_handlers(lab) == 0)
    for _ in range(3):
        assert lab.admin_json("/ready")[0] == 200


def test_a_client_that_stops_reading_is_aborted_after_timeouts_close(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    drain_timeout, close_timeout = 0.3, 0.3
    monkeypatch.setattr(admin, "REQUEST_TIMEOUT", drain_timeout)
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(timeouts={"close": f"{int(close_timeout * 1000)}ms"}))
    # A response far larger than the socket buffers can hold (a stand-in for a big
    # /metrics), so most of it waits in the transport's buffer.
    big = Response(200, b"m" * (32 * 1024 * 1024))
    whole = len(big.encode())

    def respond(request: Request) -> Response:
        return big

    monkeypatch.setattr(admin_server(lab), "respond", respond)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window
        client.settimeout(10)
        client.connect(admin_address(lab))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        wait_for("the admin connection to be served", lambda: open_handlers(lab) == 1)
        wait_for("the admin connection to be closed", lambda: open_handlers(lab) == 0)
        assert time.monotonic() - started < drain_timeout + close_timeout + 1.0
        # The proxy aborted the transport: the client gets what the kernel already
        # held, then EOF (or a reset), never the whole response.
        got = read_to_end(client)
    assert 0 < len(got) < whole
    assert got.startswith(b"HTTP/1.1 200 ")
    monkeypatch.undo()
    assert lab.admin_json("/ready")[0] == 200


def test_stopping_the_listener_closes_open_admin_connections_at_once_and_quietly(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin, "MAX_CLIENTS", 1)
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    # One connection reading its head, one waiting for the slot.
    clients = [socket.create_connection(admin_address(lab), timeout=5) for _ in range(2)]
    try:
        wait_for("both admin connections open", lambda: open_handlers(lab) == 2)
        started = time.monotonic()
        lab.proxy_loop.run(admin_server(lab).stop())
        assert time.monotonic() - started < 1.0
        assert open_handlers(lab) == 0
        for client in clients:
            assert read_to_end(client) == b""
    finally:
        for client in clients:
            client.close()
    assert lab.logs.events("error") == []  # a cancelled handler is not an error
