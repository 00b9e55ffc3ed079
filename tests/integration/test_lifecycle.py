"""How connections end: half-close both ways, deaths mid-stream, idle timeout, and
bounded buffering when one side is slow."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest
import uvloop

from l4proxy.closing import reset_not_eof
from l4proxy.server import HIGH_WATER, READ_SIZE, ClientConnection
from tests.support.harness import Lab
from tests.support.loops import await_condition
from tests.support.tlsclient import End, TlsClient, client_context


async def open_client(lab: Lab, stem: str = "client.b") -> TlsClient:
    return await TlsClient.connect(lab.address, client_context(lab.certs, stem))


def test_client_tcp_fin_without_close_notify_is_a_half_close(lab: Lab) -> None:
    """A client that ends with a bare FIN still gets the whole echo back."""
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    payload = os.urandom(200_000)

    async def main() -> tuple[bytes, End | None]:
        client = await open_client(lab)
        await client.send(payload)
        await client.shutdown_write()
        data = await client.recv_all()
        await client.aclose()
        return data, client.end

    data, end = uvloop.run(main())
    assert data == payload
    assert end is End.CLOSE_NOTIFY
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "eof")


def test_upstream_eof_first_then_client_keeps_sending(lab: Lab) -> None:
    """Half-close the other way round: the upstream sends a banner and its FIN at once;
    the client reads the banner and a clean end, then still uploads, and the upstream
    receives every byte."""
    lab.start_upstreams(["banner"], banner=b"HELLO\n")
    lab.start_proxy()
    upload = os.urandom(500_000)

    async def main() -> None:
        client = await open_client(lab)
        assert await client.recv_all() == b"HELLO\n"
        assert client.end is End.CLOSE_NOTIFY
        await client.send(upload)
        await client.close_notify()
        await client.aclose()

    uvloop.run(main())
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "eof")
    assert line["bytes_up"] == len(upload)
    lab.up_loop.run(asyncio.wait_for(lab.upstreams[0].wait_idle(), 5))
    assert lab.upstreams[0].stats.received == [upload]


def test_upstream_dying_mid_stream_aborts_the_client_promptly(lab: Lab) -> None:
    """The client must not mistake an upstream crash for a clean end of stream."""
    lab.start_upstreams(["reset_after"], reset_after=100_000)
    lab.start_proxy()

    async def main() -> End | None:
        client = await open_client(lab)
        sender = asyncio.create_task(client.send(os.urandom(400_000)))
        async with asyncio.timeout(5):
            data = await client.recv_all()
        assert data == b""
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        await client.aclose()
        return client.end

    end = uvloop.run(main())
    assert end in (End.RESET, End.TCP_EOF)  # never CLOSE_NOTIFY
    (line,) = lab.logs.wait_for("access")
    assert line["decision"] == "forwarded"
    assert line["reason"].startswith("upstream_error")
    assert lab.active() == [0]
    assert lab.open_connections() == 0


def test_client_dying_mid_stream_closes_the_upstream(lab: Lab) -> None:
    lab.start_upstreams(["hold"])
    lab.start_proxy()
    upstream = lab.upstreams[0]

    async def main() -> None:
        client = await open_client(lab)
        await client.send(b"x" * 1000)
        await await_condition("the connection at the upstream", lambda: lab.carrying() == [1])
        sock = client.writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()  # the client vanishes: RST, no TLS goodbye

    uvloop.run(main())
    (line,) = lab.logs.wait_for("access")
    assert line["reason"] == "client_reset"
    lab.up_loop.run(asyncio.wait_for(upstream.wait_idle(), 5))
    assert lab.active() == [0]


def test_idle_connections_are_closed_after_the_idle_timeout(lab: Lab) -> None:
    lab.start_upstreams(["hold"])
    lab.start_proxy(lab.config(timeouts={"idle": "400ms"}))

    async def main() -> tuple[float, End | None]:
        loop = asyncio.get_running_loop()
        client = await open_client(lab)
        await client.send(b"ping")
        started = loop.time()
        async with asyncio.timeout(10):
            assert await client.recv_all() == b""
        await client.aclose()
        return loop.time() - started, client.end

    waited, end = uvloop.run(main())
    assert waited >= 0.35
    assert end is End.CLOSE_NOTIFY  # nothing was in flight: a clean close
    (line,) = lab.logs.wait_for("access")
    assert line["reason"] == "idle_timeout"
    assert lab.active() == [0]


@pytest.mark.single_process("reads the connection's transport buffers")
def test_slow_reader_bounds_proxy_buffers_and_still_gets_every_byte(lab: Lab) -> None:
    """Flow control: while the client does not read, the proxy stops reading the
    upstream instead of buffering the whole stream; then everything arrives intact."""
    blob = os.urandom(32 << 20)
    lab.start_upstreams(["blast"], banner=blob)
    lab.start_proxy()
    proxy = lab.proxy
    assert proxy is not None

    def proxy_side() -> tuple[bool, int]:
        (conn,) = proxy.connections
        assert isinstance(conn, ClientConnection)
        assert conn.transport is not None
        return conn.upstream_paused, conn.transport.get_write_buffer_size()

    async def main() -> bytes:
        client = await open_client(lab)
        await client.send(b"go")
        await await_condition(
            "the proxy pausing the upstream",
            lambda: lab.open_connections() == 1 and lab.proxy_loop.call(proxy_side)[0],
        )
        _, buffered = lab.proxy_loop.call(proxy_side)
        # Bounded: the high-water mark plus at most one read's worth of TLS records.
        assert buffered <= HIGH_WATER + READ_SIZE + 64 * 1024, buffered
        data = await client.recv_all()
        await client.aclose()
        return data

    data = uvloop.run(main())
    assert hashlib.sha256(data).digest() == hashlib.sha256(blob).digest()
    (line,) = lab.logs.wait_for("access")
    assert line["bytes_down"] == len(blob)


@pytest.mark.single_process("reads the connection's paused client transport")
def test_slow_upstream_pauses_the_client_and_still_gets_every_byte(lab: Lab) -> None:
    """Flow control the other way: while the upstream does not read, the proxy stops
    reading the client. The decrypted chunks it hands to the upstream transport (without
    a copy, see ClientConnection._send_up) all arrive intact and in order."""
    (upstream,) = lab.start_upstreams(["record"])
    lab.start_proxy()
    proxy = lab.proxy
    assert proxy is not None
    blob = os.urandom(32 << 20)

    def upstream_reading(on: bool) -> int:
        carrying = [c for c in upstream.conns if c.nbytes]  # not the health probes
        for conn in carrying:
            assert conn.transport is not None
            if on:
                conn.transport.resume_reading()
            else:
                conn.transport.pause_reading()
        return len(carrying)

    def client_paused() -> bool:
        (conn,) = proxy.connections
        assert isinstance(conn, ClientConnection)
        return conn.client_paused

    async def main() -> None:
        client = await open_client(lab)
        await client.send(b"x")
        await await_condition(
            "the upstream stopping reading",
            lambda: lab.up_loop.call(lambda: upstream_reading(False)) == 1,
        )
        sending = asyncio.create_task(client.send(blob))
        await await_condition(
            "the proxy pausing the client", lambda: lab.proxy_loop.call(client_paused)
        )
        lab.up_loop.call(lambda: upstream_reading(True))
        await sending
        await client.close_notify()
        assert await client.recv_all() == b""
        await client.aclose()

    uvloop.run(main())
    (line,) = lab.logs.wait_for("access")
    assert line["bytes_up"] == len(blob) + 1
    (received,) = lab.up_loop.call(lambda: list(upstream.stats.received))
    assert hashlib.sha256(received).digest() == hashlib.sha256(b"x" + blob).digest()


def test_upstream_resetting_right_after_accept_leaves_nothing_behind(lab: Lab) -> None:
    """A reset that lands before the dial completes is a failed dial (a clean refusal and
    a passive mark-down); one that lands after must abort the client. Either way no
    slot, connection or error is left behind (the harness fails on logged errors)."""
    (upstream,) = lab.start_upstreams(["hold"])
    lab.start_proxy(lab.config(health_check={"interval": "1h"}))  # checked up once
    upstream.mode = "reset_at_once"  # ...then it starts resetting every connection

    async def main() -> End | None:
        client = await open_client(lab)
        await client.send(b"hello")
        async with asyncio.timeout(5):
            assert await client.recv_all() == b""
        await client.aclose()
        return client.end

    end = uvloop.run(main())
    (line,) = lab.logs.wait_for("access")
    if line["decision"] == "dial_failed":
        assert line["reason"].startswith("ECONNRESET")
        assert end is End.CLOSE_NOTIFY  # refused cleanly, nothing forwarded
        lab.logs.wait_for("health", source="passive", new="down")
    else:
        assert line["decision"] == "forwarded"
        assert line["reason"].startswith(("upstream_error", "upstream_closed"))
        assert end in (End.RESET, End.TCP_EOF)  # never a clean end for a crash
    assert lab.active() == [0]
    assert lab.open_connections() == 0


class _SocketOnly:
    """What ``reset_not_eof`` reads of a transport: its socket (a real one here)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def get_extra_info(self, name: str) -> object:
        return self.sock if name == "socket" else None


def _send_until_refused(sock: socket.socket) -> None:
    for _ in range(1000):  # bounded: the first send after the RST arrived raises
        sock.send(b"x")


def test_a_reset_whose_error_a_send_consumed_is_not_taken_for_an_eof() -> None:
    """After a peer's RST the kernel reports ECONNRESET to the first call only. If that
    is a send, the next read returns 0 like a FIN, and the proxy would pass a cut
    stream on as a clean end (seen once in 20 runs of the lab's reset scenario: the
    client got close_notify after 671,744 of 4,194,304 bytes). The TCP state tells
    them apart; a real FIN stays an EOF."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        mine = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # RST
        mine.settimeout(5)
        with pytest.raises(ConnectionResetError):  # this send consumes the RST's error
            _send_until_refused(mine)
        assert mine.recv(10) == b""  # ... and the read looks like an EOF
        assert reset_not_eof(_SocketOnly(mine))  # type: ignore[arg-type]
        mine.close()

        mine = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        peer.close()  # FIN
        mine.settimeout(5)
        assert mine.recv(10) == b""
        assert not reset_not_eof(_SocketOnly(mine))  # type: ignore[arg-type]
        mine.close()
