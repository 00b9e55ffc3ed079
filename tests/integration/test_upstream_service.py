"""The lab's upstream service (services/upstream): real sockets on 127.0.0.1, port 0.

Most tests run the server in-process (``upstream.server.serve``) on a uvloop loop shared
with the test's clients; the subprocess tests run ``python -m upstream`` as the lab does.
Nothing sleeps to wait: every wait is on a condition (a log record, EOF) with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import IO, Any, cast

import pytest
import uvloop

from l4common.logs import JsonLog
from tests.support.loops import await_condition
from tests.support.paths import service_env
from upstream import cli as up_cli
from upstream import config as up_config
from upstream import decide as up_decide
from upstream import server as up_server
from upstream import trust as up_trust

UPSTREAM_DIR = Path(__file__).resolve().parents[2] / "services" / "upstream"
NAME = "u-test"
REPLY = b"Reply from upstream u-test"
CONNECTION_KEYS = {
    "ts",
    "event",
    "upstream",
    "peer",
    "client_addr",
    "identity",
    "proxy_protocol",
    "mode",
    "bytes_in",
    "header_bytes",
    "bytes_out",
    "message",
    "outcome",
    "reason",
    "duration_ms",
    "suppressed",
}
WAIT = 5.0  # deadline for any single wait in these tests


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


class Capture:
    """A text stream for ``JsonLog``: keeps parsed records, wakes waiters on each line."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        self._partial = ""

    def write(self, text: str) -> int:
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        self.records.extend(json.loads(line) for line in lines if line)
        self.changed.set()
        return len(text)

    def flush(self) -> None:
        return None

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.records
            if r["event"] == event and all(r.get(k) == v for k, v in match.items())
        ]

    async def wait_for(
        self, event: str, count: int = 1, within: float = WAIT, **match: Any
    ) -> list[dict[str, Any]]:
        try:
            async with asyncio.timeout(within):
                while len(found := self.events(event, **match)) < count:
                    self.changed.clear()
                    await self.changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {count} x {event} {match} within {within}s; records: {self.records[-10:]}"
            ) from None
        return found


@contextlib.asynccontextmanager
async def running(capture: Capture, **options: Any) -> AsyncIterator[Any]:
    config = up_config.Config(host="127.0.0.1", port=0, name=NAME, **options)
    server = await up_server.serve(config, JsonLog(cast("IO[str]", capture)))
    try:
        yield server
    finally:
        await server.stop(grace=1.0)


async def read_all(reader: asyncio.StreamReader, within: float = WAIT) -> bytes:
    data = bytearray()
    async with asyncio.timeout(within):
        while chunk := await reader.read(1 << 16):
            data += chunk
    return bytes(data)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def exchange(address: tuple[str, int], data: bytes, *, eof: bool = False) -> bytes:
    """Send ``data`` (then FIN if ``eof``) and read until the server's EOF."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        if eof:
            writer.write_eof()
        await writer.drain()
        return await read_all(reader)
    finally:
        await close(writer)


async def exchange_expecting_reset(address: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` and FIN, read to the end; the peer may answer with a reset."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(data)
            writer.write_eof()
            await writer.drain()
        return await read_until_closed(reader)
    finally:
        with contextlib.suppress(OSError):  # ENOTCONN after the reset
            await close(writer)


def set_linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- modes ---------------------------------------------------------------------------------


def test_reply_is_exact_and_logged() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs) as server:
            listening = logs.events("listening")[0]
            assert listening["address"] == f"127.0.0.1:{server.address[1]}"
            assert (listening["name"], listening["mode"]) == (NAME, "reply")
            assert listening["proxy_protocol"] == "none"

            assert await exchange(server.address, b"hello upstream\nignored") == REPLY
            (record,) = await logs.wait_for("connection")
        assert set(record) == CONNECTION_KEYS
        assert record["outcome"] == "replied"
        assert record["message"] == "hello upstream"
        assert record["bytes_in"] == len(b"hello upstream\nignored")
        assert record["bytes_out"] == len(REPLY)
        assert record["upstream"] == NAME
        assert record["peer"].startswith("127.0.0.1:")
        assert record["suppressed"] == 0
        assert record["ts"].endswith("Z")
        # Without --proxy-protocol the PROXY fields are there, and empty.
        assert (record["client_addr"], record["identity"], record["proxy_protocol"]) == (
            None,
            None,
            None,
        )
        assert (record["header_bytes"], record["reason"]) == (0, None)

    run(main())


def test_reply_ends_message_at_eof_or_quiet_period() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs) as server:
            assert await exchange(server.address, b"by eof", eof=True) == REPLY
            # No newline and no EOF: 100 ms of quiet completes the message.
            assert await exchange(server.address, "bien sûr".encode()) == REPLY
            records = await logs.wait_for("connection", count=2, outcome="replied")
        assert sorted(r["message"] for r in records) == ["bien sûr", "by eof"]

    run(main())


def test_echo_copies_one_mebibyte_exactly() -> None:
    payload = random.Random(7).randbytes(1 << 20)

    async def main() -> None:
        logs = Capture()
        async with running(logs, mode="echo") as server:
            reader, writer = await asyncio.open_connection(*server.address)

            async def send() -> None:
                view = memoryview(payload)
                for start in range(0, len(view), 1 << 16):
                    writer.write(view[start : start + (1 << 16)])
                    await writer.drain()
                writer.write_eof()

            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(send())
                    echoed = tasks.create_task(read_all(reader))
            finally:
                await close(writer)
            assert echoed.result() == payload
            (record,) = await logs.wait_for("connection")
        assert record["outcome"] == "echoed"
        assert record["bytes_in"] == record["bytes_out"] == len(payload)
        assert record["message"] is None

    run(main())


def test_sink_counts_and_closes_at_eof() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, mode="sink") as server:
            assert await exchange(server.address, b"x" * 300_000, eof=True) == b""
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["bytes_in"], record["bytes_out"]) == ("sunk", 300_000, 0)

    run(main())


# --- faults and delay ------------------------------------------------------------------------


def test_fault_close_ends_without_a_byte() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, fault="close") as server:
            assert await exchange(server.address, b"hello\n") == b""
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["bytes_out"]) == ("fault_close", 0)

    run(main())


def test_fault_reset_sends_rst() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, fault="reset") as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(b"hello\n")
                await writer.drain()
                with pytest.raises(ConnectionResetError):
                    await read_all(reader)
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        assert record["outcome"] == "fault_reset"

    run(main())


@pytest.mark.parametrize("mode", ["reply", "echo"])
def test_delay_holds_the_response_back(mode: str) -> None:
    delay = 0.3

    async def main() -> None:
        logs = Capture()
        async with running(logs, mode=mode, delay=delay) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                started = time.monotonic()
                writer.write(b"hello\n")
                await writer.drain()
                first = await asyncio.wait_for(reader.read(100), WAIT)
                elapsed = time.monotonic() - started
            finally:
                await close(writer)
        assert first == (REPLY if mode == "reply" else b"hello\n")
        assert delay <= elapsed < delay + 3.0

    run(main())


def test_idle_timeout_closes_a_silent_connection() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, idle_timeout=0.2) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                assert await read_all(reader) == b""
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["bytes_in"]) == ("idle_timeout", 0)

    run(main())


# --- robustness --------------------------------------------------------------------------------


def test_empty_and_bad_connections_do_not_break_it() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, empty_log_interval=60.0) as server:
            for _ in range(3):  # health-check style: connect, close
                _, writer = await asyncio.open_connection(*server.address)
                await close(writer)
            _, writer = await asyncio.open_connection(*server.address)  # connect, then RST
            set_linger_zero(writer)
            await close(writer)
            _, writer = await asyncio.open_connection(*server.address)  # bytes, then RST
            writer.write(b"partial")
            await writer.drain()
            set_linger_zero(writer)
            await close(writer)
            await logs.wait_for("connection", outcome="client_reset")
            assert await exchange(server.address, b"still there?\n") == REPLY
            await logs.wait_for("connection", outcome="replied")
            assert await server.wait_no_connections(WAIT)
        empties = logs.events("connection", outcome="empty")
        assert [r["suppressed"] for r in empties] == [0]  # the other 3 were suppressed
        (stopped,) = logs.events("stopped")
        assert stopped["suppressed"] == 3
        assert stopped["outcomes"] == {"client_reset": 1, "empty": 4, "replied": 1}

    run(main())


def test_fifty_concurrent_connections_are_all_served() -> None:
    count = 50

    async def main() -> None:
        logs = Capture()
        async with running(logs) as server:
            streams = [await asyncio.open_connection(*server.address) for _ in range(count)]
            try:
                # All of them are open on the server at once before any byte is sent.
                await await_condition("50 open", lambda: len(server.connections) == count)
                for i, (_, writer) in enumerate(streams):
                    writer.write(f"client {i}\n".encode())
                replies = await asyncio.gather(*(read_all(reader) for reader, _ in streams))
            finally:
                for _, writer in streams:
                    await close(writer)
            assert replies == [REPLY] * count
            records = await logs.wait_for("connection", count=count, outcome="replied")
        assert sorted(r["message"] for r in records) == sorted(f"client {i}" for i in range(count))

    run(main())


def test_stop_aborts_connections_that_outlive_the_grace() -> None:
    async def main() -> None:
        logs = Capture()
        config = up_config.Config(host="127.0.0.1", port=0, name=NAME, mode="echo")
        server = await up_server.serve(config, JsonLog(cast("IO[str]", logs)))
        assert server.address is not None
        reader, writer = await asyncio.open_connection(*server.address)
        try:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"ping"
            await server.stop(grace=0.1)
            assert await read_all(reader) == b""
        finally:
            await close(writer)
        (record,) = logs.events("connection")
        assert record["outcome"] == "shutdown"
        assert logs.events("stopped")[0]["open_connections"] == 0

    run(main())


# --- PROXY protocol v2 ------------------------------------------------------------------------

PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def pp2_tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def pp2_header(
    source: tuple[str, int] | None = ("192.0.2.10", 54321),
    *,
    identity: str | None = "spiffe://lab/client-b",
    cn: str = "client.b",
) -> bytes:
    """A PROXY v2 header as the proxy sends it (built by hand, per proxy-protocol.txt 2.2):
    ``source`` ``None`` makes a LOCAL header (UNSPEC family, no addresses, no TLVs)."""
    if source is None:
        return PP2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address("198.51.100.1" if src.version == 4 else "2001:db8::ff")
    family = 0x11 if src.version == 4 else 0x21
    ssl = struct.pack("!BI", 0x07, 0) + pp2_tlv(0x21, b"TLSv1.3") + pp2_tlv(0x22, cn.encode())
    body = src.packed + dst.packed + struct.pack("!HH", source[1], 8000)
    body += pp2_tlv(0x05, b"c-42") + pp2_tlv(0x20, ssl)
    if identity is not None:
        body += pp2_tlv(0xE0, identity.encode())
    return PP2_SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def only_connection(server: up_server.UpstreamServer) -> up_server.Connection:
    (conn,) = server.connections
    return conn


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Read to the server's EOF; an abort that arrives as an RST counts as closed too."""
    with contextlib.suppress(ConnectionResetError):
        return await read_all(reader)
    return b""


@pytest.mark.parametrize("split", [False, True])
def test_v2_reply_learns_client_address_and_identity(split: bool) -> None:
    header = pp2_header()
    payload = b"Hello from x\n"

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2") as server:
            assert logs.events("listening")[0]["proxy_protocol"] == "v2"
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                if split:
                    # Header in two pieces and the payload apart, each seen by the server
                    # before the next is written (so TCP cannot merge them).
                    writer.write(header[:7])
                    await writer.drain()
                    await await_condition(
                        "7 header bytes", lambda: only_connection(server).header_bytes == 7
                    )
                    writer.write(header[7:])
                    await writer.drain()
                    await await_condition(
                        "the header", lambda: only_connection(server).proxy_header is not None
                    )
                    writer.write(payload)
                else:
                    writer.write(header + payload)
                await writer.drain()
                assert await read_all(reader) == REPLY
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        assert set(record) == CONNECTION_KEYS
        assert record["outcome"] == "replied"
        assert record["message"] == "Hello from x"
        assert record["client_addr"] == "192.0.2.10:54321"
        assert record["identity"] == "spiffe://lab/client-b"
        assert record["proxy_protocol"] == "v2-proxy"
        assert record["peer"].startswith("127.0.0.1:")  # the socket's peer (the proxy)
        assert (record["bytes_in"], record["header_bytes"]) == (len(payload), len(header))
        assert record["reason"] is None

    run(main())


def test_v2_ipv6_client_and_identity_from_the_certificate_cn() -> None:
    header = pp2_header(("2001:db8:0:0::7", 443), identity=None, cn="client.c")

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2") as server:
            assert await exchange(server.address, header + b"hi", eof=True) == REPLY
            (record,) = await logs.wait_for("connection")
        assert (record["client_addr"], record["identity"]) == ("[2001:db8::7]:443", "client.c")
        assert (record["outcome"], record["message"]) == ("replied", "hi")

    run(main())


def test_v2_echo_returns_only_the_payload() -> None:
    header = pp2_header()

    async def main() -> None:
        logs = Capture()
        async with running(logs, mode="echo", proxy_protocol="v2") as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(header + b"ping")
                assert await asyncio.wait_for(reader.readexactly(4), WAIT) == b"ping"
                writer.write(b"pong")
                writer.write_eof()
                assert await read_all(reader) == b"pong"
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        assert record["outcome"] == "echoed"
        assert record["bytes_in"] == record["bytes_out"] == 8
        assert record["header_bytes"] == len(header)

    run(main())


def test_v2_local_health_checks_are_empty_and_throttled() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2", empty_log_interval=60.0) as server:
            for _ in range(3):
                assert await exchange(server.address, pp2_header(None), eof=True) == b""
            assert await server.wait_no_connections(WAIT)
            (record,) = logs.events("connection")
        assert (record["outcome"], record["proxy_protocol"]) == ("empty", "v2-local")
        assert (record["client_addr"], record["identity"]) == (None, None)
        assert (record["bytes_in"], record["header_bytes"], record["bytes_out"]) == (0, 16, 0)
        (stopped,) = logs.events("stopped")
        assert (stopped["suppressed"], stopped["outcomes"]) == (2, {"empty": 3})

    run(main())


def test_v2_connection_without_a_byte_is_still_empty() -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2") as server:
            assert await exchange(server.address, b"", eof=True) == b""
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["proxy_protocol"], record["header_bytes"]) == (
            "empty",
            None,
            0,
        )

    run(main())


@pytest.mark.parametrize("data", [b"Hello\n", b"Hi"])
def test_v2_plain_client_is_rejected_at_once(data: bytes) -> None:
    async def main() -> None:
        logs = Capture()
        # Neither has 16 bytes, "Hi" has no newline and the client keeps its side open:
        # only the signature check at the first byte can end these connections.
        async with running(logs, proxy_protocol="v2") as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(data)
                await writer.drain()
                assert await read_until_closed(reader) == b""
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
            assert await exchange(server.address, pp2_header() + b"after\n") == REPLY
        assert record["outcome"] == "proxy_protocol_error"
        assert "signature differs at byte 0" in record["reason"]
        assert (record["bytes_in"], record["header_bytes"], record["bytes_out"]) == (
            0,
            len(data),
            0,
        )
        assert record["proxy_protocol"] is None

    run(main())


@pytest.mark.parametrize("cut", [1, 12, 16, 30])
def test_v2_incomplete_header_then_close(cut: int) -> None:
    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2", empty_log_interval=60.0) as server:
            assert await exchange(server.address, pp2_header()[:cut], eof=True) == b""
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["reason"]) == (
            "proxy_protocol_error",
            "incomplete header",
        )
        assert (record["bytes_in"], record["header_bytes"]) == (0, cut)

    run(main())


def test_v2_malformed_tlv_is_rejected_with_its_reason() -> None:
    good = pp2_header()
    # Two more bytes declared and sent: a TLV header cut short after its type and one byte.
    bad = good[:14] + struct.pack("!H", len(good) - 16 + 2) + good[16:] + b"\xe0\x00"

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2") as server:
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(bad + b"Hello\n")
                await writer.drain()
                assert await read_until_closed(reader) == b""
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        assert record["outcome"] == "proxy_protocol_error"
        assert record["reason"].startswith("truncated TLV")

    run(main())


@pytest.mark.parametrize(
    ("trusted", "served"),
    [
        (["127.0.0.0/8"], True),  # a CIDR holding the peer
        (["127.0.0.1"], True),  # the peer's address
        (["localhost"], True),  # a name, looked up when the peer matches nothing
        (["192.0.2.1", "no-such-host.invalid"], False),  # neither is the peer
    ],
)
def test_v2_headers_are_believed_only_from_trusted_proxies(
    trusted: list[str], served: bool
) -> None:
    # Loopback peers are trusted by default (the container's own health check); these
    # tests connect over loopback, so that exemption is off here.
    spec = up_trust.parse_trusted(trusted, loopback=False)

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2", trusted_proxies=spec) as server:
            assert logs.events("listening")[0]["trusted_proxies"] == spec.describe()
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                # A header naming somebody else: only a trusted proxy may say that.
                writer.write(pp2_header(identity="client.b") + b"Hello from client.b\n")
                await writer.drain()
                got = await read_until_closed(reader)
            finally:
                await close(writer)
            (record,) = await logs.wait_for("connection")
        if served:
            assert got == REPLY
            assert (record["outcome"], record["identity"]) == ("replied", "client.b")
        else:
            assert got == b""
            assert record["outcome"] == "untrusted_proxy"
            assert record["reason"].startswith("peer 127.0.0.1 is not a trusted proxy")
            assert (record["identity"], record["bytes_in"], record["bytes_out"]) == (None, 0, 0)

    run(main())


def test_a_peer_newer_than_the_last_lookup_waits_for_the_next_one() -> None:
    """The start-up race seen on a swarm: the trusted name answered nothing a moment ago
    (the proxy was not there yet); a proxy connecting now is served, not refused by
    that older answer."""
    spec = up_trust.parse_trusted(["localhost"], loopback=False)

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2", trusted_proxies=spec) as server:
            server.trust.refresh_interval = 0.3
            server.trust.update({"localhost": []}, started=server.clock())
            got = await exchange(server.address, pp2_header(identity="client.b") + b"Hi\n")
            (record,) = await logs.wait_for("connection")
            (trust,) = await logs.wait_for("trust")
        assert got == REPLY
        assert (record["outcome"], record["identity"]) == ("replied", "client.b")
        assert "127.0.0.1" in trust["addresses"]

    run(main())


def test_an_untrusted_peer_is_cut_before_its_bytes_are_read() -> None:
    """Even a LOCAL header (a health check) from an untrusted peer is refused, and peers
    that match nothing share look-ups: three at once cost at most two."""
    spec = up_trust.parse_trusted(["no-such-host.invalid"], loopback=False)

    async def main() -> None:
        logs = Capture()
        async with running(logs, proxy_protocol="v2", trusted_proxies=spec) as server:
            server.trust.refresh_interval = 0.2
            lookups = 0
            update = server.trust.update

            def counted(*args: Any, **kwargs: Any) -> bool:
                nonlocal lookups
                lookups += 1
                return bool(update(*args, **kwargs))

            server.trust.update = counted
            results = await asyncio.gather(
                *(exchange_expecting_reset(server.address, pp2_header(None)) for _ in range(3))
            )
            assert results == [b""] * 3
            records = await logs.wait_for("connection", count=3, outcome="untrusted_proxy")
            assert 1 <= lookups <= 2
        assert all(r["header_bytes"] == 0 for r in records)

    run(main())


def test_mode_none_passes_a_header_through_as_payload() -> None:
    data = pp2_header() + b"ping"

    async def main() -> None:
        logs = Capture()
        async with running(logs, mode="echo") as server:
            assert await exchange(server.address, data, eof=True) == data
            (record,) = await logs.wait_for("connection")
        assert record["outcome"] == "echoed"
        assert record["bytes_in"] == record["bytes_out"] == len(data)
        assert (record["header_bytes"], record["proxy_protocol"], record["client_addr"]) == (
            0,
            None,
            None,
        )

    run(main())


# --- the command -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_subprocess_serves_and_exits_cleanly_on_signal(sig: signal.Signals) -> None:
    env = service_env(
        UPSTREAM_DIR,
        dict(os.environ, UPSTREAM_NAME="u-env", UPSTREAM_MODE="reply", UPSTREAM_DELAY="10ms"),
    )

    async def main() -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "upstream",
            "--listen",
            "127.0.0.1:0",
            cwd=UPSTREAM_DIR,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        try:
            listening = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10.0))
            assert listening["event"] == "listening"
            assert listening["proxy_protocol"] == "none"
            assert (listening["name"], listening["mode"], listening["delay_ms"]) == (
                "u-env",
                "reply",
                10.0,
            )
            port = int(listening["address"].rsplit(":", 1)[1])
            assert await exchange(("127.0.0.1", port), b"hi\n") == b"Reply from upstream u-env"
            proc.send_signal(sig)
            out, err = await asyncio.wait_for(proc.communicate(), 10.0)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0
        assert err == b""
        records = [json.loads(line) for line in out.decode().splitlines()]
        assert [r["event"] for r in records] == ["connection", "stopped"]
        assert records[0]["outcome"] == "replied"

    run(main())


def test_bad_configuration_exits_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert up_cli.main(["--mode", "bogus"], {}) == 2
    assert up_cli.main([], {"UPSTREAM_DELAY": "soon"}) == 2
    err = capsys.readouterr().err
    assert "--mode/UPSTREAM_MODE" in err
    assert "--delay/UPSTREAM_DELAY" in err
    assert "Traceback" not in err


# --- pure decisions --------------------------------------------------------------------------


def test_trusted_proxies_from_the_command_line_or_the_environment() -> None:
    env = {"UPSTREAM_PROXY_PROTOCOL": "v2", "UPSTREAM_TRUSTED_PROXIES": "proxy, 10.0.0.0/24"}
    config = up_config.load_config([], env)
    assert config.trusted_proxies.describe() == ["10.0.0.0/24", "proxy"]
    config = up_config.load_config(["--trusted-proxy", "10.1.2.3"], env)
    assert config.trusted_proxies.describe() == ["10.1.2.3/32"]
    with pytest.raises(up_config.ConfigError, match="only with --proxy-protocol v2"):
        up_config.load_config(["--trusted-proxy", "proxy"], {})
    with pytest.raises(up_config.ConfigError, match="expected an address, a CIDR or a host"):
        up_config.load_config(["--proxy-protocol", "v2", "--trusted-proxy", "bad name!"], {})


def test_configuration_precedence_and_parsing() -> None:
    env = {"UPSTREAM_LISTEN": "[::1]:9000", "UPSTREAM_MODE": "ECHO", "UPSTREAM_DELAY": "250ms"}
    config = up_config.load_config(["--fault", "reset"], env)
    assert (config.host, config.port, config.name) == ("::1", 9000, "[::1]:9000")
    assert (config.mode, config.delay, config.fault) == ("echo", 0.25, "reset")
    assert up_config.load_config(["--mode", "sink"], env).mode == "sink"
    durations = [up_config.parse_duration(t, "x", allow_zero=True) for t in ("2s", "1m", ".5", "0")]
    assert durations == [2, 60, 0.5, 0]
    for bad in ("-1s", "2 days", "", "1e9999"):
        with pytest.raises(up_config.ConfigError):
            up_config.parse_duration(bad, "x")
    for bad in ("8000", "host:", ":80", "h:70000", "[nope]:1"):
        with pytest.raises(up_config.ConfigError):
            up_config.parse_address(bad, "x")


def test_message_end() -> None:
    end = up_decide.message_end
    assert end(b"") is None
    assert end(b"abc") is None
    assert end(b"abc\ndef") == 3
    assert end(b"\n") == 0
    assert end(b"x" * 10, cap=10) == 10
    assert end(b"x" * 10 + b"\n", cap=10) == 10
    assert up_decide.message_text(b"caf\xc3\xa9\r") == "café"
    assert up_decide.message_text(b"\xff" * 300) == "\ufffd" * 200


@pytest.mark.parametrize(
    ("mode", "bytes_in", "action", "error", "expected"),
    [
        ("reply", 5, "replied", False, "replied"),
        ("reply", 5, "replied", True, "client_reset"),
        ("reply", 0, None, False, "empty"),
        ("reply", 0, None, True, "empty"),
        ("echo", 9, None, False, "echoed"),
        ("echo", 9, None, True, "client_reset"),
        ("sink", 9, None, False, "sunk"),
        ("reply", 5, "fault_close", False, "fault_close"),
        ("echo", 5, "fault_reset", True, "fault_reset"),
        ("sink", 0, "idle_timeout", False, "idle_timeout"),
        ("echo", 5, "shutdown", True, "shutdown"),
        ("reply", 5, None, False, "client_reset"),
    ],
)
def test_final_outcome(
    mode: up_config.Mode, bytes_in: int, action: Any, error: bool, expected: str
) -> None:
    outcome = up_decide.final_outcome(mode, bytes_in=bytes_in, action=action, lost_with_error=error)
    assert outcome == expected
    assert outcome in up_decide.OUTCOMES


@pytest.mark.parametrize(
    ("bytes_in", "action", "error", "expected"),
    [
        (0, None, False, "proxy_protocol_error"),
        (0, None, True, "proxy_protocol_error"),
        (0, "idle_timeout", False, "idle_timeout"),  # the server's own action decides first
        (0, "shutdown", True, "shutdown"),
    ],
)
def test_final_outcome_with_a_bad_proxy_header(
    bytes_in: int, action: Any, error: bool, expected: str
) -> None:
    outcome = up_decide.final_outcome(
        "reply", bytes_in=bytes_in, action=action, lost_with_error=error, proxy_protocol_failed=True
    )
    assert outcome == expected
    assert "proxy_protocol_error" in up_decide.OUTCOMES


def test_empty_log_throttle() -> None:
    throttle = up_decide.EmptyLogThrottle(interval=1.0)
    assert [throttle.admit(t) for t in (10.0, 10.2, 10.9, 11.0, 11.5, 13.0)] == [
        0,
        None,
        None,
        2,
        None,
        1,
    ]
    assert throttle.admit(13.1) is None
    assert throttle.drain() == 1
    assert throttle.drain() == 0
    every = up_decide.EmptyLogThrottle(interval=0.0)
    assert [every.admit(1.0), every.admit(1.0)] == [0, 0]


def test_stop_serves_the_connections_already_in_the_listen_backlog() -> None:
    """A stop closes the listener, which would reset every connection the kernel had
    completed and the server had not accepted yet: a proxy's dial of a moment ago would
    lose its client's request. They are taken in and served first."""

    async def main() -> None:
        logs = Capture()
        config = up_config.Config(host="127.0.0.1", port=0, name=NAME, mode="echo")
        server = await up_server.serve(config, JsonLog(cast("IO[str]", logs)))
        assert server.address is not None
        # Connected and written without yielding to the loop: all still in the backlog.
        clients = [socket.create_connection(server.address, timeout=WAIT) for _ in range(8)]
        for client in clients:
            client.sendall(b"ping")

        def read_replies() -> list[bytes | str]:
            replies: list[bytes | str] = []
            for client in clients:
                try:
                    replies.append(client.recv(4))
                except OSError as exc:
                    replies.append(type(exc).__name__)
                finally:
                    client.close()
            return replies

        reading = asyncio.get_running_loop().run_in_executor(None, read_replies)
        await server.stop(grace=WAIT)  # the first thing after the connects: no accept ran
        assert await reading == [b"ping"] * 8
        assert logs.events("stopped")[0]["connections"] == 8

    run(main())
