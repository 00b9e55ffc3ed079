"""Fast plain-TCP upstreams for the benchmark: one process, several listening ports, uvloop.

    python bench/echo_server.py --mode echo|sink --count 3

Prints one JSON line ``{"event": "ready", "ports": [...]}`` once every port listens, then
nothing more (no per-connection logging). Stops on SIGTERM/SIGINT.

* ``echo``: every byte is written back; the client's EOF closes the connection once the
  echo has been flushed. Flow control: reading pauses while the send buffer is full.
* ``sink``: the stream starts with an 8-byte big-endian length L; the next L bytes are
  counted and discarded, then an 8-byte big-endian ack (the count) is sent. An EOF before
  that also gets the ack of what arrived. Health checks (connect, then close without a
  byte) are ignored silently.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import struct
import sys
from typing import cast

import uvloop

HEADER = struct.Struct("!Q")
HIGH_WATER = 1 << 20
LOW_WATER = 256 * 1024


class Echo(asyncio.Protocol):
    __slots__ = ("transport",)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False  # close once the echo is flushed

    def pause_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class Sink(asyncio.Protocol):
    __slots__ = ("acked", "expected", "head", "received", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.expected = -1
        self.received = 0
        self.acked = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        if self.expected < 0:
            self.head += data
            if len(self.head) < HEADER.size:
                return
            (self.expected,) = HEADER.unpack_from(self.head)
            self.received = len(self.head) - HEADER.size
            self.head = b""
        else:
            self.received += len(data)
        if not self.acked and self.received >= self.expected:
            self._ack()

    def _ack(self) -> None:
        self.acked = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(HEADER.pack(max(self.received, 0)))

    def eof_received(self) -> bool:
        if not self.acked and self.expected >= 0:
            self._ack()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(mode: str, count: int, host: str, backlog: int) -> None:
    loop = asyncio.get_running_loop()
    # Resets from health checks and aborted clients are expected: keep them quiet.
    loop.set_exception_handler(lambda _loop, _ctx: None)
    factory: type[asyncio.Protocol] = Echo if mode == "echo" else Sink
    servers = [
        await loop.create_server(factory, host, 0, backlog=backlog, reuse_address=True)
        for _ in range(count)
    ]
    ports = [int(s.sockets[0].getsockname()[1]) for s in servers]
    sys.stdout.write(json.dumps({"event": "ready", "mode": mode, "ports": ports}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("echo", "sink"), required=True)
    parser.add_argument("--count", type=int, default=3, help="listening ports (upstreams)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--backlog", type=int, default=4096)
    args = parser.parse_args(argv)
    uvloop.run(serve(str(args.mode), int(args.count), str(args.host), int(args.backlog)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
