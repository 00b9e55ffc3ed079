"""A TLS client for tests, built on ``ssl.SSLObject`` over a plain TCP stream.

Unlike asyncio's TLS transport it can half-close (send close_notify, or a bare TCP FIN,
and keep reading) and it reports *how* the server ended the stream: a clean
close_notify, a bare TCP EOF, or a reset. That difference is what several proxy
guarantees are about.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from pathlib import Path
from typing import cast


class End(enum.Enum):
    CLOSE_NOTIFY = "close_notify"  # the server ended the TLS stream cleanly
    TCP_EOF = "tcp_eof"  # FIN without close_notify (truncation from TLS's point of view)
    RESET = "reset"
    TLS_ALERT = "tls_alert"


def client_context(certs: Path, stem: str | None, *, ca: Path | None = None) -> ssl.SSLContext:
    """Verify the proxy against ``certs/ca.pem``; present ``certs/<stem>.pem`` if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=str(ca or certs / "ca.pem"))
    if stem is not None:
        ctx.load_cert_chain(str(certs / f"{stem}.pem"), str(certs / f"{stem}.key"))
    return ctx


class TlsClient:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.end: End | None = None
        self.alert: str | None = None

    @classmethod
    async def connect(
        cls,
        address: tuple[str, int],
        ctx: ssl.SSLContext,
        server_hostname: str = "localhost",
        timeout: float = 10.0,  # noqa: ASYNC109 - one deadline for connect + handshake
    ) -> TlsClient:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*address, limit=1 << 20)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
            client = cls(reader, writer, tls, incoming, outgoing)
            try:
                await client.handshake()
            except BaseException:
                writer.close()
                raise
            return client

    async def handshake(self) -> None:
        """Run (or finish) the TLS handshake over the connected stream."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                data = await self.reader.read(65536)
                if not data:
                    self.incoming.write_eof()
                else:
                    self.incoming.write(data)
        await self._flush()

    async def _flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())
            await self.writer.drain()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), 64 * 1024):
            self.tls.write(view[start : start + 64 * 1024])
            await self._flush()

    async def close_notify(self) -> None:
        """Half-close at the TLS level: send close_notify, keep reading."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self._flush()

    def stop_reading(self) -> None:
        """Stop reading from the socket (its receive window fills up)."""
        # uvloop's transports implement asyncio.Transport without subclassing it.
        cast("asyncio.Transport", self.writer.transport).pause_reading()

    async def shutdown_write(self) -> None:
        """Half-close at the TCP level only (FIN without close_notify)."""
        self.writer.write_eof()

    async def recv(self, max_bytes: int = 1 << 20) -> bytes:
        """Some plaintext, or b"" at the end of the stream (``self.end`` says how)."""
        while True:
            try:
                data = self.tls.read(max_bytes)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.end = End.CLOSE_NOTIFY
                return b""
            except ssl.SSLEOFError:
                self.end = End.TCP_EOF
                return b""
            except ssl.SSLError as exc:
                self.end = End.TLS_ALERT
                self.alert = str(getattr(exc, "reason", exc))
                return b""
            else:
                if data:
                    return data
                self.end = End.CLOSE_NOTIFY
                return b""
            await self._flush()
            try:
                raw = await self.reader.read(1 << 18)
            except ConnectionError:  # reset, or a broken pipe noticed while writing
                self.end = End.RESET
                return b""
            if raw:
                self.incoming.write(raw)
            else:
                self.incoming.write_eof()

    async def recv_all(self, limit: int = 1 << 30) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = await self.recv()
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    async def recv_exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = await self.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"stream ended ({self.end}) after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.writer.close()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()


async def exchange(
    address: tuple[str, int], ctx: ssl.SSLContext, payload: bytes = b"hello"
) -> tuple[bytes, End | None]:
    """Connect, send ``payload``, half-close with close_notify, read to the end.

    Returns everything received and how the stream ended."""
    client = await TlsClient.connect(address, ctx)
    try:
        await client.send(payload)
        await client.close_notify()
        return await client.recv_all(), client.end
    finally:
        await client.aclose()


async def read_plain(address: tuple[str, int]) -> bytes:
    """Connect without TLS and read until the proxy closes: what a client refused at
    accept (before any TLS) gets, ``b""`` also when the close is a reset."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        writer.close()
