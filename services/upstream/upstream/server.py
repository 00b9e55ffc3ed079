"""The I/O shell of the upstream: an asyncio server whose connections are Protocols.

Each connection moves through phases::

    reading --(trigger)--> waiting --(delay over)--> responding | draining --> closed

* The *trigger* is: reply mode -- the message is complete (newline, 64 KiB, EOF, or
  100 ms without new bytes after at least one); echo mode -- the first bytes arrived;
  sink mode -- the peer's EOF.  A connection that ends before sending any byte (a health
  check) never triggers: it is closed at once and logged as ``empty``.
* *waiting* lasts ``--delay`` (reading is paused meanwhile); then the fault, if any, is
  applied instead of the normal response.
* reply mode answers, half-closes (FIN) and *drains*: it reads and discards until the
  peer's EOF, for at most :data:`LINGER` seconds, then closes.  Closing only after the
  peer is done avoids the RST a close with unread input would cause.
* echo mode copies bytes back (reading pauses while the write buffer is above its
  high-water mark) and closes after the peer's EOF once everything is written.
* With ``--proxy-protocol v2`` the bytes first go through a
  :class:`upstream.proxyproto.HeaderReader`: they are held until the PROXY header is
  complete, and only the payload after it enters the phases above. A bad header (e.g. a
  client speaking first without one) aborts the connection at once
  (``proxy_protocol_error``); a header and then nothing (a ``LOCAL`` health check from
  the proxy) is ``empty``.
* With ``--trusted-proxy`` a connection from any other peer is aborted before a byte is
  read (``untrusted_proxy``); a peer that matches nothing waits (reading paused) for a
  look-up of the trusted names that started after it connected (:mod:`upstream.trust`).

All decisions live in :mod:`upstream.decide`; this module only moves bytes and arms timers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, cast

from l4common.backlog import adopt_queued
from l4common.logs import JsonLog

from .config import Config, format_address
from .decide import (
    MESSAGE_CAP,
    QUIET_PERIOD,
    Action,
    EmptyLogThrottle,
    Outcome,
    final_outcome,
    message_end,
    message_text,
    remaining,
    reply_bytes,
)
from .faults import Fault, FaultSwitch, RequestError, parse_request
from .proxyproto import Complete, Header, HeaderReader, NeedMore
from .trust import TrustedPeers

LINGER = 2.0  # reply mode: how long to wait for the peer's EOF after our reply and FIN
SHUTDOWN_GRACE = 2.0  # how long stop() lets open connections finish before aborting them
BACKLOG = 1024
RESOLVE_TIMEOUT = 2.0  # one look-up of a --trusted-proxy name
# getaddrinfo's answers for a name that does not exist (as opposed to a failed look-up).
NAME_GONE = frozenset(
    getattr(socket, code) for code in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, code)
)
DRIP_HOLD = 64 * 1024  # drip: stop reading while this much waits to be sent
CONTROL_TIMEOUT = 5.0  # a control client has this long to send its one request line

Phase = Literal["reading", "waiting", "hanging", "responding", "draining"]
Clock = Callable[[], float]


def format_peer(peername: Any) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        return format_address(str(peername[0]), int(peername[1]))
    return str(peername) if peername else "-"


class Connection(asyncio.Protocol):
    """One accepted connection, from accept to its ``connection`` log line."""

    def __init__(self, server: UpstreamServer) -> None:
        self.server = server
        self.config = server.config
        self.loop = server.loop
        self.clock = server.clock
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.started = self.clock()
        self.last_activity = self.started
        self.phase: Phase = "reading"
        self.bytes_in = 0  # payload bytes: a PROXY header is counted in header_bytes
        self.bytes_out = 0
        self.header_bytes = 0
        # --proxy-protocol v2: decodes the header; None when off or once decided.
        self.header_reader = HeaderReader() if self.config.proxy_protocol == "v2" else None
        self.proxy_header: Header | None = None
        self.proxy_error: str | None = None  # why the PROXY header was rejected
        self.refusal: str | None = None  # why the peer was not served (untrusted_proxy)
        # --trusted-proxy: bytes (and EOF) that arrived before the peer was judged.
        self.trust_pending = False
        self.held_before_trust = bytearray()
        self.eof_before_trust = False
        self.peer_ip = ""
        self.message = bytearray()  # reply mode: the message so far (at most MESSAGE_CAP)
        self.held = bytearray()  # echo mode: bytes received while waiting for the delay
        self.peer_eof = False
        self.action: Action | None = None
        self.respond_due = 0.0
        self.paused: set[str] = set()
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.fault: Fault | None = None  # the run-time fault in force when it triggered
        self.outbox = bytearray()  # drip: bytes not yet sent
        self.after_sent: Callable[[], None] | None = None  # run once the outbox is empty

    # --- asyncio callbacks -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = self.transport.get_extra_info("peername")
        self.peer = format_peer(peername)
        self.peer_ip = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        self.server.connection_started(self)
        if self.header_reader is not None and self.server.trust.enabled:
            self._check_trust()
        if self.config.idle_timeout > 0:
            self._arm("idle", self.config.idle_timeout, self._on_idle)

    def data_received(self, data: bytes) -> None:
        self.last_activity = self.clock()
        if self.trust_pending:
            # uvloop starts reading after connection_made even if it paused reading
            # there: hold what comes until the peer is judged, and pause now.
            self.held_before_trust += data
            if self.transport is not None:
                self.transport.pause_reading()
            return
        if self.header_reader is not None:
            data = self._strip_prefix(data)
            if not data:
                return
        self.bytes_in += len(data)
        self._on_payload(data)

    def eof_received(self) -> bool:
        if self.trust_pending:
            self.eof_before_trust = True
            return True
        self.peer_eof = True
        if self.phase == "reading":
            if self.bytes_in == 0:
                # An empty connection (e.g. a health check), possibly after a PROXY
                # header, or one that ended inside its header.
                self._close()
            elif self.config.mode == "reply":
                self._complete_message(len(self.message))
            else:
                self._trigger()
        elif self.phase in ("responding", "draining"):
            self._then(self._close)
        # waiting: the response will see peer_eof and close after it; hanging: the
        # peer is done, and so is the connection.
        elif self.phase == "hanging":
            self._close()
        return True  # we close explicitly, after our own writes

    def pause_writing(self) -> None:
        self._pause("backpressure")

    def resume_writing(self) -> None:
        self._resume("backpressure")

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        if self.header_reader is not None and self.header_bytes and self.proxy_error is None:
            self.proxy_error = "incomplete header"  # it ended inside its PROXY header
        outcome = final_outcome(
            self.config.mode,
            bytes_in=self.bytes_in,
            action=self.action,
            lost_with_error=exc is not None,
            proxy_protocol_failed=self.proxy_error is not None,
        )
        self.server.connection_done(self, outcome, self.clock())

    def _check_trust(self) -> None:
        """May this peer send PROXY headers? Serve, refuse, or wait for a look-up of the
        trusted names that started after the peer connected."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        trust = self.server.trust
        verdict = trust.verdict(self.peer_ip, self.started)
        if verdict == "trusted":
            self.trust_pending = False
            self._resume("trust")
            held, self.held_before_trust = bytes(self.held_before_trust), bytearray()
            if held:
                self.data_received(held)
            if self.eof_before_trust and not transport.is_closing():
                self.eof_received()
        elif verdict == "resolve":
            self.trust_pending = True
            self._pause("trust")
            self.server.refresh_trust(self.started).add_done_callback(
                lambda done: None if done.cancelled() else self._check_trust()
            )
        else:
            self.action = "untrusted_proxy"
            trusted = ", ".join(trust.spec.describe())
            self.refusal = f"peer {self.peer_ip} is not a trusted proxy ({trusted})"
            transport.abort()

    # --- the read path ---------------------------------------------------------------

    def _strip_prefix(self, data: bytes) -> bytes:
        """PROXY protocol v2: hold bytes until the header is complete, then return the
        payload after it (``b""`` while incomplete, or if nothing followed it yet).

        The header's bytes are counted in ``header_bytes`` (every byte received, when it
        is rejected), not in ``bytes_in``. ``self.peer`` stays the socket's peer (the
        proxy); the header's source is :attr:`client_addr`.
        """
        reader = self.header_reader
        if reader is None:
            return data
        result = reader.feed(data)
        self.header_bytes = reader.buffered
        if isinstance(result, NeedMore):
            return b""
        self.header_reader = None
        if isinstance(result, Complete):
            self.proxy_header = result.header
            self.header_bytes = result.header.length
            return result.payload
        self.proxy_error = result.reason
        if self.transport is not None:
            self.transport.abort()
        return b""

    @property
    def client_addr(self) -> str | None:
        """``ip:port`` of the real client, from the PROXY header (``None`` without one)."""
        source = self.proxy_header.source if self.proxy_header is not None else None
        return format_address(*source) if source is not None else None

    @property
    def identity(self) -> str | None:
        """The client identity the PROXY header carried, if any."""
        return self.proxy_header.identity if self.proxy_header is not None else None

    @property
    def proxy_protocol(self) -> str | None:
        """``v2-proxy`` or ``v2-local`` once a header was read, else ``None``."""
        return f"v2-{self.proxy_header.command}" if self.proxy_header is not None else None

    def _on_payload(self, payload: bytes) -> None:
        mode = self.config.mode
        if self.phase == "reading":
            if mode == "reply":
                self.message += payload[: MESSAGE_CAP - len(self.message)]
                end = message_end(self.message)
                if end is not None:
                    self._complete_message(end)
                else:
                    self._arm("quiet", QUIET_PERIOD, self._on_quiet)
            elif mode == "echo":
                self.held += payload
                self._trigger()
            # sink: discard; its trigger is the peer's EOF
        elif self.phase == "waiting" and mode == "echo":
            self.held += payload  # delivered in the same batch as the pause
        elif self.phase == "responding" and mode == "echo":
            self._write(payload)
        # otherwise (reply/sink after the trigger, draining): read and discard

    def _on_quiet(self) -> None:
        self.timers.pop("quiet", None)
        if self.phase == "reading":
            self._complete_message(len(self.message))

    def _complete_message(self, end: int) -> None:
        self._cancel("quiet")
        del self.message[end:]
        self._trigger()

    # --- responding ------------------------------------------------------------------

    def _trigger(self) -> None:
        now = self.clock()
        self.fault = self.server.faults.active(now)
        if self.fault is not None and self.fault.kind == "hang":
            # Accept and never answer: keep reading (and dropping) so that the peer's
            # close, or the idle timeout, ends the connection.
            self.phase = "hanging"
            self.action = "fault_hang"
            self.held.clear()
            return
        self.phase = "waiting"
        self._pause("respond")
        extra = self.fault.delay if self.fault is not None and self.fault.kind == "delay" else 0.0
        self.respond_due = now + self.config.delay + extra
        self._on_due()

    def _on_due(self) -> None:
        self.timers.pop("delay", None)
        # A timer may fire a little early (loop clocks are coarse): re-arm for the rest,
        # so a response never starts before the full delay has passed.
        left = remaining(self.respond_due, self.clock())
        if left > 0:
            self._arm("delay", left, self._on_due)
        else:
            self._respond()

    def _respond(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.last_activity = self.clock()
        kind = self.fault.kind if self.fault is not None else None
        if self.config.fault == "close" or kind == "close":
            self.action = "fault_close"
            self._close()
            return
        if self.config.fault == "reset" or kind == "abort":
            self.action = "fault_reset"
            self._reset()
            return
        mode = self.config.mode
        if mode == "reply":
            self._write(reply_bytes(self.config.name))
            self.action = "replied"
            self._then(self._after_reply)
        elif mode == "echo":
            self.phase = "responding"
            held = bytes(self.held)
            self.held.clear()
            self._write(held)
            if self.peer_eof:
                self._then(self._close)
            else:
                self._resume("respond")
        else:
            self._close()  # sink: the peer's EOF was the trigger

    def _after_reply(self) -> None:
        """Reply mode, the reply sent: half-close and drain, or close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.peer_eof or not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self.phase = "draining"
        self._arm("linger", LINGER, self._close)
        self._resume("respond")

    def _then(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once every byte written so far has been handed to the
        transport (at once, unless a drip is still sending)."""
        if self.outbox:
            self.after_sent = callback
        else:
            callback()

    def _drip(self) -> None:
        """Send the next piece of the outbox; re-arm until it is empty."""
        self.timers.pop("drip", None)
        transport, fault = self.transport, self.fault
        if transport is None or transport.is_closing() or fault is None:
            return
        piece = bytes(self.outbox[: fault.drip_bytes])
        del self.outbox[: len(piece)]
        transport.write(piece)
        self.bytes_out += len(piece)
        self.last_activity = self.clock()
        if len(self.outbox) <= DRIP_HOLD:
            self._resume("drip")
        if self.outbox:
            self._arm("drip", fault.drip_interval, self._drip)
        elif self.after_sent is not None:
            callback, self.after_sent = self.after_sent, None
            callback()

    def _on_idle(self) -> None:
        self.timers.pop("idle", None)
        idle = self.config.idle_timeout
        left = remaining(self.last_activity + idle, self.clock())
        if self.phase == "waiting" or "drip" in self.timers:
            left = idle  # we are the slow side: the delay is bounded, keep waiting
        if left > 0:
            self._arm("idle", left, self._on_idle)
            return
        self.action = "idle_timeout"
        self._close()

    # --- primitives ------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if not data or transport is None or transport.is_closing():
            return
        if self.fault is not None and self.fault.kind == "drip":
            # The first piece goes at once, the next ones one interval apart.
            self.outbox += data
            if len(self.outbox) > DRIP_HOLD:
                self._pause("drip")
            if "drip" not in self.timers:
                self._drip()
            return
        transport.write(data)
        self.bytes_out += len(data)
        self.last_activity = self.clock()

    def _close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _reset(self) -> None:
        """Abort with an RST: SO_LINGER {on, 0 s} makes close(2) discard and reset."""
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):  # already dead: abort() below still ends it
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()

    def shutdown(self) -> None:
        """The server is stopping: end this connection now."""
        if self.action is None:
            self.action = "shutdown"
        if self.transport is not None:
            self.transport.abort()

    def _pause(self, reason: str) -> None:
        transport = self.transport
        if not self.paused and transport is not None and not transport.is_closing():
            transport.pause_reading()
        self.paused.add(reason)

    def _resume(self, reason: str) -> None:
        self.paused.discard(reason)
        transport = self.transport
        if not self.paused and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def _arm(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel(name)
        self.timers[name] = self.loop.call_later(delay, callback)

    def _cancel(self, name: str) -> None:
        timer = self.timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def message_for_log(self) -> str | None:
        return message_text(self.message) if self.config.mode == "reply" else None


class UpstreamServer:
    """A running upstream: its listener, its open connections, its counters."""

    def __init__(
        self,
        config: Config,
        log: JsonLog,
        loop: asyncio.AbstractEventLoop,
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.loop = loop
        self.clock = clock
        self.connections: set[Connection] = set()
        self.throttle = EmptyLogThrottle(config.empty_log_interval)
        self.accepted = 0
        self.outcomes: Counter[str] = Counter()
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._no_connections = asyncio.Event()
        self._no_connections.set()
        self.trust = TrustedPeers(config.trusted_proxies)
        self._resolving: asyncio.Task[None] | None = None
        self._resolving_started: float | None = None  # None: waiting to start
        self.faults = FaultSwitch()
        self._fault_expiry: asyncio.TimerHandle | None = None
        self._control: asyncio.Server | None = None

    async def start(self) -> None:
        cfg = self.config
        self._server = await self.loop.create_server(
            lambda: Connection(self), cfg.host, cfg.port, reuse_address=True, backlog=BACKLOG
        )
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self.log.emit(
            "listening",
            address=format_address(*self.address),
            name=cfg.name,
            mode=cfg.mode,
            fault=cfg.fault,
            delay_ms=round(cfg.delay * 1000, 3),
            proxy_protocol=cfg.proxy_protocol,
            trusted_proxies=cfg.trusted_proxies.describe() or None,
            control=cfg.control,
        )
        if cfg.control is not None:
            await self._start_control(cfg.control)

    # --- run-time faults: the control socket -------------------------------------------

    async def _start_control(self, path: str) -> None:
        """A Unix socket only this container's user can use (0600); one JSON request
        line per connection, one JSON answer line."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(self._on_control, path)
        finally:
            os.umask(old)

    async def _on_control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(CONTROL_TIMEOUT):
                line = await reader.readline()
            answer = self.control(line)
        except (TimeoutError, ConnectionError, ValueError) as exc:
            answer = {"ok": False, "error": f"no request line: {exc or type(exc).__name__}"}
        with contextlib.suppress(ConnectionError):
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    def control(self, line: bytes) -> dict[str, object]:
        """Carry out one control request; the answer (never an exception)."""
        now = self.clock()
        try:
            request = parse_request(line.strip(), now)
        except RequestError as exc:
            return {"ok": False, "error": str(exc)}
        if request.op == "set" and request.fault is not None:
            self.faults.set(request.fault)
            self._arm_expiry(request.fault)
            self.log.emit("fault", op="set", upstream=self.config.name, **self._fault_fields(now))
        elif request.op == "clear":
            cleared = self.faults.clear()
            self._arm_expiry(None)
            if cleared is not None:
                self.log.emit(
                    "fault", op="clear", upstream=self.config.name, fault=cleared.describe()
                )
        # ts: the wall clock when it took effect, for whoever lines it up with logs.
        return {"ok": True, "ts": round(time.time(), 6), **self.faults.state(now)}

    def _fault_fields(self, now: float) -> dict[str, object]:
        state = self.faults.state(now)
        return {"fault": state["fault"], "left_s": state.get("left_s")}

    def _arm_expiry(self, fault: Fault | None) -> None:
        if self._fault_expiry is not None:
            self._fault_expiry.cancel()
            self._fault_expiry = None
        if fault is not None and fault.until is not None:
            delay = max(0.0, fault.until - self.clock())
            self._fault_expiry = self.loop.call_later(delay, self._expire, fault)

    def _expire(self, fault: Fault) -> None:
        self._fault_expiry = None
        if self.faults.fault is fault:
            self.faults.clear()
            self.log.emit("fault", op="expired", upstream=self.config.name, fault=fault.describe())

    def refresh_trust(self, arrived: float) -> asyncio.Task[None]:
        """A look-up of the trusted names that starts at ``arrived`` or later, shared by
        every peer waiting for one; look-ups start at most once per refresh interval."""
        previous = self._resolving
        if previous is not None and not previous.done():
            started = self._resolving_started
            if started is None or started >= arrived:
                return previous
        else:
            previous = None
        self._resolving_started = None
        self._resolving = self.loop.create_task(
            self._resolve_trusted(previous), name="resolve-trusted-proxies"
        )
        return self._resolving

    async def _resolve_trusted(self, previous: asyncio.Task[None] | None) -> None:
        async def addresses_of(name: str) -> list[str] | None:
            try:
                async with asyncio.timeout(RESOLVE_TIMEOUT):
                    infos = await self.loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except socket.gaierror as exc:
                if exc.errno in NAME_GONE:
                    return []  # no such name (any more): trusted by nobody's address
                return None  # the look-up failed: keep the last answer
            except (OSError, TimeoutError):
                return None
            return [str(info[4][0]) for info in infos]

        if previous is not None:
            await asyncio.wait([previous])  # one look-up in flight at a time
        delay = self.trust.lookup_delay(self.clock())
        if delay > 0:
            await asyncio.sleep(delay)  # the look-up rate limit, not a synchronisation
        started = self.clock()
        self._resolving_started = started
        names = self.trust.spec.names
        found = await asyncio.gather(*(addresses_of(name) for name in names))
        if self.trust.update(dict(zip(names, found, strict=True)), started):
            self.log.emit(
                "trust",
                names=list(names),
                addresses=sorted(str(a) for a in self.trust.resolved),
            )

    def connection_started(self, conn: Connection) -> None:
        self.accepted += 1
        self.connections.add(conn)
        self._no_connections.clear()

    def connection_done(self, conn: Connection, outcome: Outcome, now: float) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._no_connections.set()
        self.outcomes[outcome] += 1
        suppressed: int | None = 0
        if outcome == "empty":
            suppressed = self.throttle.admit(now)
            if suppressed is None:
                return
        self.log.emit(
            "connection",
            upstream=self.config.name,
            peer=conn.peer,
            client_addr=conn.client_addr,
            identity=conn.identity,
            proxy_protocol=conn.proxy_protocol,
            mode=self.config.mode,
            bytes_in=conn.bytes_in,
            header_bytes=conn.header_bytes,
            bytes_out=conn.bytes_out,
            message=conn.message_for_log(),
            outcome=outcome,
            reason=(
                conn.proxy_error
                if outcome == "proxy_protocol_error"
                else conn.refusal
                if outcome == "untrusted_proxy"
                else None
            ),
            duration_ms=round((now - conn.started) * 1000, 3),
            suppressed=suppressed,
        )

    async def wait_no_connections(self, within: float) -> bool:
        """Wait until no connection is open; ``False`` if ``within`` s passed first."""
        try:
            async with asyncio.timeout(within):
                await self._no_connections.wait()
        except TimeoutError:
            return False
        return True

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop listening, let open connections finish for ``grace`` s, abort the rest.

        Connections the kernel has completed but the loop has not accepted yet (the
        listen backlog) are taken in first, and served like the others: closing the
        listener would reset each of them, and a proxy that dialed us a moment ago would
        see its client's request cut without a reply."""
        server, self._server = self._server, None
        if server is None:
            return
        await adopt_queued(self.loop, server, lambda: Connection(self))
        server.close()
        if self._control is not None:
            self._control.close()
        self._arm_expiry(None)
        if self._resolving is not None:
            self._resolving.cancel()
        if not await self.wait_no_connections(grace):
            for conn in list(self.connections):
                conn.shutdown()
            await self.wait_no_connections(1.0)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await server.wait_closed()
        self.log.emit(
            "stopped",
            name=self.config.name,
            connections=self.accepted,
            open_connections=len(self.connections),
            suppressed=self.throttle.drain(),
            outcomes=dict(sorted(self.outcomes.items())),
        )


async def serve(
    config: Config, log: JsonLog | None = None, *, clock: Clock = time.monotonic
) -> UpstreamServer:
    """Start an upstream on the running loop and return its handle (stop it with ``stop()``)."""
    server = UpstreamServer(config, log or JsonLog(), asyncio.get_running_loop(), clock)
    await server.start()
    return server
