"""TLS over two memory BIOs on a plain asyncio TCP stream, for transfer mode.

asyncio's TLS transport cannot half-close; this one can: :meth:`TlsStream.close_notify`
sends close_notify and the stream keeps reading, so an echo can be read to its end
after the last byte was sent. One task may write while another reads: every read
decrypts all the complete records it was given before it waits again, so the BIO never
holds a whole record when ``unwrap`` looks at it (OpenSSL would discard it).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

READ_SIZE = 256 * 1024  # socket read size; also more than one TLS record per tls.read


class TlsStream:
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
        self.end: str | None = None  # close_notify | tcp_eof, once read() returned b""

    @classmethod
    async def handshake(
        cls,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ctx: ssl.SSLContext,
        server_name: str | None,
        *,
        server_side: bool = False,
    ) -> TlsStream:
        """Run the TLS handshake over an open TCP stream (as the client, or as the
        server for tests). Raises ``ssl.SSLError`` (an ``OSError``) or
        ``ConnectionError`` on failure; the caller closes ``writer``."""
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_side=server_side, server_hostname=server_name)
        stream = cls(reader, writer, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await stream._flush()
                await stream._fill()
        await stream._flush()
        return stream

    async def _flush(self) -> None:
        if self.outgoing.pending:
            self.writer.write(self.outgoing.read())
            await self.writer.drain()

    async def _fill(self) -> None:
        """Move what the socket has into the incoming BIO (its EOF too)."""
        data = await self.reader.read(READ_SIZE)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def write(self, data: bytes) -> None:
        """Encrypt and send ``data``; returns once the transport has taken it."""
        self.tls.write(data)
        await self._flush()

    async def close_notify(self) -> None:
        """Half-close at the TLS level: send close_notify, keep reading."""
        # unwrap() sends close_notify, then reports that the peer's has not come yet.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        await self._flush()

    async def read(self) -> bytes:
        """Some plaintext, or ``b""`` at the end of the stream (``self.end`` says how).
        A reset or a TLS alert raises (``ConnectionError``, ``ssl.SSLError``)."""
        while True:
            try:
                data = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                self.end = "close_notify"
                return b""
            except ssl.SSLEOFError:
                self.end = "tcp_eof"
                return b""
            else:
                if data:
                    return data
                self.end = "close_notify"
                return b""
            await self._flush()  # e.g. a key update's answer
            await self._fill()

    def abort(self) -> None:
        self.writer.transport.abort()
