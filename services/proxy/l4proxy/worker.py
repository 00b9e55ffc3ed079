"""A worker process (``workers: N``): accepts on its listening socket, does TLS and the
data path; asks the supervisor over its channel for what must be exact proxy-wide.

Started by the supervisor as ``python -m l4proxy.worker SLOT LISTEN_FD CHANNEL_FD``
with both sockets inherited. Its log lines go to stdout, which is a pipe the supervisor
reads and writes on, whole lines at a time; each carries ``"worker": SLOT``.

What a worker asks (see :mod:`l4proxy.ledger`): ``open`` at accept when a proxy-wide
cap is configured (the connection's reading waits for the answer), ``admit`` after the
handshake, ``dial_failed`` after a failed dial, ``close`` when an admitted (or counted)
connection ends, and ``ids`` for its next block of connection ids. What it is told:
``reload``, ``drain``, ``force``, ``stop``, and asked ``stats``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import uvloop

from .channel import Channel, Message
from .config import Config, Upstream
from .connection import ClientConnection
from .gate import Answer
from .logs import JsonLog
from .proxy import Proxy
from .router import Rejected
from .tls import server_context, set_ticket_keys

if TYPE_CHECKING:
    from .metrics import Stats

# Connection ids come in blocks from the supervisor, unique across workers and restarts.
ID_BLOCK = 1_000_000
LOST = Rejected("no_healthy_upstream", "the supervisor is gone")


class IdBlocks:
    """Connection ids: this block's, then the next one's (asked for at half-way)."""

    __slots__ = ("ask", "asked", "end", "next", "spare")

    def __init__(self, start: int, ask: Callable[[Callable[[Any], None]], None]) -> None:
        self.next = start
        self.end = start + ID_BLOCK
        self.ask = ask
        self.asked = False
        self.spare: int | None = None

    def __iter__(self) -> IdBlocks:
        return self

    def __next__(self) -> int:
        value = self.next
        self.next += 1
        if self.next >= self.end:
            if self.spare is not None:  # else: count on (the answer is a block late)
                self.next, self.end = self.spare, self.spare + ID_BLOCK
                self.spare = None
                self.asked = False
        elif not self.asked and self.end - self.next < ID_BLOCK // 2:
            self.asked = True
            self.ask(self._got)
        return value

    def _got(self, start: object) -> None:
        if isinstance(start, int):
            self.spare = start


class RemoteGate:
    """The worker's gate: the supervisor's ledger, over the channel."""

    __slots__ = ("channel", "hosts", "proxy")

    def __init__(self, proxy: WorkerProxy, channel: Channel) -> None:
        self.proxy = proxy
        self.channel = channel
        self.hosts: dict[str, str] = {}  # upstream key -> address the supervisor resolved

    def opened(self, conn: ClientConnection) -> None:
        config = self.proxy.config
        if not (config.max_connections or config.max_handshakes):
            return
        assert conn.transport is not None
        conn.asked = True
        conn.transport.pause_reading()  # no TLS work until the supervisor counts it
        self.proxy.handshaking.pop(conn, None)  # not a victim of its own eviction
        self.channel.request(("open", conn.id), lambda limit: self._counted(conn, limit))

    def _counted(self, conn: ClientConnection, limit: object) -> None:
        if conn.closed or conn.transport is None:
            return
        if isinstance(limit, str) and not self.proxy.evict_handshake(limit):
            conn.refuse_at_accept(limit)
            return
        self.proxy.handshaking[conn] = None
        if not conn.transport.is_closing():
            conn.transport.resume_reading()

    def _ask(self, message: Message) -> asyncio.Future[Upstream | Rejected]:
        future: asyncio.Future[Upstream | Rejected] = self.proxy.loop.create_future()

        def answer(value: Any) -> None:
            if future.done():  # the connection ended while it waited
                return
            if value is None:
                future.set_result(LOST)
                return
            picked, host = value
            if host is not None:
                self.hosts[picked.key] = host
            future.set_result(picked)

        self.channel.request(message, answer)
        return future

    def admit(self, conn: ClientConnection) -> Answer:
        conn.asked = True
        return self._ask(("admit", conn.id, conn.identity))

    def dial_failed(self, conn: ClientConnection, reason: str) -> Answer:
        return self._ask(("dial_failed", conn.id, reason))

    def host(self, upstream: Upstream) -> str:
        return self.hosts.get(upstream.key) or upstream.address.host

    def release(self, conn: ClientConnection) -> None:
        if conn.asked:
            conn.asked = False
            self.channel.send(("close", conn.id))


class WorkerProxy(Proxy):
    """The data path of :class:`~l4proxy.proxy.Proxy` on an inherited listening socket;
    no health checks, lookups or admin listeners (the supervisor's)."""

    EVENT_PREFIX = "worker_"  # its draining and stopped lines; the supervisor's are the proxy's

    def __init__(
        self,
        config: Config,
        log: JsonLog,
        channel: Channel,
        *,
        digest: str | None,
        ids: int,
        ticket_keys: bytes,
    ) -> None:
        super().__init__(config, log, config_sha256=digest)
        self.ticket_keys = ticket_keys
        self._share_tickets()
        self.channel = channel
        self.gate = RemoteGate(self, channel)
        self.ids = IdBlocks(ids, lambda answer: channel.request(("ids",), answer))
        self.finished: asyncio.Future[tuple[str, int]] = self.loop.create_future()

    async def start_on(self, sock: socket.socket) -> None:
        self.loop.set_exception_handler(self._on_loop_error)
        self.server = await self.loop.create_server(self.new_connection, sock=sock, backlog=1024)
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))

    def _capacity_full(self, limit: str, *, refused: int = 0, evicted: int = 0) -> None:
        # The caps are the whole proxy's: the supervisor counts and writes the capacity
        # lines (with the proxy-wide counts), this worker only says what it did.
        self.channel.send(("capacity", limit, refused, evicted))

    def _share_tickets(self) -> None:
        """Every worker's context gets the supervisor's ticket keys: a client resumes on
        whichever worker its next connection lands on."""
        problem = set_ticket_keys(self.ssl_context, self.ticket_keys)
        if problem is not None:
            self.log.emit(
                "error",
                message=f"session tickets are this worker's own ({problem}): a client "
                "resumes only when it returns to the same worker",
            )

    def apply(
        self,
        config: Config,
        digest: str | None,
        ca_changed: bool,
        revoke: list[int],
        ticket_keys: bytes,
    ) -> int:
        """The supervisor reloaded: new connections get ``config``; idle timers re-arm;
        ``revoke`` (connections the new rules deny) and, when the CA changed,
        connections whose certificate it no longer accepts are ended. Returns how
        many were ended."""
        self.adopt(config, digest, server_context(config.tls))
        self.ticket_keys = ticket_keys
        self._share_tickets()
        if config.authorization.on_reload != "close":
            return 0
        denied = set(revoke)
        return self.revoke(ca_changed=ca_changed, permits=lambda conn: conn.id not in denied)

    def snapshot(self) -> tuple[Stats, Any, Any, int]:
        return self.stats, self.connection_states(), self.open_bytes(), self.open_count()

    async def stop(self, reason: str = "shutdown") -> None:
        left = self.open_count()
        await super().stop(reason)
        if not self.finished.done():
            self.finished.set_result((reason, left))


async def serve(slot: int, sock: socket.socket, channel_sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    first: asyncio.Future[Message] = loop.create_future()
    force = asyncio.Event()
    proxy: WorkerProxy | None = None
    tasks: set[asyncio.Task[Any]] = set()

    def background(coro: Any) -> None:
        task = loop.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def on_message(message: Message) -> None:
        kind = message[0]
        if proxy is None:
            if not first.done():
                first.set_result(message)
            return
        if kind == "stats":
            channel.reply(proxy.snapshot())
        elif kind == "reload":
            _, config, digest, ca_changed, revoke, keys = message
            try:
                revoked = proxy.apply(config, digest, ca_changed, revoke, keys)
            except Exception as exc:  # noqa: BLE001 - e.g. a certificate replaced since
                proxy.log.emit("error", message=f"reload not applied: {exc!r}")
                revoked = 0
            channel.reply((revoked, proxy.open_count()))
        elif kind == "drain":
            background(proxy.drain(message[1], force=force.wait()))
        elif kind == "force":
            force.set()
        elif kind == "stop":
            background(proxy.stop(message[1]))

    def on_lost() -> None:  # the supervisor is gone: nobody can admit; stop at once
        if proxy is not None and not proxy.stopping:
            background(proxy.stop("shutdown"))
        elif not first.done():
            first.set_exception(ConnectionError("the supervisor closed the channel"))

    channel = Channel(loop, on_message, on_lost)
    await loop.create_unix_connection(lambda: channel, sock=channel_sock)
    kind, config, digest, start, keys = await first
    assert kind == "config"
    log = JsonLog(fields={"worker": slot})
    proxy = WorkerProxy(config, log, channel, digest=digest, ids=start, ticket_keys=keys)
    await proxy.start_on(sock)
    channel.send(("started", os.getpid()))
    reason, left = await proxy.finished
    channel.send(("stopped", reason, left))
    channel.close()
    for task in list(tasks):
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    slot, listen_fd, channel_fd = (int(a) for a in args)
    # Signals for the proxy go to the supervisor, which tells the workers what to do.
    # Some reach every process (Ctrl-C in a terminal, systemd's stop of a whole cgroup):
    # a worker that died of them would cut its connections instead of draining them.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sock = socket.socket(fileno=listen_fd)
    channel_sock = socket.socket(fileno=channel_fd)
    try:
        return uvloop.run(serve(slot, sock, channel_sock))
    except ConnectionError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
