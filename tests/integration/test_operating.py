"""PROXY protocol v2 towards upstreams and the global connection cap, through a real proxy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

import pytest
import uvloop

from l4proxy import proxyproto
from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, TlsClient, client_context, read_plain
from upstream import proxyproto as reader


def test_a_v2_upstream_learns_the_client_address_and_identity(lab: Lab) -> None:
    (upstream,) = lab.start_upstreams(["record"])
    lab.start_proxy(lab.config(proxy_protocol="v2"))

    async def main() -> tuple[tuple[str, int], bytes, End | None]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            local = client.writer.get_extra_info("sockname")
            await client.send(b"hello")
            await client.close_notify()
            return (local[0], local[1]), await client.recv_all(), client.end
        finally:
            await client.aclose()

    local, reply, end = uvloop.run(main())
    assert (reply, end) == (b"", End.CLOSE_NOTIFY)
    (access,) = lab.logs.wait_for("access", decision="forwarded")
    received = lab.up_loop.call(lambda: list(upstream.stats.received))
    carried = [data for data in received if data.endswith(b"hello")]
    assert len(carried) == 1, received
    parsed = reader.parse_v2(carried[0])
    assert isinstance(parsed, reader.Header), parsed
    assert carried[0][parsed.length :] == b"hello"  # the payload follows, untouched
    assert parsed.command == "proxy"
    assert parsed.source == local
    assert parsed.destination == lab.address
    assert parsed.identity == "client.b"
    assert parsed.unique_id == str(access["conn"])
    assert parsed.ssl is not None
    assert (parsed.ssl.verify, parsed.ssl.cn) == (0, "client.b")
    assert parsed.ssl.version == access["tls_version"]
    assert access["bytes_up"] == 5  # the header is not client traffic


def test_health_checks_to_a_v2_upstream_send_a_local_header(lab: Lab) -> None:
    plain, v2 = lab.start_upstreams(["record", "record"])
    upstreams = [plain.address, {"address": v2.address, "proxy_protocol": "v2"}]
    lab.start_proxy(lab.config(upstreams))  # type: ignore[arg-type]

    def local_header_seen() -> bool:
        return proxyproto.local_header() in lab.up_loop.call(lambda: list(v2.stats.received))

    wait_for("a LOCAL header at the v2 upstream", local_header_seen)
    wait_for(
        "an empty probe at the plain upstream",
        lambda: lab.up_loop.call(lambda: plain.stats.empty) >= 1,
    )
    assert lab.up_loop.call(lambda: plain.stats.received) == []  # its probes send nothing


def test_max_connections_refuses_the_one_too_many_and_says_so(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(max_connections=2))

    async def main() -> tuple[bytes, bytes]:
        ctx = client_context(lab.certs, "client.b")
        held = [await TlsClient.connect(lab.address, ctx) for _ in range(2)]
        try:
            for client in held:
                await client.send(b"ping")
                assert await client.recv_exactly(4) == b"ping"
            refused = await read_plain(lab.address)  # closed at once, before any TLS
            await held[0].close_notify()
            await held[0].recv_all()
            await held[0].aclose()
            await asyncio.to_thread(lab.logs.wait_for, "capacity", state="available")
            again = await TlsClient.connect(lab.address, ctx)
            await again.send(b"pong")
            answer = await again.recv_exactly(4)
            await again.aclose()
            return refused, answer
        finally:
            for client in held:
                await client.aclose()

    refused, answer = uvloop.run(main())
    assert refused == b""
    assert answer == b"pong"
    (full,) = lab.logs.events("capacity", state="full")
    assert (full["max_connections"], full["open_connections"]) == (2, 2)
    assert "max_connections (2) reached" in full["message"]
    (available,) = lab.logs.events("capacity", state="available")
    assert available["refused"] == 1
    (over,) = lab.logs.wait_for("access", decision="over_capacity")
    assert over["reason"] == "max_connections 2 reached"
    assert over["client"] is None
    # One line per connection: the refused one's socket going away adds none.
    lines = lab.logs.wait_for("access", count=4)
    assert sorted(r["decision"] for r in lines) == ["forwarded"] * 3 + ["over_capacity"]


def test_a_tcp_probe_never_counts_against_the_cap_once_it_is_gone(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(max_connections=1))
    for done in range(1, 4):
        with socket.create_connection(lab.address):
            pass
        lab.logs.wait_for("access", count=done, decision="tls_failed")
        wait_for("no open connection", lambda: lab.open_connections() == 0)
    assert lab.logs.events("access", decision="over_capacity") == []


@pytest.mark.single_process("queues connections on the proxy's listener by not yielding its loop")
def test_a_drain_serves_the_clients_already_queued_on_the_listener(lab: Lab) -> None:
    """Clients the kernel had connected when the drain began, but the proxy had not
    accepted yet, are served like the open connections: closing the listener would
    have reset them."""
    lab.start_upstreams(["echo"])
    proxy = lab.start_proxy(lab.config(timeouts={"drain": "10s"}))
    assert lab.address is not None
    address = lab.address
    ctx = client_context(lab.certs, "client.e")
    queued: concurrent.futures.Future[list[socket.socket]] = concurrent.futures.Future()

    async def connect_then_drain() -> str:
        # In the proxy's own loop, without yielding: nothing is accepted in between.
        clients = [socket.create_connection(address, timeout=10) for _ in range(4)]
        queued.set_result(clients)
        return await proxy.drain(10.0)

    draining = asyncio.run_coroutine_threadsafe(connect_then_drain(), lab.proxy_loop.loop)

    def request(raw: socket.socket) -> bytes | str:
        try:
            with ctx.wrap_socket(raw, server_hostname="proxy") as tls:
                tls.sendall(b"queued")
                reply = tls.recv(64)
                tls.unwrap()
                return reply
        except OSError as exc:
            return type(exc).__name__

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(request, queued.result(timeout=10)))
    assert replies == [b"queued"] * 4
    assert draining.result(timeout=15) == "drained"
    access = lab.logs.wait_for("access", count=4)
    assert [r["decision"] for r in access] == ["forwarded"] * 4
    lab.proxy = None  # stopped: nothing left for the harness to stop
