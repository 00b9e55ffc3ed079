"""The I/O shell: listener, TLS over memory BIOs, dialing, forwarding, health checks.

Everything that decides (who may go where, how fast, which upstream, is it healthy)
lives in the pure modules; this module moves bytes and time into them and turns their
answers into socket operations and log lines.

Life of a connection (``ClientConnection``):

    HANDSHAKE --ok--> ADMITTING --admitted--> DIALING --connected--> FORWARDING --> CLOSED
        |                 |                      |                       |
        +--tls error / timeout / rejected / all dials failed / error ----+--> CLOSED

TLS is done with ``ssl.SSLObject`` over two ``MemoryBIO``s on a plain TCP transport,
not with asyncio's TLS transport, so that the proxy controls the handshake (timeout,
failure reasons) and can half-close TLS: a client's close_notify or FIN becomes a FIN
towards the upstream while upstream bytes still flow back, and an upstream FIN becomes
close_notify + FIN towards the client while client bytes still flow up.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import itertools
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from . import proxyproto
from .admin import AdminServer
from .closing import reset
from .config import Address, Config, ConfigError, Upstream, check_files, read_config, restart_needed
from .health import Health, Transition
from .identity import IdentityCache, NoIdentity
from .lifecycle import End, Event, HalfClose, Kind, Lifecycle, Phase, Side
from .logs import JsonLog, utc_timestamp
from .metrics import Stats
from .resolver import Resolver
from .router import Admission, Rejected, Router
from .tls import certificate_facts, issued_by_any, server_context, trust_anchors

READ_SIZE = 256 * 1024
MAX_RECORD = 16 * 1024  # the most plaintext one TLS record can carry
# Forwarded bytes held for the end of the loop iteration, at most (see Proxy.write_soon):
# flow control only sees what is written, so what is held must stay small.
HOLD_LIMIT = 64 * 1024
LINGER = 1.0  # seconds a refused client gets to read our goodbye before we close
# A handshake that made progress (its ClientHello got our reply) less than this long ago
# is not evicted to make room for a new connection (see Proxy.handshake_victim).
HANDSHAKE_GRACE = 1.0
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


State = Phase  # the connection's phase, decided by the lifecycle table


# Looking up an Enum member costs a descriptor call (~50 ns); the per-chunk paths compare
# with these module constants instead.
FORWARDING = State.FORWARDING
CLOSED = State.CLOSED


class TlsCore(Protocol):
    """The C object under ``ssl.SSLObject`` (its ``_sslobj``). The per-chunk paths call
    it directly: ``SSLObject``'s methods only add a Python frame around each call."""

    def read(self, size: int, buffer: memoryview, /) -> int: ...
    def write(self, data: bytes, /) -> int: ...
    def pending(self) -> int: ...


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
        self.tls = proxy.ssl_context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.tls_core: TlsCore = self.tls._sslobj  # type: ignore[attr-defined]
        self.identity: str | None = None
        self.admission: Admission | None = None
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
            # Over a cap, and no handshake may make room: no TLS work at all for this
            # one. A reset is the cheapest refusal; the access line and the capacity
            # event say why.
            self.life.phase = self.state = State.CLOSED
            self.close_kind = "abort"
            self.client_gone = True
            transport.abort()
            proxy.over_capacity(self, full)
            return
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        proxy.connections.add(self)
        proxy.handshaking[self] = None
        self.timer = self.loop.call_later(proxy.config.timeouts.handshake, self._handshake_timeout)

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
        # unwrap() sends close_notify and then reports that the peer's has not arrived
        # (SSLWantReadError), or that the session is already shut down: both are fine.
        with contextlib.suppress(ssl.SSLError):
            self.tls.unwrap()
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
        der = self.tls.getpeercert(binary_form=True)
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
        result = self.proxy.router.admit(self.identity, self.loop.time())
        if isinstance(result, Rejected):
            self._on(Kind.REJECTED, result.reason, result.decision)
            return
        self.admission = result
        self._on(Kind.ADMITTED)
        self.dial_task = self.loop.create_task(self._dial(), name=f"dial-{self.id}")

    async def _dial(self) -> None:
        admission = self.admission
        assert admission is not None
        timeout = self.proxy.config.timeouts.connect
        while True:
            upstream = admission.lease.upstream
            self.upstream = upstream
            self.attempts += 1
            try:
                async with asyncio.timeout(timeout):
                    # The address the health checks resolved: no DNS on the dial path.
                    host = self.proxy.resolver.cached(upstream.address) or upstream.address.host
                    transport, side = await self.loop.create_connection(
                        UpstreamSide, host, upstream.address.port
                    )
            except OSError as exc:  # TimeoutError is an OSError
                reason = describe_os_error(exc)
            else:
                break
            self.proxy.stats.dial_failures[upstream.key, reason] += 1
            transition, picked = self.proxy.router.dial_failed(admission, self.loop.time(), reason)
            if transition is not None:
                self.proxy.log_transition(upstream, transition, passive=True)
            if isinstance(picked, Rejected):
                self.admission = None  # dial_failed gave every slot back
                self._on(Kind.REJECTED, picked.reason, picked.decision)
                return
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
            left = self.started + lifetime - time.monotonic()
            self.lifetime_timer = self.loop.call_later(max(0.0, left), self._lifetime_over)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._pump_from_client()  # bytes that arrived with or after the handshake

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
        tls = self.tls_core
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
            self.tls_core.write(data)
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

    def _check_idle(self) -> None:
        if self.state is not State.FORWARDING:
            return
        idle = self.proxy.config.timeouts.idle
        remaining = self.last_activity + idle - self.loop.time()
        if remaining > 0:
            self.timer = self.loop.call_later(remaining, self._check_idle)
            return
        self.timer = None
        self._on(Kind.IDLE)

    def _lifetime_over(self) -> None:
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
        if self.admission is not None:
            self.admission.release()
            self.admission = None
        proxy = self.proxy
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


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    message: str
    sha256: str | None = None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class Proxy:
    """Owns the listener, the connections, the health checkers and the router.

    Operations: :meth:`reload` (SIGHUP, ``POST /reload``), :meth:`drain` (SIGTERM) and
    :meth:`stop`. The admin listener, if configured, is started and stopped with it."""

    def __init__(
        self,
        config: Config,
        log: JsonLog | None = None,
        *,
        config_path: Path | None = None,
        config_sha256: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.config_sha256 = config_sha256
        self.loaded_at = utc_timestamp()
        self.started_at = time.time()
        self.log = log or JsonLog()
        self.router = Router(config)
        self.ssl_context = server_context(config.tls)
        self.ca_pem = _read(config.tls.ca)  # as loaded: a reload compares (revocation)
        self.certificate = certificate_facts(config.tls.cert)  # what /status shows
        self.identities = IdentityCache(config.tls.identity, charset=config.tls.identity_charset)
        self.stats = Stats()
        # Every client connection with a socket: handshaking, served, or closing.
        self.connections: set[ClientConnection] = set()
        # Those still in their TLS handshake, oldest progress first (eviction order).
        self.handshaking: dict[ClientConnection, None] = {}
        self.emptied: asyncio.Future[None] | None = None  # see wait_empty
        # Decrypted client bytes, one chunk at a time: reused while the upstream
        # transports send what they are given at once (see ClientConnection._send_up).
        self.read_buffer = memoryview(bytearray(READ_SIZE))
        self.ids = itertools.count(1)
        self.held: list[tuple[asyncio.Transport, bytes]] = []  # see write_soon
        self.held_bytes = 0
        self.loop = asyncio.get_running_loop()
        self.resolver = Resolver(self.loop)
        self.resolver.changed = self._log_resolved
        self.server: asyncio.Server | None = None
        self.admin: AdminServer | None = None
        self.health_tasks: dict[str, asyncio.Task[None]] = {}  # by upstream key
        self.tasks: list[asyncio.Task[None]] = []
        self.address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.draining = False
        self.at_capacity: dict[str, list[int]] = {}  # limit -> [refused, evicted] while full
        self.last_reload: dict[str, Any] | None = None

    def write_soon(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write ``data`` at the end of this event-loop iteration, in one burst with the
        other connections' writes, not now.

        In a burst after all of an iteration's reads, the writes wake up the processes
        they are for together, and those preempt this one less often (ping-pong: ~9%
        less proxy CPU per message). Every other operation on a transport (a write
        not held, write_eof, close, abort) calls :meth:`flush_writes` first, so that
        nothing overtakes a held write."""
        if not self.held:
            self.loop.call_soon(self.flush_writes)
        self.held.append((transport, data))
        self.held_bytes += len(data)
        if self.held_bytes >= HOLD_LIMIT:
            self.flush_writes()

    def flush_writes(self) -> None:
        """Do the held writes now, in order."""
        if not self.held:
            return
        held, self.held = self.held, []
        self.held_bytes = 0
        for transport, data in held:
            if transport.is_closing():
                continue
            try:
                transport.write(data)
            except Exception as exc:  # noqa: BLE001 - a bug; one connection's, not the burst's
                self.loop.call_exception_handler(
                    {"message": "a held write failed", "exception": exc, "transport": transport}
                )

    def _on_loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception escaped a callback or task: a bug. Log it and keep serving."""
        exc = context.get("exception")
        self.log.emit(
            "error",
            message=str(context.get("message", "")),
            exception=repr(exc) if exc is not None else None,
        )

    async def start(self) -> None:
        self.loop.set_exception_handler(self._on_loop_error)
        listen = self.config.listen
        try:
            self.server = await self.loop.create_server(
                lambda: ClientConnection(self),
                listen.host,
                listen.port,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
        sock = self.server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))
        admin_listen = self.config.admin.listen
        if admin_listen is not None:
            self.admin = AdminServer(self)
            try:
                self.admin_address = await self.admin.start(admin_listen.host, admin_listen.port)
            except OSError as exc:
                self.server.close()
                message = f"cannot listen on {admin_listen} (admin.listen): {exc.strerror}"
                raise OSError(exc.errno, message) from exc
        self._sync_health_tasks()
        self.tasks.append(self.loop.create_task(self._cleanup_loop(), name="ratelimit-cleanup"))
        self.log.emit(
            "listening",
            address=f"{self.address[0]}:{self.address[1]}",
            admin=_format(self.admin_address),
            upstreams=[u.key for u in self.config.upstreams],
            balancer=self.config.balancer,
            max_connections=self.config.max_connections,
            config_sha256=self.config_sha256,
        )

    @property
    def ready(self) -> tuple[bool, str]:
        """``/ready``: listening, not draining, and at least one upstream is up."""
        if self.server is None or not self.server.is_serving():
            return False, "draining" if self.draining else "not listening"
        if self.draining:
            return False, "draining"
        if not any(m.state is Health.UP for m in self.router.pool.health):
            return False, "no upstream is up"
        return True, "ready"

    # --- reload ------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Re-read the config file and the certificates it names. A valid config applies
        to new connections (open ones keep going); an invalid one changes nothing."""
        if self.config_path is None:
            return self._reload_failed("", "the proxy was not started from a config file")
        try:
            config, digest = read_config(self.config_path)
            check_files(config)
            context = server_context(config.tls)
            restart_needed(self.config, config)
        except ConfigError as exc:
            return self._reload_failed(exc.key, exc.problem)
        old_keys = [u.key for u in self.config.upstreams]
        new_keys = [u.key for u in config.upstreams]
        ca_pem = _read(config.tls.ca)
        ca_changed = ca_pem != self.ca_pem
        self.ca_pem = ca_pem
        self.config = config
        self.config_sha256 = digest
        self.loaded_at = utc_timestamp()
        self.ssl_context = context
        self.certificate = certificate_facts(config.tls.cert)
        self.identities = IdentityCache(config.tls.identity, charset=config.tls.identity_charset)
        self.router.reconfigure(config)
        self._sync_health_tasks()
        revoked = 0
        if config.authorization.on_reload == "close":
            revoked = self.revoke(ca_changed=ca_changed)
        result = ReloadResult(
            ok=True,
            message="reloaded",
            sha256=digest,
            added=tuple(k for k in new_keys if k not in old_keys),
            removed=tuple(k for k in old_keys if k not in new_keys),
        )
        self.stats.reloads["ok"] += 1
        self.last_reload = {"result": "ok", "at": self.loaded_at, "sha256": digest}
        self.log.emit(
            "reload",
            result="ok",
            config_sha256=digest,
            upstreams=new_keys,
            added=list(result.added),
            removed=list(result.removed),
            open_connections=len(self.connections),
            revoked=revoked,
        )
        return result

    def revoke(self, *, ca_changed: bool) -> int:
        """``authorization.on_reload: close``: end every admitted connection whose
        identity the new rules no longer let reach its upstream, or (when ``tls.ca``
        changed) whose certificate the new CA bundle no longer accepts. Returns how many."""
        anchors = trust_anchors(self.config.tls.ca) if ca_changed else ()
        now = dt.datetime.now(dt.UTC)
        verdicts: dict[bytes, bool] = {}
        ended = 0
        for conn in list(self.connections):
            if conn.state not in (State.DIALING, State.FORWARDING):
                continue
            if conn.identity is None or conn.upstream is None:
                continue
            keep = self.router.permits(conn.identity, conn.upstream)
            if keep and ca_changed:
                der = conn.tls.getpeercert(binary_form=True) or b""
                if der not in verdicts:
                    verdicts[der] = issued_by_any(der, anchors, now)
                keep = verdicts[der]
            if not keep:
                conn.revoke()
                ended += 1
        return ended

    def _reload_failed(self, key: str, problem: str) -> ReloadResult:
        message = f"{key}: {problem}" if key else problem
        self.stats.reloads["error"] += 1
        self.last_reload = {"result": "error", "at": utc_timestamp(), "error": message}
        self.log.emit("reload", result="error", key=key or None, message=message)
        return ReloadResult(ok=False, message=message)

    # --- drain and stop ------------------------------------------------------------------

    async def drain(self, grace: float, force: Awaitable[object] | None = None) -> str:
        """Stop accepting; let open connections finish for up to ``grace`` seconds (or
        until ``force`` completes: a second signal), then close what is left.

        Returns how it ended: ``drained`` (every connection finished), ``drain_timeout``
        or ``forced``; the ``stopped`` log line says the same."""
        if self.server is not None:
            self.server.close()
        self.draining = True
        self.log.emit("draining", open_connections=len(self.connections), grace_s=grace)
        outcome = "drained"
        if self.connections:
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.wait_empty())]
            if force is not None:
                waits.append(asyncio.ensure_future(force))
            done, pending = await asyncio.wait(
                waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            for future in pending:
                future.cancel()
            if self.connections:
                outcome = "drain_timeout" if not done else "forced"
        await self.stop(outcome)
        return outcome

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop accepting, close every connection, stop the background tasks.

        ``reason`` goes into the ``stopped`` line and, except ``forced`` (which closes
        with ``shutdown`` like a plain stop), into the access line of each connection."""
        left = len(self.connections)
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.shutdown("shutdown" if reason == "forced" else reason)
        # Closing connections get timeouts.close to deliver what they hold, then a reset.
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_empty(), self.config.timeouts.close + 0.5)
        for conn in list(self.connections):
            conn.force_close()  # cannot happen: each has a close timer
        self.resolver.cancel()
        tasks = [*self.tasks, *self.health_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.health_tasks.clear()
        if self.admin is not None:
            await self.admin.stop()
        self.log.emit("stopped", open_connections=left, reason=reason)

    # --- connections ---------------------------------------------------------------------

    def wait_empty(self) -> asyncio.Future[None]:
        """A future done once no client connection is left (closing ones included)."""
        if self.emptied is None or self.emptied.done():
            self.emptied = self.loop.create_future()
            if not self.connections:
                self.emptied.set_result(None)
        return self.emptied

    def connection_closed(self, conn: ClientConnection, decision: str, reason: str) -> None:
        """``conn``'s socket is gone: it stops counting, and its access line is written."""
        self.connections.discard(conn)
        self.handshaking.pop(conn, None)
        self.log_access(conn, decision, reason)
        if not self.connections and self.emptied is not None and not self.emptied.done():
            self.emptied.set_result(None)
        if "max_connections" in self.at_capacity and not self._at_cap("max_connections"):
            self._capacity_available("max_connections")

    # --- capacity ------------------------------------------------------------------------

    def full(self) -> str | None:
        """The cap a new connection would exceed, if any: ``max_connections`` counts
        every socket, ``max_handshakes`` the connections still in their handshake."""
        for limit in ("max_connections", "max_handshakes"):
            if self._at_cap(limit):
                return limit
        return None

    def handshake_victim(self, now: float) -> ClientConnection | None:
        """The handshake that has waited longest without progress: one that never had
        any (the oldest first), or whose last progress is older than
        :data:`HANDSHAKE_GRACE`. None when every handshake is making progress."""
        grace = min(HANDSHAKE_GRACE, self.config.timeouts.handshake)
        for conn in self.handshaking:
            if conn.progressed is None or now - conn.progressed >= grace:
                return conn
        return None

    def evict_handshake(self, limit: str) -> bool:
        """Make room for a new connection by resetting a stalled handshake (slowloris):
        authenticated connections never wait behind unauthenticated ones."""
        now = self.loop.time()
        victim = self.handshake_victim(now)
        if victim is None:
            return False
        waited = now - (victim.progressed if victim.progressed is not None else victim.accepted)
        cap = getattr(self.config, limit)
        self._capacity_full(limit, evicted=1)
        victim.evict(f"{limit} {cap} reached, no progress for {round(waited * 1000)} ms")
        return True

    def handshake_done(self, conn: ClientConnection) -> None:
        """``conn`` has left its handshake (finished it, or ended)."""
        if conn not in self.handshaking:
            return
        del self.handshaking[conn]
        if "max_handshakes" in self.at_capacity and not self._at_cap("max_handshakes"):
            self._capacity_available("max_handshakes")

    def _at_cap(self, limit: str) -> bool:
        cap: int = getattr(self.config, limit)
        count = len(self.connections if limit == "max_connections" else self.handshaking)
        return bool(cap) and count >= cap

    def over_capacity(self, conn: ClientConnection, limit: str) -> None:
        """``conn`` was refused at accept: ``limit`` is reached and no handshake could
        make room."""
        cap = getattr(self.config, limit)
        self._capacity_full(limit, refused=1)
        self.log_access(conn, "over_capacity", f"{limit} {cap} reached")

    def _capacity_full(self, limit: str, *, refused: int = 0, evicted: int = 0) -> None:
        counts = self.at_capacity.get(limit)
        if counts is None:
            cap = getattr(self.config, limit)
            counts = self.at_capacity[limit] = [0, 0]
            what = "evicting stalled handshakes" if evicted else "refusing new connections"
            self.log.emit(
                "capacity",
                state="full",
                limit=limit,
                **{limit: cap},
                open_connections=len(self.connections),
                handshakes=len(self.handshaking),
                message=f"{limit} ({cap}) reached: {what}",
            )
        counts[0] += refused
        counts[1] += evicted

    def _capacity_available(self, limit: str) -> None:
        refused, evicted = self.at_capacity.pop(limit)
        self.log.emit(
            "capacity",
            state="available",
            limit=limit,
            **{limit: getattr(self.config, limit)},
            open_connections=len(self.connections),
            handshakes=len(self.handshaking),
            refused=refused,
            evicted=evicted,
        )

    def close_bounded(self, transport: asyncio.Transport) -> None:
        """Close ``transport`` after its buffered bytes, resetting it if they have not
        gone within ``timeouts.close`` (a peer that stopped reading)."""
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(self.config.timeouts.close, reset, transport)

    # --- health checks -------------------------------------------------------------------

    def _sync_health_tasks(self) -> None:
        """One check loop per configured upstream: start new ones, stop removed ones."""
        wanted = {u.key for u in self.config.upstreams}
        for key in [k for k in self.health_tasks if k not in wanted]:
            self.health_tasks.pop(key).cancel()
        for upstream in self.config.upstreams:
            if upstream.key not in self.health_tasks:
                self.health_tasks[upstream.key] = self.loop.create_task(
                    self._health_loop(upstream.key), name=f"health-{upstream.name}"
                )

    async def probe(self, upstream: Upstream) -> tuple[bool, str]:
        """A TCP connect within the timeout. No application bytes, except a PROXY v2
        LOCAL header for an upstream that expects one (it says: no client behind this)."""
        try:
            async with asyncio.timeout(self.config.health_check.timeout):
                host = await self.resolver.resolve(upstream.address)
                transport, _ = await self.loop.create_connection(
                    asyncio.Protocol, host, upstream.address.port
                )
        except OSError as exc:
            return False, describe_os_error(exc)
        if upstream.proxy_protocol == "v2":
            transport.write(proxyproto.local_header())
        transport.close()
        return True, "connected"

    async def _health_loop(self, key: str) -> None:
        """Check one upstream for as long as it is configured (the config may change)."""
        while True:
            index = self.router.pool.index_of(key)
            if index is None:
                return
            upstream = self.router.pool.upstreams[index]
            started = time.monotonic()
            ok, reason = await self.probe(upstream)
            finished = time.monotonic()
            self.stats.check_done(
                key, ok=ok, reason=reason, latency=finished - started, wall_time=time.time()
            )
            index = self.router.pool.index_of(key)  # a reload may have moved it meanwhile
            if index is None:
                return
            transition = self.router.check_result(index, ok, self.loop.time(), reason)
            if transition is not None:
                self.log_transition(upstream, transition, passive=False)
            # The next check starts one interval after this one started (never sooner).
            interval = self.config.health_check.interval
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rate_limit.cleanup_interval)
            self.router.limiter.cleanup(self.loop.time())

    # --- logging ----------------------------------------------------------------------------

    def _log_resolved(self, address: Address, ip: str | None) -> None:
        self.log.emit("resolve", upstream=str(address), address=ip)

    def log_transition(self, upstream: Upstream, transition: Transition, *, passive: bool) -> None:
        self.log.emit(
            "health",
            upstream=upstream.key,
            upstream_name=upstream.name,
            old=transition.old.value,
            new=transition.new.value,
            reason=transition.reason,
            source="passive" if passive else "active",
        )

    def log_access(self, conn: ClientConnection, decision: str, reason: str) -> None:
        upstream = conn.upstream
        self.stats.connection_closed(
            decision,
            reason,
            identity=conn.identity,
            upstream=upstream.key if upstream else None,
            bytes_up=conn.bytes_up,
            bytes_down=conn.bytes_down,
            close=conn.close_kind,
        )
        fields: dict[str, Any] = {
            "conn": conn.id,
            "client": conn.identity,
            "peer": conn.peer,
            "decision": decision,
            "reason": reason,
            "upstream": upstream.key if upstream else None,
            "upstream_name": upstream.name if upstream else None,
            "attempts": conn.attempts,
            "bytes_up": conn.bytes_up,
            "bytes_down": conn.bytes_down,
            "duration_ms": round((time.monotonic() - conn.started) * 1000, 3),
            "handshake_ms": conn.handshake_ms,
            "close": conn.close_kind,
        }
        if conn.close_kind == "forced":
            fields["unsent_bytes"] = conn.unsent
        if conn.handshake_ms is not None:
            fields["tls_version"] = conn.tls.version()
        self.log.emit("access", **fields)


def _format(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
