"""Test upstreams: real TCP servers on 127.0.0.1 port 0 whose behaviour a test picks.

Modes:
- ``echo``: copy bytes back; on EOF, send EOF back (TCP half-close) after the echo.
- ``reply``: read the first chunk, answer ``Reply from upstream <name>``, close.
- ``hold``: accept and keep the connection open, reading and discarding.
- ``banner``: send ``banner`` bytes and a FIN at once, then record what the client sends.
- ``reset_after``: read ``reset_after`` bytes, then reset the connection (RST).
- ``record``: read until EOF, keep the bytes, close.
- ``reset_at_once``: accept, then reset the connection immediately.
- ``blast``: send ``banner`` at once (however large), then a FIN; discard input.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass, field
from typing import cast


@dataclass
class Stats:
    accepted: int = 0
    open: int = 0
    received: list[bytes] = field(default_factory=list)  # per finished connection (not echo)
    empty: int = 0  # connections that ended without sending a byte (health checks)


def _reset(transport: asyncio.Transport) -> None:
    """Close with an RST (SO_LINGER 0), as a crashing server would."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _Conn(asyncio.Protocol):
    def __init__(self, server: TestUpstream) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.nbytes = 0
        self.replied = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self.server.stats.accepted += 1
        self.server.stats.open += 1
        self.server.conns.add(self)
        if self.server.mode == "reset_at_once":
            _reset(transport)
            return
        if self.server.mode in ("banner", "blast"):
            transport.write(self.server.banner)
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        mode = self.server.mode
        self.nbytes += len(data)
        if mode == "echo":
            self.transport.write(data)
        elif mode == "reply":
            self.buf += data
            if not self.replied:
                self.replied = True
                self.transport.write(f"Reply from upstream {self.server.name}".encode())
                self.transport.close()
        elif mode == "reset_after":
            self.buf += data
            if len(self.buf) >= self.server.reset_after:
                _reset(self.transport)
        else:  # hold, banner, record
            self.buf += data

    def eof_received(self) -> bool:
        assert self.transport is not None
        if self.server.mode == "echo":
            self.transport.write_eof()
            return True
        if self.server.mode in ("record", "banner", "hold", "blast"):
            self.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        stats = self.server.stats
        stats.open -= 1
        self.server.conns.discard(self)
        if self.nbytes == 0:
            stats.empty += 1
        else:
            stats.received.append(bytes(self.buf))
        self.server.changed.set()


class TestUpstream:
    def __init__(
        self,
        name: str,
        mode: str = "echo",
        *,
        banner: bytes = b"",
        reset_after: int = 0,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = host  # the IP it listens on
        self.mode = mode
        self.banner = banner
        self.reset_after = reset_after
        self.stats = Stats()
        self.conns: set[_Conn] = set()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.changed = asyncio.Event()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> TestUpstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _Conn(self), self.host, port or self.port, reuse_address=True, backlog=1024
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def carrying(self) -> int:
        """Open connections that have received bytes (health probes never do).
        Call on the upstreams' loop thread (``lab.up_loop.call``)."""
        return sum(1 for conn in self.conns if conn.nbytes)

    async def wait_idle(self) -> None:
        """Until every accepted connection has ended (no open connections)."""
        while self.stats.open > 0:
            self.changed.clear()
            await self.changed.wait()

    async def stop(self, *, abort_connections: bool = True) -> None:
        """Stop listening (new connects are refused); optionally drop open connections."""
        if self.server is not None:
            self.server.close()
            self.server = None
        if abort_connections:
            for conn in list(self.conns):
                if conn.transport is not None:
                    conn.transport.abort()


def free_port() -> int:
    """A port nothing listens on right now (connects to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
