"""The I/O of one attempt: TCP connect, TLS handshake, send, read to EOF, close.

The TCP connect and the TLS handshake are separate steps (``open_connection`` then
``start_tls``) so the classifier knows exactly where an attempt failed.  asyncio's TLS
streams cannot half-close, so the end of the message is not signalled: the upstream
answers after its quiet period, and the reply ends with EOF.

Transfer mode (:func:`transfer`) does TLS itself (:mod:`client.tlsstream`), because it
must half-close: it streams the payload paced over ``--transfer-time`` from one task
while reading the echo in the attempt's own task, then sends close_notify and reads the
echo to its end.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import transfer as tr
from .config import Config
from .decide import Phase, Verdict, classify, classify_transfer
from .tlsstream import TlsStream

REPLY_CAP = 64 * 1024  # read at most this much of a reply
TRANSFER_READ_LIMIT = 256 * 1024  # transfer mode: the socket reader's buffer limit
CLOSE_GRACE = 1.0  # how long closing (TLS close_notify) may take before aborting


@dataclass(frozen=True, slots=True)
class Result:
    verdict: Verdict
    reply: bytes
    latency: float  # seconds from connect start to the end of the reply (or the failure)
    progress: tr.Progress | None = None  # transfer mode, once past the handshake
    transfer_time: float | None = None  # transfer mode: handshake done to end of the echo


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


async def _send(stream: TlsStream, sender: tr.Sender, duration: float) -> None:
    """The payload, chunk by chunk at its pace (never faster than the connection takes
    it), then close_notify."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    for index, data in sender.chunks():
        delay = began + tr.due(index, sender.total, duration) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # pacing: the schedule, not a wait for an event
        await stream.write(data)
        sender.sent_ok(data)
    await stream.close_notify()


async def _receive(stream: TlsStream, check: tr.EchoCheck) -> None:
    while data := await stream.read():
        check.feed(data)


async def transfer(
    config: Config,
    ctx: ssl.SSLContext,
    number: int,
    clock: Callable[[], float] = time.perf_counter,
) -> Result:
    """One transfer-mode attempt within ``config.timeout``; never raises (except on
    cancellation). The echo is read while the payload is sent, so neither direction
    stalls the other; if the echo ends first, sending stops."""
    assert config.transfer_bytes is not None
    started = clock()
    seed = tr.payload_seed(config.client_id, number)
    sender = tr.Sender(seed, config.transfer_bytes)
    check = tr.EchoCheck(seed, config.transfer_bytes)
    phase: Phase = "connect"
    error: BaseException | None = None
    writer: asyncio.StreamWriter | None = None
    stream: TlsStream | None = None
    exchange_began: float | None = None
    deadline = asyncio.timeout(config.timeout)
    try:
        async with deadline:
            reader, writer = await asyncio.open_connection(
                config.host, config.port, limit=TRANSFER_READ_LIMIT
            )
            phase = "handshake"
            stream = await TlsStream.handshake(reader, writer, ctx, config.server_name)
            phase = "exchange"
            exchange_began = clock()
            sending = asyncio.create_task(
                _send(stream, sender, config.transfer_time), name=f"send-{number}"
            )
            try:
                await _receive(stream, check)
            finally:
                if not sending.done():
                    sending.cancel()  # the echo ended (or failed) first
                (sent,) = await asyncio.gather(sending, return_exceptions=True)
            if isinstance(sent, Exception):
                error = sent  # e.g. a reset noticed while writing
    except TimeoutError as exc:
        if not deadline.expired():
            error = exc  # a kernel timeout, not ours
    except Exception as exc:  # noqa: BLE001 - every failure is an outcome, never a crash
        error = exc
    ended = clock()
    if writer is not None:
        await _close(writer)
    progress = None
    if stream is not None:
        progress = tr.progress(sender, check, stream.end)
    verdict = classify_transfer(phase, progress, error, timed_out=deadline.expired())
    return Result(
        verdict=verdict,
        reply=b"",
        latency=ended - started,
        progress=progress,
        transfer_time=None if exchange_began is None else ended - exchange_began,
    )
