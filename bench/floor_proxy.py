"""The least a Python TLS-terminating proxy on uvloop does per connection: a reference
point for ``bench/instructions.py``, never a proxy to use.

    python bench/floor_proxy.py --certs DIR --port N UPSTREAM_PORT [UPSTREAM_PORT ...]

It does what our proxy does on the path every connection takes, and nothing else: an
mTLS handshake over memory BIOs (the same server context settings as ours in the bench:
client certificate required and verified, one session ticket), the peer certificate
read once, a dial to the next upstream in turn, bytes both ways, half-close both ways.
No timeouts, no limits, no authorization, no health checks, no log line, no error
handling beyond closing. What our proxy spends per connection above this is the price
of those features in Python; what this spends above HAProxy is the price of Python and
its event loop.

Prints ``{"event": "listening", "address": "127.0.0.1:N"}`` once it accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import ssl
import sys
from collections.abc import Iterator, Sequence
from typing import cast

import uvloop

READ_SIZE = 256 * 1024


def server_context(certs: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.num_tickets = 1
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=f"{certs}/ca.pem")
    ctx.load_cert_chain(f"{certs}/server.pem", f"{certs}/server.key")
    return ctx


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.client.tls.write(data)
        self.client.send_tls()

    def eof_received(self) -> bool:
        with contextlib.suppress(ssl.SSLError):
            self.client.tls.unwrap()  # close_notify
        self.client.send_tls()
        self.client.close()
        return False


class Client(asyncio.Protocol):
    def __init__(self, context: ssl.SSLContext, upstreams: Iterator[int]) -> None:
        self.upstreams = upstreams
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.handshaken = False
        self.peer: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send_tls(self) -> None:
        if self.outgoing.pending and self.transport is not None:
            self.transport.write(self.outgoing.read())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.handshaken:
            self.pump()
            return
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.send_tls()
            return
        except ssl.SSLError:
            self.send_tls()
            self.close()
            return
        self.send_tls()
        self.handshaken = True
        self.peer = self.tls.getpeercert(binary_form=True)  # what an identity needs
        assert self.transport is not None
        self.transport.pause_reading()
        asyncio.get_running_loop().create_task(self.dial())

    async def dial(self) -> None:
        loop = asyncio.get_running_loop()
        port = next(self.upstreams)
        try:
            _, self.upstream = await loop.create_connection(
                lambda: Upstream(self), "127.0.0.1", port
            )
        except OSError:
            self.close()
            return
        assert self.transport is not None
        self.transport.resume_reading()
        self.pump()

    def pump(self) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None:
            return
        chunks = []
        ended = False
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            except ssl.SSLError:
                self.close()
                upstream.transport.close()
                return
            if not chunk:
                ended = True
                break
            chunks.append(chunk)
        if chunks:
            upstream.transport.write(b"".join(chunks))
        if ended and upstream.transport.can_write_eof():
            upstream.transport.write_eof()

    def eof_received(self) -> bool:
        self.incoming.write_eof()
        self.pump()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.close()


async def serve(certs: str, port: int, upstream_ports: Sequence[int]) -> None:
    context = server_context(certs)
    upstreams = itertools.cycle(upstream_ports)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(context, upstreams), "127.0.0.1", port, backlog=1024
    )
    bound = server.sockets[0].getsockname()
    print(json.dumps({"event": "listening", "address": f"{bound[0]}:{bound[1]}"}), flush=True)
    await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certs", required=True, help="certgen's output folder")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("upstreams", type=int, nargs="+", help="upstream ports on 127.0.0.1")
    args = parser.parse_args(argv)
    try:
        uvloop.run(serve(args.certs, args.port, args.upstreams))
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
