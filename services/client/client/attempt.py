"""The I/O of one attempt: TCP connect, TLS handshake, send, read to EOF, close.

The TCP connect and the TLS handshake are separate steps (``open_connection`` then
``start_tls``) so the classifier knows exactly where an attempt failed.  asyncio's TLS
streams cannot half-close, so the end of the message is not signalled: the upstream
answers after its quiet period, and the reply ends with EOF.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config
from .decide import Phase, Verdict, classify

REPLY_CAP = 64 * 1024  # read at most this much of a reply
CLOSE_GRACE = 1.0  # how long closing (TLS close_notify) may take before aborting


@dataclass(frozen=True, slots=True)
class Result:
    verdict: Verdict
    reply: bytes
    latency: float  # seconds from connect start to the end of the reply (or the failure)


def client_context(certs: Path, stem: str | None) -> ssl.SSLContext:
    """Verify the proxy against ``certs/ca.pem`` (hostname checked); present
    ``certs/<stem>.pem`` with ``certs/<stem>.key`` unless ``stem`` is ``None``."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.pem"))
    if stem is not None:
        ctx.load_cert_chain(str(certs / f"{stem}.pem"), str(certs / f"{stem}.key"))
    return ctx


async def _read_to_eof(reader: asyncio.StreamReader, into: bytearray) -> None:
    while len(into) < REPLY_CAP:
        chunk = await reader.read(REPLY_CAP - len(into))
        if not chunk:
            return
        into += chunk


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_GRACE):
            await writer.wait_closed()
    except TimeoutError:
        writer.transport.abort()
    except OSError:  # includes ssl.SSLError: the peer is gone, and so is the connection
        return


async def attempt(
    config: Config, ctx: ssl.SSLContext, clock: Callable[[], float] = time.perf_counter
) -> Result:
    """Run one attempt within ``config.timeout``; never raises (except on cancellation).

    ``clock`` measures the latency (the loop's own clock may be only millisecond-precise).
    """
    started = clock()
    phase: Phase = "connect"
    reply = bytearray()
    error: BaseException | None = None
    writer: asyncio.StreamWriter | None = None
    deadline = asyncio.timeout(config.timeout)
    try:
        async with deadline:
            reader, writer = await asyncio.open_connection(
                config.host, config.port, limit=REPLY_CAP
            )
            phase = "handshake"
            await writer.start_tls(ctx, server_hostname=config.server_name)
            phase = "exchange"
            writer.write(config.message)
            await writer.drain()
            await _read_to_eof(reader, reply)
    except TimeoutError as exc:
        if not deadline.expired():
            error = exc  # a kernel timeout, not ours
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome, never a crash
        error = exc
    ended = clock()
    if writer is not None:
        await _close(writer)
    verdict = classify(phase, bytes(reply), error, timed_out=deadline.expired())
    return Result(verdict=verdict, reply=bytes(reply), latency=ended - started)
