"""Load generator for the benchmark: mTLS clients on uvloop, driven by ``bench/run.py``.

    python bench/loadgen.py {bulk,pingpong,churn,idle} --address HOST:PORT --certs DIR ...

TLS is uvloop's own TLS transport (``create_connection(ssl=...)``, implemented in
Cython), the cheapest client side available here; every connection does a full
handshake with a client certificate (client.a .. client.e in turn, no session reuse),
except in ``resumption``: there each identity offers the last session ticket it got
(TLS 1.3 resumption, as a returning client does), and the result counts how many
handshakes the server resumed.

It talks to the runner with JSON lines. On stdout::

    {"event": "checkpoint", "name": "start", ...}   then it waits for one line on stdin
    {"event": "done", "result": {...}}
    {"event": "error", "message": "..."}            (exit status 1)

The runner samples the proxy's CPU time and memory at every checkpoint, so the work
between two checkpoints is exactly what its figures are divided by. Warm-up and
connection set-up happen before the first checkpoint of a workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import struct
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import uvloop

STEMS = ("client.a", "client.b", "client.c", "client.d", "client.e")
HEADER = struct.Struct("!Q")
CHUNK = 256 * 1024
SERVER_NAME = "localhost"
HANDSHAKE_TIMEOUT = 15.0
SHUTDOWN_TIMEOUT = 5.0
CLOSE_WAIT = 10.0  # seconds to wait for every connection to finish closing

T = TypeVar("T")


class WorkloadError(Exception):
    """The workload cannot go on (too many failures, a wrong byte count...)."""


# --------------------------------------------------------------------------- plumbing


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n")
    sys.stdout.flush()


class Control:
    """Checkpoints: tell the runner where we are, wait until it has taken its samples."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    @classmethod
    async def open(cls) -> Control:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return cls(reader)

    async def checkpoint(self, name: str, **fields: Any) -> None:
        emit("checkpoint", name=name, **fields)
        line = await self.reader.readline()
        if not line:
            raise WorkloadError("the runner went away (stdin closed)")


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last session it was given. uvloop's TLS
    transport makes its SSLObject with ``wrap_bio`` (which takes a session) and has no
    other way to pass one."""

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.session
        )


def contexts(certs: Path, *, resume: bool = False) -> list[ssl.SSLContext]:
    out = []
    kind = ResumingContext if resume else ssl.SSLContext
    for stem in STEMS:
        ctx = kind(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(certs / "ca.pem"))
        ctx.load_cert_chain(str(certs / f"{stem}.pem"), str(certs / f"{stem}.key"))
        out.append(ctx)
    return out


class Client(asyncio.Protocol):
    """Base protocol: the transport, and a future that completes when it is closed."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.ctx: ssl.SSLContext | None = None  # the context it was dialled with
        self.closed: asyncio.Future[None] = self.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_lost(exc)

    def on_lost(self, exc: Exception | None) -> None:
        pass


class EchoClient(Client):
    """Request/response: send ``message``, wait until as many bytes came back, repeat.

    Driven from the callbacks (no coroutine per message) to keep the client cheap."""

    def __init__(self, message: bytes, latencies: list[int] | None = None) -> None:
        super().__init__()
        self.message = message
        self.latencies = latencies
        self.pending = 0
        self.remaining = 0
        self.sent_at = 0
        self.done: asyncio.Future[None] | None = None

    def run(self, count: int) -> asyncio.Future[None]:
        self.done = self.loop.create_future()
        self.remaining = count
        self._send()
        return self.done

    def _send(self) -> None:
        assert self.transport is not None
        self.pending += len(self.message)
        self.sent_at = time.perf_counter_ns()
        self.transport.write(self.message)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending > 0:
            return
        done = self.done
        if done is None or done.done():
            return
        if self.pending < 0:
            done.set_exception(WorkloadError("more bytes came back than were sent"))
            return
        if self.latencies is not None:
            self.latencies.append((time.perf_counter_ns() - self.sent_at) // 1000)
        self.remaining -= 1
        if self.remaining > 0:
            self._send()
        else:
            done.set_result(None)

    def on_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost mid-exchange: {exc!r}"))


class BulkClient(Client):
    """Streams bytes with flow control; the sink upstream acks the count at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.writable = asyncio.Event()
        self.writable.set()
        self.buf = b""
        self.acked: asyncio.Future[int] = self.loop.create_future()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= HEADER.size and not self.acked.done():
            self.acked.set_result(HEADER.unpack_from(self.buf)[0])

    def on_lost(self, exc: Exception | None) -> None:
        if not self.acked.done():
            self.acked.set_exception(ConnectionError(f"connection lost before the ack: {exc!r}"))
        self.writable.set()


class Dialer:
    def __init__(self, address: tuple[str, int], ctxs: Sequence[ssl.SSLContext]) -> None:
        self.host, self.port = address
        self.ctxs = ctxs
        self.n = 0
        self.loop = asyncio.get_running_loop()
        self.tls: list[Any] | None = None  # (cipher, version, bits) of the first connection

    async def connect(self, factory: Callable[[], T]) -> T:
        ctx = self.ctxs[self.n % len(self.ctxs)]
        self.n += 1
        transport, proto = await self.loop.create_connection(
            cast("Callable[[], asyncio.Protocol]", factory),
            self.host,
            self.port,
            ssl=ctx,
            server_hostname=SERVER_NAME,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        if self.tls is None:
            cipher = transport.get_extra_info("cipher")
            self.tls = list(cipher) if cipher else []
        if isinstance(proto, Client):
            proto.ctx = ctx
        return cast(T, proto)


async def close_all(clients: Sequence[Client], grace: float = CLOSE_WAIT) -> int:
    """Close every connection (close_notify + FIN); abort those not closed in time.

    Returns how many had to be aborted."""
    for c in clients:
        if c.transport is not None and not c.transport.is_closing():
            c.transport.close()
    pending = [c.closed for c in clients if not c.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace)
    aborted = 0
    for c in clients:
        if not c.closed.done() and c.transport is not None:
            c.transport.abort()
            aborted += 1
    return aborted


def failure_name(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{type(exc).__name__}[{exc.errno}]"
    return type(exc).__name__


async def bounded(
    total: int, concurrency: int, one: Callable[[int], Awaitable[None]], failures: Counter[str]
) -> None:
    """Run ``one(i)`` for i in range(total), ``concurrency`` at a time; count failures."""
    it = iter(range(total))

    async def worker() -> None:
        for i in it:
            try:
                await one(i)
            except (OSError, ssl.SSLError, TimeoutError, EOFError, WorkloadError) as exc:
                failures[failure_name(exc)] += 1

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, total)))))


def check_failures(failures: Counter[str], attempted: int, allowed_fraction: float) -> None:
    n = sum(failures.values())
    if n > max(0, int(attempted * allowed_fraction)):
        raise WorkloadError(f"{n} of {attempted} connections failed: {dict(failures)}")


# --------------------------------------------------------------------------- workloads


async def bulk(args: argparse.Namespace, dialer: Dialer, control: Control) -> dict[str, Any]:
    size = int(args.bytes_per_conn)
    payload = os.urandom(CHUNK)
    clients = [await dialer.connect(BulkClient) for _ in range(args.conns)]
    for c in clients:
        assert c.transport is not None
        c.transport.set_write_buffer_limits(high=4 * CHUNK, low=CHUNK)
        c.transport.write(HEADER.pack(size))
    durations: list[float] = []

    async def stream(c: BulkClient) -> int:
        started = time.perf_counter()
        t = c.transport
        assert t is not None
        sent = 0
        while sent < size:
            if c.closed.done():
                raise ConnectionError("closed while streaming")
            n = min(CHUNK, size - sent)
            t.write(payload if n == CHUNK else payload[:n])
            sent += n
            if not c.writable.is_set():
                await c.writable.wait()
        acked = await c.acked
        durations.append(time.perf_counter() - started)
        return acked

    await control.checkpoint("start")
    started = time.perf_counter()
    acks = await asyncio.gather(*(stream(c) for c in clients))
    seconds = time.perf_counter() - started
    await control.checkpoint("end")
    aborted = await close_all(clients)
    if any(a != size for a in acks):
        raise WorkloadError(f"the sink acked {acks}, expected {size} each")
    return {
        "connections": len(clients),
        "bytes": size * len(clients),
        "seconds": seconds,
        "per_connection_seconds": durations,
        "aborted_at_close": aborted,
    }


async def pingpong(args: argparse.Namespace, dialer: Dialer, control: Control) -> dict[str, Any]:
    message = os.urandom(args.size)
    latencies: list[int] = []
    clients = [
        await dialer.connect(lambda: EchoClient(message, latencies)) for _ in range(args.conns)
    ]
    # Warm-up: a few exchanges on every connection, not counted.
    await asyncio.gather(*(c.run(args.warmup) for c in clients))
    latencies.clear()
    per = [
        args.total // args.conns + (1 if i < args.total % args.conns else 0)
        for i in range(args.conns)
    ]
    await control.checkpoint("start")
    started = time.perf_counter()
    await asyncio.gather(*(c.run(n) for c, n in zip(clients, per, strict=True) if n > 0))
    seconds = time.perf_counter() - started
    await control.checkpoint("end")
    aborted = await close_all(clients)
    return {
        "connections": len(clients),
        "messages": len(latencies),
        "message_size": args.size,
        "seconds": seconds,
        "latency_us": latencies,
        "aborted_at_close": aborted,
    }


async def one_request(
    dialer: Dialer,
    message: bytes,
    handshake_us: list[int] | None,
    request_us: list[int] | None,
    resumed: Counter[str] | None = None,
) -> None:
    """A new connection for one request, like the lab's client: connect, handshake, send,
    read the whole reply, close (close_notify), wait for the close to finish. With
    ``resumed``, the session (with the ticket that came after the handshake) is kept for
    the identity's next connection, and whether this one resumed is counted."""
    started = time.perf_counter_ns()
    client = await dialer.connect(lambda: EchoClient(message))
    connected = time.perf_counter_ns()
    try:
        await client.run(1)
        replied = time.perf_counter_ns()
        if resumed is not None:
            keep_session(client, resumed)
    finally:
        await close_all([client], grace=SHUTDOWN_TIMEOUT)
    if handshake_us is not None:
        handshake_us.append((connected - started) // 1000)
    if request_us is not None:
        request_us.append((replied - started) // 1000)


def keep_session(client: Client, resumed: Counter[str]) -> None:
    """Count whether the server resumed this connection's session, and keep its session
    (now holding the ticket sent after the handshake) for the identity's next one."""
    if client.transport is None or not isinstance(client.ctx, ResumingContext):
        return
    sslobj = client.transport.get_extra_info("ssl_object")
    if sslobj is None:
        return
    resumed["resumed" if sslobj.session_reused else "full"] += 1
    if sslobj.session is not None:
        client.ctx.session = sslobj.session


async def churn(args: argparse.Namespace, dialer: Dialer, control: Control) -> dict[str, Any]:
    message = os.urandom(args.size)
    handshake_us: list[int] = []
    request_us: list[int] = []
    warm: Counter[str] = Counter()
    resuming = args.workload == "resumption"
    warm_resumed: Counter[str] | None = Counter() if resuming else None
    await bounded(
        args.warmup,
        args.concurrency,
        lambda _i: one_request(dialer, message, None, None, warm_resumed),
        warm,
    )
    failures: Counter[str] = Counter()
    resumed: Counter[str] | None = Counter() if resuming else None
    await control.checkpoint("start", warmup_failures=dict(warm))
    started = time.perf_counter()
    await bounded(
        args.total,
        args.concurrency,
        lambda _i: one_request(dialer, message, handshake_us, request_us, resumed),
        failures,
    )
    seconds = time.perf_counter() - started
    await control.checkpoint("end")
    check_failures(failures, args.total, 0.01)
    return {
        "connections": len(request_us),
        "failures": dict(failures),
        "message_size": args.size,
        "concurrency": args.concurrency,
        "seconds": seconds,
        "handshake_us": handshake_us,
        "request_us": request_us,
        "resumed": dict(resumed) if resumed is not None else None,
    }


async def idle(args: argparse.Namespace, dialer: Dialer, control: Control) -> dict[str, Any]:
    message = os.urandom(args.size)
    hello = os.urandom(16)
    warm: Counter[str] = Counter()
    await bounded(args.warmup, 8, lambda _i: one_request(dialer, message, None, None), warm)
    probe_empty: list[int] = []
    probe_held: list[int] = []
    probe_failures: Counter[str] = Counter()
    for _ in range(args.probes):
        await asyncio.sleep(0.05)
        await bounded(1, 1, lambda _i: one_request(dialer, message, None, probe_empty), warm)
    await control.checkpoint("baseline", warmup_failures=dict(warm))

    held: list[EchoClient] = []
    failures: Counter[str] = Counter()
    handshake_us: list[int] = []

    async def open_one(_i: int) -> None:
        started = time.perf_counter_ns()
        client = await dialer.connect(lambda: EchoClient(hello))
        handshake_us.append((time.perf_counter_ns() - started) // 1000)
        held.append(client)
        await asyncio.wait_for(client.run(1), HANDSHAKE_TIMEOUT)  # forwarded end to end

    started = time.perf_counter()
    await bounded(args.conns, args.concurrency, open_one, failures)
    open_seconds = time.perf_counter() - started
    check_failures(failures, args.conns, 0.01)
    await asyncio.sleep(args.settle)
    alive = sum(1 for c in held if not c.closed.done())
    await control.checkpoint("held", held=alive, open_seconds=open_seconds)

    for _ in range(args.probes):
        await asyncio.sleep(0.05)
        await bounded(
            1, 1, lambda _i: one_request(dialer, message, None, probe_held), probe_failures
        )
    still = sum(1 for c in held if not c.closed.done())
    await control.checkpoint("probed", held=still)
    aborted = await close_all(held, grace=max(CLOSE_WAIT, args.conns / 500))
    return {
        "connections": args.conns,
        "opened": len(held),
        "held_at_measure": alive,
        "held_after_probes": still,
        "failures": dict(failures),
        "open_seconds": open_seconds,
        "handshake_us": handshake_us,
        "probe_us_empty": probe_empty,
        "probe_us_held": probe_held,
        "probe_failures": dict(probe_failures),
        "aborted_at_close": aborted,
    }


Workload = Callable[[argparse.Namespace, Dialer, Control], Awaitable[dict[str, Any]]]
WORKLOADS: dict[str, Workload] = {
    "bulk": bulk,
    "pingpong": pingpong,
    "churn": churn,
    "resumption": churn,  # churn with each identity's last session offered
    "idle": idle,
}


async def amain(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, _ctx: None)  # failures are counted, not logged
    host, _, port = str(args.address).rpartition(":")
    ctxs = contexts(Path(args.certs), resume=args.workload == "resumption")
    dialer = Dialer((host, int(port)), ctxs)
    control = await Control.open()
    try:
        result = await WORKLOADS[args.workload](args, dialer, control)
    except (WorkloadError, OSError, ssl.SSLError, EOFError) as exc:
        emit("error", message=f"{type(exc).__name__}: {exc}")
        return 1
    result["tls"] = dialer.tls
    emit("done", result=result)
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    parser.add_argument("--address", required=True, help="the proxy, HOST:PORT")
    parser.add_argument("--certs", required=True, help="certgen's output folder")
    parser.add_argument("--conns", type=int, default=8, help="connections (held/streaming)")
    parser.add_argument("--bytes-per-conn", type=int, default=32 << 20, help="bulk")
    parser.add_argument("--total", type=int, default=20000, help="messages or connections")
    parser.add_argument("--size", type=int, default=1024, help="message size")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--probes", type=int, default=0, help="idle: responsiveness probes")
    parser.add_argument("--settle", type=float, default=1.0, help="idle: pause before measuring")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return uvloop.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
