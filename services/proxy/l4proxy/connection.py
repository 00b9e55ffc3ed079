"""One client connection, from accept to the access-log line: TLS over memory BIOs,
dialing, forwarding with flow control and half-close, and carrying out what the
lifecycle table (``lifecycle.py``) decides.

TLS is done with ``ssl.SSLObject`` over two ``MemoryBIO``s on a plain TCP transport,
not with asyncio's TLS transport, so that the proxy controls the handshake (timeout,
failure reasons) and can half-close TLS: a client's close_notify or FIN becomes a FIN
towards the upstream while upstream bytes still flow back, and an upstream FIN becomes
close_notify + FIN towards the client while client bytes still flow up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
import time
from typing import TYPE_CHECKING, Protocol, cast

from . import proxyproto
from .closing import reset, reset_not_eof
from .config import Upstream
from .gate import Answer
from .identity import NoIdentity
from .lifecycle import End, Event, HalfClose, Kind, Lifecycle, Phase, Side
from .router import Admission, Rejected

if TYPE_CHECKING:
    from .proxy import Proxy

READ_SIZE = 256 * 1024
MAX_RECORD = 16 * 1024  # the most plaintext one TLS record can carry
# Forwarded bytes held for the end of the loop iteration, at most (see Proxy.write_soon):
# flow control only sees what is written, so what is held must stay small.
HOLD_LIMIT = 64 * 1024
LINGER = 1.0  # seconds a refused client gets to read our goodbye before we close
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


State = Phase  # the connection's phase, decided by the lifecycle table


# Looking up an Enum member costs a descriptor call (~50 ns); the per-chunk paths compare
# with these module constants instead.
FORWARDING = State.FORWARDING
CLOSED = State.CLOSED


class TlsCore(Protocol):
    """The C TLS object (``_ssl._SSLSocket``) that ``ssl.SSLObject`` wraps. A connection
    holds it alone: every method of ``SSLObject`` is a Python frame around the same call
    on it, and making an ``SSLObject`` costs three more Python calls per connection."""

    session_reused: bool

    def do_handshake(self) -> None: ...
    def read(self, size: int, buffer: memoryview, /) -> int: ...
    def write(self, data: bytes, /) -> int: ...
    def pending(self) -> int: ...
    def shutdown(self) -> object: ...
    def getpeercert(self, binary_form: bool, /) -> bytes | None: ...
    def version(self) -> str | None: ...
    def cipher(self) -> tuple[str, str, int] | None: ...


def wrap_server_bio(
    context: ssl.SSLContext, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO
) -> TlsCore:
    """What ``context.wrap_bio(incoming, outgoing, server_side=True)`` wraps, without the
    wrapper (a server needs no hostname; no callback of ours asks for an owner)."""
    return context._wrap_bio(  # type: ignore[attr-defined,no-any-return]
        incoming, outgoing, server_side=True, server_hostname=None, owner=None, session=None
    )


def describe_os_error(exc: BaseException) -> str:
    """A short, stable reason for a failed dial or probe (``ECONNREFUSED``, ``timeout``...)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return f"dns: {exc.strerror or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def describe_tls_error(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower()
    # No OpenSSL reason code (e.g. a failure inside certificate parsing): the message.
    detail = exc.strerror or (str(exc.args[1]) if len(exc.args) > 1 else "")
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def _endpoint(name: object) -> tuple[str, int] | None:
    """``(host, port)`` of a socket address tuple (IPv6 tuples have four fields)."""
    if isinstance(name, tuple) and len(name) >= 2:
        return str(name[0]), int(name[1])
    return None


def _write_eof(transport: asyncio.Transport | None) -> None:
    """Half-close our sending side of ``transport`` if it is open and can."""
    if transport is not None and not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


class UpstreamSide(asyncio.Protocol):
    """The plain TCP connection to the upstream.

    Until the dial has finished and :meth:`attach` is called, whatever the upstream
    sends (a banner, a FIN, a reset) is kept and replayed in order on attach, so no
    byte is lost however early it arrives."""

    __slots__ = ("_early", "conn", "transport")

    def __init__(self) -> None:
        self.conn: ClientConnection | None = None
        self.transport: asyncio.Transport | None = None
        # Events before attach: ("data", bytes) | ("eof", None) | ("lost", exc | None)
        self._early: list[tuple[str, object]] | None = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast("asyncio.Transport", transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)

    def attach(self, conn: ClientConnection) -> None:
        self.conn = conn
        early, self._early = self._early, None
        for kind, value in early or ():
            if kind == "data":
                conn.upstream_data(cast(bytes, value))
            elif kind == "eof":
                conn.upstream_eof()
            else:
                conn.upstream_lost(cast("Exception | None", value))

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.upstream_data(data)
        elif self._early is not None:
            self._early.append(("data", data))
            if self.transport is not None:
                self.transport.pause_reading()  # one chunk is enough until attach

    def eof_received(self) -> bool:
        # (Once our FIN has gone, a FIN back also leaves the socket CLOSED: no telling.)
        sent_fin = self.conn is not None and self.conn.life.client_eof
        if not sent_fin and reset_not_eof(self.transport):
            # A reset whose error a send consumed: the stream was cut, not ended.
            self.connection_lost(ConnectionResetError(errno.ECONNRESET, "reset"))
            return False
        if self.conn is not None:
            self.conn.upstream_eof()
        elif self._early is not None:
            self._early.append(("eof", None))
        return True  # keep our write side open: the client may still be sending

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.upstream_lost(exc)
        elif self._early is not None:
            self._early.append(("lost", exc))

    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.pause_client_reading()

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.resume_client_reading()

    def resume_after_attach(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class ClientConnection(asyncio.Protocol):
    """One client connection, from accept to the access-log line."""

    # Slots: each of thousands of idle connections saves an instance dictionary.
    __slots__ = (
        "accepted",
        "admission",
        "asked",
        "attempts",
        "bytes_down",
        "bytes_up",
        "client_gone",
        "client_paused",
        "close_kind",
        "decision",
        "dial_task",
        "got_bytes",
        "handshake_ms",
        "id",
        "identity",
        "incoming",
        "last_activity",
        "life",
        "lifetime_timer",
        "logged",
        "loop",
        "outgoing",
        "peer",
        "progressed",
        "proxy",
        "reason",
        "started",
        "state",
        "timer",
        "tls",
        "transport",
        "unsent",
        "upstream",
        "upstream_paused",
        "upstream_transport",
    )

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.loop = proxy.loop
        self.id = next(proxy.ids)
        self.life = Lifecycle()
        self.state = self.life.phase  # a copy the per-chunk paths can read cheaply
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.started = time.monotonic()  # for the log: uvloop's loop.time() is in whole ms
        self.accepted = self.loop.time()
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = wrap_server_bio(proxy.ssl_context, self.incoming, self.outgoing)
        self.identity: str | None = None
        self.admission: Admission | None = None  # the router's, in this process
        self.asked = False  # the supervisor may hold something for it (workers: N)
        self.upstream: Upstream | None = None
        self.upstream_transport: asyncio.Transport | None = None
        self.dial_task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.last_activity = self.loop.time()
        self.bytes_up = 0  # client -> upstream (plaintext)
        self.bytes_down = 0  # upstream -> client (plaintext)
        self.client_paused = False
        self.upstream_paused = False
        self.handshake_ms: float | None = None
        self.got_bytes = False  # has the client sent anything (set during the handshake)
        self.progressed: float | None = None  # loop time of the handshake's last progress
        self.attempts = 0
        self.lifetime_timer: asyncio.TimerHandle | None = None
        # Ending: the decision and reason wait here until the client's socket is gone.
        self.decision = ""
        self.reason = ""
        self.client_gone = False  # connection_lost has been called (or never will be)
        self.close_kind = "graceful"  # graceful | abort | forced | peer (the access line)
        self.unsent = 0  # bytes a forced close threw away
        self.logged = False

    # --- asyncio callbacks from the client's TCP transport ------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast("asyncio.Transport", transport)
        self.transport = transport
        self.peer = _peer(transport)
        proxy = self.proxy
        proxy.stats.accepted += 1
        full = proxy.full()
        if full is not None and not proxy.evict_handshake(full):
            self.refuse_at_accept(full)
            return
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        proxy.connections.add(self)
        proxy.handshaking[self] = None
        self.timer = self.loop.call_later(proxy.config.timeouts.handshake, self._handshake_timeout)
        proxy.gate.opened(self)

    def refuse_at_accept(self, limit: str) -> None:
        """Over the cap ``limit`` (this process's, or the supervisor's with
        ``workers: N``), and no handshake may make room: no TLS work at all for this
        one. A reset is the cheapest refusal; its one access line and the capacity
        event say why (the line is written here: the socket is gone with the abort)."""
        self._cancel_timer()
        self.life.phase = self.state = State.CLOSED
        self.close_kind = "abort"
        self.client_gone = True
        self.logged = True
        if self.transport is not None:
            self.transport.abort()
        self.proxy.gate.release(self)
        self.proxy.over_capacity(self, limit)

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state is FORWARDING:
            self.incoming.write(data)
            self.last_activity = self.loop.time()
            self._pump_from_client()
            return
        if state is CLOSED:
            return  # lingering after a refusal: discard
        self.incoming.write(data)
        if state is State.HANDSHAKE:
            self.got_bytes = True
            self._handshake()
        # ADMITTING/DIALING: reading is paused; anything already here waits in the BIO.

    def eof_received(self) -> bool:
        if self.state is State.CLOSED:
            self._close_client()  # a lingering refused client has read our goodbye
            return True
        life = self.life
        # Only while the TLS stream has not ended (after close_notify nothing can be cut)
        # and our own FIN has not gone.
        if (
            life.phase is Phase.FORWARDING
            and not life.client_eof
            and not life.upstream_eof
            and reset_not_eof(self.transport)
        ):
            # A reset whose error a send consumed: the upload was cut, not finished;
            # passing it on as a FIN would make a truncated upload look complete.
            self.close_kind = "peer"
            self._on(Kind.CLIENT_LOST, "reset")
            return False
        self.incoming.write_eof()
        if self.state is State.HANDSHAKE:
            # A TCP probe (connect, then close) sends nothing at all: say so.
            reason = "eof_during_handshake" if self.got_bytes else "closed_without_data"
            self._on(Kind.CLIENT_EOF, reason)
        elif self.state is State.FORWARDING:
            self._pump_from_client()
        # Our write side stays open; we close when both directions are done.
        return not self.closed

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    def connection_lost(self, exc: Exception | None) -> None:
        self.client_gone = True
        if self.state is State.CLOSED:
            self._gone()
            return
        self.close_kind = "peer"
        self._on(Kind.CLIENT_LOST, "reset" if exc else "closed")

    def pause_writing(self) -> None:
        """The client's send buffer is full: stop reading from the upstream."""
        if not self.upstream_paused and self.upstream_transport is not None:
            self.upstream_paused = True
            if not self.upstream_transport.is_closing():
                self.upstream_transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream_paused and self.upstream_transport is not None:
            self.upstream_paused = False
            if not self.upstream_transport.is_closing():
                self.upstream_transport.resume_reading()

    # --- flow control driven by the upstream's send buffer ----------------------------

    def pause_client_reading(self) -> None:
        if not self.client_paused and self.transport is not None:
            self.client_paused = True
            if not self.transport.is_closing():
                self.transport.pause_reading()

    def resume_client_reading(self) -> None:
        if self.client_paused and self.transport is not None:
            self.client_paused = False
            if not self.transport.is_closing() and self.state is State.FORWARDING:
                self.transport.resume_reading()

    # --- handshake and admission --------------------------------------------------------

    def _send_close_notify(self) -> None:
        # shutdown() (SSLObject.unwrap) sends close_notify and then reports that the
        # peer's has not arrived (SSLWantReadError), or that the session is already shut
        # down: both are fine.
        with contextlib.suppress(ssl.SSLError):
            self.tls.shutdown()
        self._flush_tls()

    def _flush_tls(self) -> None:
        if self.outgoing.pending and self.transport is not None and not self.transport.is_closing():
            self.proxy.flush_writes()  # nothing overtakes a held write
            self.transport.write(self.outgoing.read())

    def _handshake(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            if self.outgoing.pending:
                # Our next flight: the client's last one was whole. That is progress;
                # bytes that do not complete a flight (a slow drip) are not.
                self.progressed = self.loop.time()
                handshaking = self.proxy.handshaking
                handshaking.pop(self, None)
                handshaking[self] = None  # to the back of the eviction order
            self._flush_tls()
            return
        except ssl.SSLError as exc:
            self._flush_tls()  # the alert tells the client why
            self._on(Kind.HANDSHAKE_FAILED, describe_tls_error(exc))
            return
        self._flush_tls()
        self.handshake_ms = round((time.monotonic() - self.started) * 1000, 3)
        self._cancel_timer()
        self.proxy.handshake_done(self)
        der = self.tls.getpeercert(True)
        found = self.proxy.identities.lookup(der) if der else NoIdentity("no_client_certificate")
        if isinstance(found, NoIdentity):
            self._on(Kind.HANDSHAKE_FAILED, found.reason)
            return
        self.identity = found.name
        self._admit()

    def _handshake_timeout(self) -> None:
        self._on(Kind.HANDSHAKE_TIMEOUT)

    def _admit(self) -> None:
        assert self.transport is not None
        assert self.identity is not None
        self._on(Kind.IDENTIFIED)
        self.transport.pause_reading()
        picked = self.proxy.gate.admit(self)
        if isinstance(picked, Rejected):
            self._on(Kind.REJECTED, picked.reason, picked.decision)
            return
        if isinstance(picked, Upstream):
            self._on(Kind.ADMITTED)
        self.dial_task = self.loop.create_task(self._dial(picked), name=f"dial-{self.id}")

    async def _dial(self, answer: Answer) -> None:
        gate = self.proxy.gate
        timeout = self.proxy.config.timeouts.connect
        while True:
            if not isinstance(answer, Upstream | Rejected):  # the supervisor's, to come
                answer = await answer
                if isinstance(answer, Upstream) and self.state is State.ADMITTING:
                    self._on(Kind.ADMITTED)
            if isinstance(answer, Rejected):
                self.dial_task = None
                self._on(Kind.REJECTED, answer.reason, answer.decision)
                return
            upstream = answer
            self.upstream = upstream
            self.attempts += 1
            # timeouts.connect, on the connection's one timer (free while it dials; a
            # close cancels it): asyncio.timeout would be a Python object and five
            # Python calls more per dial, for the same cancel.
            self.timer = self.loop.call_later(timeout, self._dial_expired)
            try:
                # The address the health checks resolved: no DNS on the dial path.
                transport, side = await self.loop.create_connection(
                    UpstreamSide, gate.host(upstream), upstream.address.port
                )
            except asyncio.CancelledError:
                if self.timer is not None or self.dial_task is None:
                    raise  # not the deadline's: the connection is ending (_finish)
                self.dial_task.uncancel()
                reason = "timeout"
            except OSError as exc:
                self._cancel_timer()
                reason = describe_os_error(exc)
            else:
                self._cancel_timer()
                break
            self.proxy.stats.dial_failures[upstream.key, reason] += 1
            answer = gate.dial_failed(self, reason)
        self.dial_task = None
        if self.state is not State.DIALING:  # cannot happen: closing cancels this task
            transport.close()
            return
        if upstream.proxy_protocol == "v2":
            try:
                header = self._proxy_header()
            except ValueError as exc:  # an identity too long for a TLV (tens of KiB)
                transport.close()
                self._on(Kind.REJECTED, f"proxy_protocol: {exc}", "dial_failed")
                return
            # Before any client byte: the header is the first thing the upstream reads.
            transport.write(header)
        self.upstream_transport = transport
        self._on(Kind.CONNECTED)
        self.last_activity = self.loop.time()
        side.attach(self)  # may replay an early EOF or reset, which can end the connection
        if self.closed:
            return
        if not self.upstream_paused:
            side.resume_after_attach()
        if self.proxy.config.timeouts.idle > 0:
            self.timer = self.loop.call_later(self.proxy.config.timeouts.idle, self._check_idle)
        lifetime = self.proxy.config.timeouts.max_lifetime
        if lifetime > 0:
            self._arm_lifetime(self.started + lifetime)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._pump_from_client()  # bytes that arrived with or after the handshake

    def _dial_expired(self) -> None:
        """``timeouts.connect`` is over: cancel the dial, which ``_dial`` takes for a
        timeout (the timer is gone; a close would have cleared ``dial_task``)."""
        self.timer = None
        if self.dial_task is not None:
            self.dial_task.cancel()

    def _proxy_header(self) -> bytes:
        assert self.transport is not None
        assert self.identity is not None
        cipher = self.tls.cipher()
        facts = proxyproto.ClientFacts(
            source=_endpoint(self.transport.get_extra_info("peername")),
            destination=_endpoint(self.transport.get_extra_info("sockname")),
            identity=self.identity,
            connection_id=str(self.id),
            tls_version=self.tls.version(),
            cipher=cipher[0] if cipher else None,
            common_name=self.identity if self.proxy.identities.source == "cn" else None,
            resumed=self.tls.session_reused,
        )
        return proxyproto.client_header(facts)

    # --- forwarding -----------------------------------------------------------------

    def _pump_from_client(self) -> None:
        """Decrypt what the client sent and pass it to the upstream.

        The records decrypted from one chunk are gathered in one buffer and go upstream
        in one write: one system call for many records, not one per record."""
        tls = self.tls
        incoming = self.incoming
        buffer = self.proxy.read_buffer
        filled = 0  # decrypted bytes in buffer, not yet written
        ended = False
        failed: ssl.SSLError | None = None
        while True:
            try:
                # The first record goes to the buffer itself (slicing it allocates).
                size = tls.read(READ_SIZE - filled, buffer[filled:] if filled else buffer)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                ended = True
                break
            except ssl.SSLError as exc:
                failed = exc
                break
            if not size:
                ended = True
                break
            filled += size
            if not incoming.pending and not tls.pending() and not incoming.eof:
                break  # nothing left to decrypt: another read could only raise WantRead
            if filled > READ_SIZE - MAX_RECORD:  # no room for another whole record
                buffer = self._send_up(buffer, filled)
                filled = 0
        if filled:
            self._send_up(buffer, filled)
        if failed is not None:
            self._flush_tls()
            self._on(Kind.CLIENT_TLS_ERROR, describe_tls_error(failed))
            return
        if ended:
            self._on(Kind.CLIENT_EOF)
        if self.outgoing.pending:
            self._flush_tls()  # e.g. key-update responses

    def _send_up(self, buffer: memoryview, size: int) -> memoryview:
        """Write ``buffer[:size]`` upstream, without a copy when it can be sent at once.
        Returns the buffer for the next reads: the same one, or a new one if the
        transport still holds this one.

        The transport keeps what it cannot send yet by reference, not as a copy. So
        behind bytes it already holds, it gets a copy; and if a write from the buffer
        cannot all be sent, the buffer is left to it. That way a transport holds at most
        one buffer, and what it holds beyond stays bounded by flow control."""
        upstream = self.upstream_transport
        assert upstream is not None
        self.bytes_up += size
        if size < HOLD_LIMIT:
            self.proxy.write_soon(upstream, buffer[:size].tobytes())
            return buffer
        self.proxy.flush_writes()  # nothing overtakes a held write
        if upstream.get_write_buffer_size():
            upstream.write(buffer[:size].tobytes())
            return buffer
        upstream.write(buffer[:size])
        if upstream.get_write_buffer_size():
            buffer = self.proxy.read_buffer = memoryview(bytearray(READ_SIZE))
        return buffer

    def upstream_data(self, data: bytes) -> None:
        self.last_activity = self.loop.time()
        self.bytes_down += len(data)
        try:
            self.tls.write(data)
        except ssl.SSLError as exc:  # e.g. we already sent close_notify: a bug, not load
            self._on(Kind.TLS_WRITE_ERROR, describe_tls_error(exc))
            return
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.proxy.write_soon(transport, self.outgoing.read())

    def upstream_eof(self) -> None:
        self._on(Kind.UPSTREAM_EOF)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.state is State.FORWARDING:
            self._on(Kind.UPSTREAM_LOST, describe_os_error(exc) if exc is not None else "")

    def rearm_idle(self) -> None:
        """A reload changed ``timeouts.idle``: the new value applies now (a longer or a
        shorter one, 0 turning it off, or a first one for a connection opened without)."""
        if self.state is not State.FORWARDING:
            return
        self._cancel_timer()
        self._check_idle()

    def _check_idle(self) -> None:
        if self.state is not State.FORWARDING:
            return
        idle = self.proxy.config.timeouts.idle
        if idle <= 0:  # turned off by a reload
            self.timer = None
            return
        remaining = self.last_activity + idle - self.loop.time()
        if remaining > 0:
            self.timer = self.loop.call_later(remaining, self._check_idle)
            return
        self.timer = None
        self._on(Kind.IDLE)

    def _arm_lifetime(self, deadline: float) -> None:
        left = max(0.0, deadline - time.monotonic())
        self.lifetime_timer = self.loop.call_later(left, self._lifetime_over, deadline)

    def _lifetime_over(self, deadline: float) -> None:
        # uvloop's timers count whole milliseconds and can fire just before the
        # deadline on the monotonic clock the access line's duration uses: never early.
        if time.monotonic() < deadline:
            self._arm_lifetime(deadline)
            return
        self.lifetime_timer = None
        self._on(Kind.LIFETIME)

    def evict(self, why: str) -> None:
        """Reset a stalled handshake to make room for a new connection."""
        self._on(Kind.EVICTED, why)

    def revoke(self) -> None:
        """A reload no longer lets this connection's identity reach its upstream (or its
        certificate no longer verifies): end it like a drain timeout does."""
        self._on(Kind.REVOKED)

    # --- ending --------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def shutdown(self, reason: str = "shutdown") -> None:
        """The proxy is stopping (``reason``: ``shutdown`` or ``drain_timeout``)."""
        self._on(Kind.SHUTDOWN, reason)

    def _on(self, kind: Kind, detail: str = "", decision: str = "") -> None:
        """Feed an event to the lifecycle table and carry out what it says."""
        actions = self.life.step(Event(kind, detail, decision))
        self.state = self.life.phase
        for action in actions:
            if action is HalfClose.UPSTREAM:
                self.proxy.flush_writes()  # nothing overtakes a held write
                _write_eof(self.upstream_transport)
            elif action is HalfClose.CLIENT:
                # close_notify, then FIN: the client learns the stream ended cleanly,
                # and may keep sending (TLS 1.3 and TCP both allow a half-closed one).
                self.proxy.flush_writes()
                self._send_close_notify()
                _write_eof(self.transport)
            elif isinstance(action, End):
                self._finish(action)

    def _finish(self, end: End) -> None:
        """Carry out an :class:`End`: give back every slot, close both sides as it says
        (bounded), and write the access-log line once the client's socket is gone.

        ``LINGER``: send our goodbye (alert or close_notify) and a FIN, then discard what
        the client still sends until its EOF or :data:`LINGER` seconds. Closing at once
        with unread input would make the kernel send a reset, which can destroy the
        goodbye before the client reads it.

        A graceful close gives the bytes still buffered ``timeouts.close`` to reach the
        peer, then resets: a peer that stopped reading cannot hold a socket."""
        self.decision = end.decision
        self.reason = end.reason
        self._cancel_timer()
        if self.lifetime_timer is not None:
            self.lifetime_timer.cancel()
            self.lifetime_timer = None
        if self.dial_task is not None:
            self.dial_task.cancel()
            self.dial_task = None
        proxy = self.proxy
        if self.admission is not None or self.asked:
            proxy.gate.release(self)
        proxy.handshake_done(self)
        proxy.flush_writes()  # nothing overtakes a held write
        client = self.transport
        if client is not None and not self.client_gone and not client.is_closing():
            if end.client is Side.ABORT:
                self.close_kind = "abort"
                self.client_gone = True  # an abort frees the socket: nothing to wait for
                client.abort()
            elif end.client is not Side.KEEP:
                if end.close_notify:
                    self._send_close_notify()
                if end.client is Side.LINGER and client.can_write_eof():
                    client.write_eof()
                    client.resume_reading()
                    self.timer = self.loop.call_later(LINGER, self._close_client)
                else:
                    self._close_client()
        upstream = self.upstream_transport
        if upstream is not None and not upstream.is_closing():
            if end.upstream is Side.ABORT:
                upstream.abort()
            elif end.upstream is not Side.KEEP:
                proxy.close_bounded(upstream)
        if self.client_gone:
            self._gone()

    def _close_client(self) -> None:
        """Close the client's side after its buffered bytes, within ``timeouts.close``."""
        client = self.transport
        if client is None or self.client_gone or client.is_closing():
            return  # gone, or already closing under its own deadline
        self._cancel_timer()  # a linger timer
        client.close()
        if client.get_write_buffer_size():
            self.timer = self.loop.call_later(self.proxy.config.timeouts.close, self.force_close)

    def force_close(self) -> None:
        """``timeouts.close`` is over and the client has not taken its bytes: reset."""
        self.timer = None
        client = self.transport
        if client is None or self.client_gone:
            return
        self.close_kind = "forced"
        self.unsent = client.get_write_buffer_size()
        self.client_gone = True
        reset(client)
        self._gone()

    def _gone(self) -> None:
        """The client's socket is gone (or going, reset): account and log, once."""
        if self.logged or self.state is not State.CLOSED:
            return
        self.logged = True
        self._cancel_timer()
        self.proxy.connection_closed(self, self.decision, self.reason)
