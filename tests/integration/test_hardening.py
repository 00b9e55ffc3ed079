"""Hardening through a real proxy: a bounded close (no socket held by a peer that stops
reading), handshake admission (silent connections cannot crowd out real clients),
revocation on reload and the connection lifetime cap."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import ssl
import time
from pathlib import Path

import pytest
import uvloop

from tests.support.harness import Lab
from tests.support.loops import await_condition
from tests.support.tlsclient import End, TlsClient, client_context

TCP_LISTEN = "0A"


def proxy_sockets(port: int) -> int:
    """TCP sockets whose local port is ``port`` (the proxy's side of its client
    connections; the listener excluded), read from the kernel's tables."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if int(local.rsplit(":", 1)[1], 16) == port and state != TCP_LISTEN:
                count += 1
    return count


@pytest.mark.single_process("waits for the connection's paused upstream transport")
def test_a_client_that_stops_reading_loses_its_socket_after_the_close_timeout(lab: Lab) -> None:
    """8 MiB from the upstream, a client that never reads, ``idle: 1s``: the idle close
    may not flush, so ``timeouts.close`` later the proxy resets it and frees everything.
    4 s after the client stopped reading no socket is left, and ``/status`` agrees."""
    lab.start_upstreams(["blast"], banner=os.urandom(8 << 20))
    lab.start_proxy(lab.config(timeouts={"idle": "1s", "close": "2s"}))
    port = lab.address[1]

    async def main() -> tuple[float, int]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, lab.address)
        # The TLS client reads only what its handshake needs, then stops reading.
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        ctx = client_context(lab.certs, "client.b")
        client = TlsClient(reader, writer, *_bios(ctx))
        try:
            await client.handshake()
            client.stop_reading()
            stopped = time.monotonic()
            await await_condition(
                "the proxy pausing its upstream (the client's window is full)",
                lambda: lab.proxy_loop.call(lambda: _paused(lab)),
            )
            await await_condition(
                "no proxy socket left", lambda: proxy_sockets(port) == 0, timeout=4.0
            )
            return time.monotonic() - stopped, proxy_sockets(port)
        finally:
            writer.transport.abort()

    gone, left = uvloop.run(main())
    assert left == 0
    assert gone <= 4.0
    _status, body = lab.admin_json("/status")
    assert (body["connections"]["open"], body["connections"]["closing"]) == (0, 0)
    assert lab.active() == [0]
    (line,) = lab.logs.wait_for("access")
    assert (line["reason"], line["close"]) == ("idle_timeout", "forced"), line
    _status, _headers, metrics = lab.admin("/metrics")
    assert b'l4proxy_connection_closes_total{close="forced"} 1.0' in metrics
    assert line["unsent_bytes"] > 0
    # Idle for 1 s, then 2 s to drain: the line is written when the socket is gone.
    assert 2900 <= line["duration_ms"] - (line["handshake_ms"] or 0) < 4500, line


def _bios(ctx: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    return ctx.wrap_bio(incoming, outgoing, server_hostname="localhost"), incoming, outgoing


def _paused(lab: Lab) -> bool:
    proxy = lab.proxy
    assert proxy is not None
    return any(conn.upstream_paused for conn in proxy.connections)


def test_a_clean_close_is_not_forced(lab: Lab) -> None:
    """A client that reads everything gets a graceful close, logged as such."""
    lab.start_upstreams(["blast"], banner=os.urandom(1 << 20))
    lab.start_proxy(lab.config(timeouts={"close": "2s"}))

    async def main() -> tuple[int, End | None]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        data = await client.recv_all()
        await client.aclose()
        return len(data), client.end

    size, end = uvloop.run(main())
    assert (size, end) == (1 << 20, End.CLOSE_NOTIFY)
    (line,) = lab.logs.wait_for("access")
    assert line["close"] in ("graceful", "peer"), line
    assert "unsent_bytes" not in line


def test_silent_connections_cannot_keep_a_valid_client_out(lab: Lab) -> None:
    """``max_connections: 300``, ``max_handshakes: 100``: 1,000 TCP connections that
    never send a byte, still arriving while a real client connects, do not stop it from
    being served at once. The silent ones are evicted, oldest first, and say so."""
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(max_connections=300, max_handshakes=100))
    proxy = lab.proxy
    assert proxy is not None

    async def main() -> tuple[float, bytes, int]:
        loop = asyncio.get_running_loop()
        silent: list[socket.socket] = []

        async def open_silent(count: int) -> None:
            for _ in range(count):
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, lab.address)
                silent.append(sock)

        try:
            await open_silent(900)
            flood = asyncio.create_task(open_silent(100))  # still arriving meanwhile
            started = time.monotonic()
            client = await TlsClient.connect(
                lab.address, client_context(lab.certs, "client.b"), timeout=2.0
            )
            await client.send(b"ping")
            answer = await client.recv_exactly(4)
            served = time.monotonic() - started
            await flood
            await client.aclose()
            handshakes = lab.proxy_loop.call(lambda: len(proxy.handshaking))
            return served, answer, handshakes
        finally:
            for sock in silent:
                sock.close()

    served, answer, handshakes = uvloop.run(main())
    assert answer == b"ping"
    assert served < 1.0, served
    assert handshakes <= 100
    evicted = lab.logs.wait_for(
        "access",
        count=800,
        where=lambda r: r["reason"].startswith("handshake_evicted: max_handshakes 100"),
    )
    assert all(r["decision"] == "over_capacity" and r["close"] == "abort" for r in evicted)
    assert not lab.logs.events("access", reason="max_handshakes 100 reached")
    (served_line,) = lab.logs.wait_for("access", decision="forwarded")
    assert served_line["client"] == "client.b"
    full = lab.logs.events("capacity", state="full", limit="max_handshakes")
    assert full[0]["max_handshakes"] == 100
    assert "evicting stalled handshakes" in full[0]["message"]


def test_a_handshake_in_progress_is_not_evicted_for_a_silent_newcomer(lab: Lab) -> None:
    """With the one handshake slot held by a client whose ClientHello got our reply a
    moment ago, a new connection is refused at accept, not the progressing one
    evicted; once that one is served, the slot is free again."""
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(max_handshakes=1, timeouts={"handshake": "5s"}))

    async def main() -> tuple[bytes, bytes]:
        loop = asyncio.get_running_loop()
        ctx = client_context(lab.certs, "client.b")
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, lab.address)
        reader, writer = await asyncio.open_connection(sock=sock)
        tls, incoming, outgoing = _bios(ctx)
        client = TlsClient(reader, writer, tls, incoming, outgoing)
        # Send the ClientHello and read the server's flight, but do not finish.
        with contextlib.suppress(ssl.SSLWantReadError):
            tls.do_handshake()
        writer.write(outgoing.read())
        incoming.write(await reader.read(65536))
        # The newcomer: refused at accept (no handshake may be evicted).
        _r, newcomer = await asyncio.open_connection(*lab.address)
        refused = await _r.read()
        newcomer.close()
        await client.handshake()  # finish the paused handshake
        await client.send(b"ping")
        answer = await client.recv_exactly(4)
        await client.aclose()
        return refused, answer

    refused, answer = uvloop.run(main())
    assert (refused, answer) == (b"", b"ping")
    (over,) = lab.logs.wait_for("access", decision="over_capacity")
    assert over["reason"] == "max_handshakes 1 reached"
    assert not [r for r in lab.logs.events("access") if "evicted" in r["reason"]]


def test_on_reload_close_revokes_an_open_stream_the_new_rules_deny(
    lab: Lab, tmp_path: Path
) -> None:
    """``authorization.on_reload: close``: client.b's open stream to u1 ends within one
    second of a reload that denies it (reason ``revoked``); client.a's stays."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", authorization={"on_reload": "close"})
    lab.start_proxy(path=path)
    deny_b = {
        "on_reload": "close",
        "rules": [{"client": "client.b", "action": "deny", "upstream": "*"}],
    }

    async def main() -> tuple[float, End | None, bytes]:
        b = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        a = await TlsClient.connect(lab.address, client_context(lab.certs, "client.a"))
        for client in (a, b):
            await client.send(b"one")
            assert await client.recv_exactly(3) == b"one"
        lab.write_config(path, authorization=deny_b)
        status, body = await asyncio.to_thread(lab.admin_json, "/reload", "POST")
        assert (status, body["result"]) == (200, "ok"), body
        reloaded = time.monotonic()
        async with asyncio.timeout(1.0):
            rest = await b.recv_all()
        ended = time.monotonic() - reloaded
        await a.send(b"two")
        kept = await a.recv_exactly(3)
        for client in (a, b):
            await client.aclose()
        assert rest == b""
        return ended, b.end, kept

    ended, end, kept = uvloop.run(main())
    assert ended < 1.0
    assert end is End.CLOSE_NOTIFY
    assert kept == b"two"
    revoked = lab.logs.wait_for("access", reason="revoked")
    assert [(r["client"], r["decision"]) for r in revoked] == [("client.b", "forwarded")]
    (event,) = lab.logs.events("reload")
    assert event["revoked"] == 1


def test_on_reload_close_revokes_certificates_the_new_ca_does_not_accept(
    lab: Lab, tmp_path: Path
) -> None:
    """Replacing the client CA (tls.ca) with ``on_reload: close`` ends the connections
    whose certificate the new bundle does not accept; keep (the default) would not."""
    lab.start_upstreams(["echo"])
    ca = tmp_path / "ca.pem"
    shutil.copy(lab.certs / "ca.pem", ca)
    tls = {
        "ca": str(ca),
        "cert": str(lab.certs / "server.pem"),
        "key": str(lab.certs / "server.key"),
    }
    path = lab.write_config(tmp_path / "proxy.yaml", tls=tls, authorization={"on_reload": "close"})
    lab.start_proxy(path=path)

    async def main() -> tuple[bytes, End | None]:
        b = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        await b.send(b"one")
        assert await b.recv_exactly(3) == b"one"
        # A whole new client CA: client.b's certificate is not issued by it.
        shutil.copy(lab.certs / "other" / "ca.pem", ca)
        status, body = await asyncio.to_thread(lab.admin_json, "/reload", "POST")
        assert (status, body["result"]) == (200, "ok"), body
        async with asyncio.timeout(1.0):
            rest = await b.recv_all()
        await b.aclose()
        return rest, b.end

    rest, end = uvloop.run(main())
    assert (rest, end) == (b"", End.CLOSE_NOTIFY)
    (line,) = lab.logs.wait_for("access", reason="revoked")
    assert line["client"] == "client.b"


def test_max_lifetime_ends_a_busy_connection(lab: Lab) -> None:
    """``timeouts.max_lifetime`` ends a connection however active it is."""
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(timeouts={"max_lifetime": "600ms", "idle": "10s"}))

    async def main() -> tuple[float, End | None]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        started = time.monotonic()
        async with asyncio.timeout(5):
            while True:  # busy: a ping every 50 ms, until the proxy ends it
                try:
                    await client.send(b"ping")
                    got = await client.recv_exactly(4)
                except (ConnectionError, EOFError):
                    break
                if got != b"ping":
                    break
                await asyncio.sleep(0.05)  # the traffic's own pace, not synchronization
        await client.aclose()
        return time.monotonic() - started, client.end

    lived, _end = uvloop.run(main())
    assert lived < 2.0
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "max_lifetime"), line
    assert 600 <= line["duration_ms"] < 1500, line
