"""The connection lifecycle as a table (pure: no sockets, no asyncio, no clock).

One client connection moves through phases; events (a byte stream ending, a peer
lost, a timer, an operator's decision) move it on, and each step says what to do to
the two sockets. :class:`~l4proxy.connection.ClientConnection` only feeds events in and
carries the actions out; whether a side is half-closed, aborted, sent close_notify or
lingered is decided here and nowhere else, and tested here without sockets.

    HANDSHAKE --identified--> ADMITTING --admitted--> DIALING --connected--> FORWARDING
        \\___________________________\\________________________\\__________________\\
                                                                                 CLOSED

Every phase but CLOSED has, for each ending event, one :class:`End`: the access log's
decision and reason, and how each side is closed. After an End the connection is
CLOSED and every later event is ignored, so an End happens exactly once.

The byte path (decrypting, encrypting, flow control) stays in the I/O shell: it is per
chunk and tuned; only the decisions that end or half-close a direction come here.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple


class _Member(enum.Enum):
    """Enum members are singletons compared by identity, so hashing by identity keeps
    the contract; it is done in C, where ``Enum.__hash__`` is a Python call (the
    lifecycle tables are looked up by (phase, kind) a few times per connection)."""

    __hash__ = object.__hash__


class Phase(_Member):
    HANDSHAKE = "handshake"
    ADMITTING = "admitting"
    DIALING = "dialing"
    FORWARDING = "forwarding"
    CLOSED = "closed"


class Kind(_Member):
    """What happened. Some carry a detail (a reason, a decision) in :class:`Event`."""

    # The handshake.
    HANDSHAKE_FAILED = "handshake_failed"  # detail: OpenSSL's reason, or the identity's
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    IDENTIFIED = "identified"  # a verified identity: admission starts
    EVICTED = "evicted"  # detail: why (max_handshakes reached, no progress for ...)
    # Admission and dialing.
    ADMITTED = "admitted"
    REJECTED = "rejected"  # decision + detail: denied, rate_limited, no_healthy_upstream...
    CONNECTED = "connected"  # the upstream connection is up
    # The two byte streams.
    CLIENT_EOF = "client_eof"  # close_notify or a FIN (nothing more will come)
    UPSTREAM_EOF = "upstream_eof"
    CLIENT_LOST = "client_lost"  # the socket is gone; detail "reset" or "closed"
    UPSTREAM_LOST = "upstream_lost"  # detail: the error's name, or "" for a clean close
    CLIENT_TLS_ERROR = "client_tls_error"  # detail: the TLS error
    TLS_WRITE_ERROR = "tls_write_error"  # detail: the TLS error
    # Timers and the operator.
    IDLE = "idle_timeout"
    LIFETIME = "max_lifetime"
    REVOKED = "revoked"
    SHUTDOWN = "shutdown"  # detail: shutdown or drain_timeout


class Event(NamedTuple):
    """(A named tuple, not a frozen dataclass: a few are made per connection, and a
    tuple is made in C where a frozen dataclass sets each field through Python.)"""

    kind: Kind
    detail: str = ""
    decision: str = ""  # REJECTED only


class Side(_Member):
    """How to close one socket when the connection ends."""

    KEEP = "keep"  # nothing to do (not connected, or already gone)
    GRACEFUL = "graceful"  # after what it holds, within timeouts.close
    ABORT = "abort"  # at once
    LINGER = "linger"  # client only: our goodbye and a FIN, then read and discard a while


@dataclass(frozen=True, slots=True)
class End:
    """End the connection: log ``decision``/``reason``, give back every slot, close."""

    decision: str
    reason: str
    client: Side = Side.GRACEFUL
    upstream: Side = Side.GRACEFUL
    close_notify: bool = False  # say close_notify to the client first


class HalfClose(_Member):
    """One direction has ended; the other goes on."""

    UPSTREAM = "write_eof_upstream"  # the client is done sending
    CLIENT = "close_notify_and_fin_client"  # the upstream is done sending


Action = End | HalfClose
RuleFn = Callable[["Event"], End]


@dataclass(slots=True)
class Lifecycle:
    """One connection's phase and which directions have ended."""

    phase: Phase = Phase.HANDSHAKE
    client_eof: bool = False
    upstream_eof: bool = False
    ended: End | None = field(default=None)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def step(self, event: Event) -> tuple[Action, ...]:
        """Apply ``event``; return what to do, in order (often nothing)."""
        phase = self.phase
        if phase is Phase.CLOSED:
            return ()
        kind = event.kind
        move = ADVANCE.get((phase, kind))
        if move is not None:
            self.phase = move
            return ()
        if phase is Phase.FORWARDING:
            return self._forwarding(event)
        rule = ENDINGS.get((phase, kind))
        if rule is None:
            return ()  # an event that means nothing in this phase
        return (self._end(rule(event)),)

    def _forwarding(self, event: Event) -> tuple[Action, ...]:
        kind = event.kind
        if kind is Kind.CLIENT_EOF:
            if self.client_eof:
                return ()
            self.client_eof = True
            if self.upstream_eof:
                return (HalfClose.UPSTREAM, self._end(End("forwarded", "eof")))
            return (HalfClose.UPSTREAM,)
        if kind is Kind.UPSTREAM_EOF:
            if self.upstream_eof:
                return ()
            self.upstream_eof = True
            if self.client_eof:
                return (HalfClose.CLIENT, self._end(End("forwarded", "eof")))
            return (HalfClose.CLIENT,)
        if kind is Kind.UPSTREAM_LOST and not event.detail:
            if self.client_eof and self.upstream_eof:
                return ()  # both directions ended already: the End is on its way
            # A close without our having seen its EOF: the client must not take the
            # truncated stream for a clean end.
            client = Side.GRACEFUL if self.upstream_eof else Side.ABORT
            return (self._end(End("forwarded", "upstream_closed", client=client)),)
        rule = ENDINGS.get((Phase.FORWARDING, kind))
        if rule is None:
            return ()
        return (self._end(rule(event)),)

    def _end(self, end: End) -> End:
        self.phase = Phase.CLOSED
        self.ended = end
        return end


# Phase changes that are not endings.
ADVANCE: dict[tuple[Phase, Kind], Phase] = {
    (Phase.HANDSHAKE, Kind.IDENTIFIED): Phase.ADMITTING,
    (Phase.ADMITTING, Kind.ADMITTED): Phase.DIALING,
    (Phase.DIALING, Kind.CONNECTED): Phase.FORWARDING,
}


def _rule(
    decision: str,
    reason: str | None = None,
    *,
    client: Side = Side.GRACEFUL,
    upstream: Side = Side.GRACEFUL,
    close_notify: bool = False,
    prefix: str = "",
) -> RuleFn:
    """An ending whose reason is fixed, or the event's detail (with an optional prefix)."""

    def make(event: Event) -> End:
        why = reason if reason is not None else prefix + event.detail
        return End(decision, why, client, upstream, close_notify)

    return make


def _rejected(*, close_notify: bool) -> RuleFn:
    """A refusal: the decision the admission made, our goodbye, then linger."""

    def make(event: Event) -> End:
        return End(event.decision, event.detail, Side.LINGER, Side.GRACEFUL, close_notify)

    return make


def _client_lost(event: Event) -> End:
    reason = "client_reset" if event.detail == "reset" else "client_closed"
    return End("forwarded", reason, Side.KEEP, Side.ABORT)


_ABORTED = "aborted"
_GONE = Side.KEEP  # the client's socket is already gone

# (phase, event) -> the End. Refused clients get their goodbye and a linger (a reset
# could destroy it); after a completed handshake the goodbye is close_notify. An error
# on one side aborts the other, so a crash never looks like a clean TLS end.
ENDINGS: dict[tuple[Phase, Kind], RuleFn] = {
    # HANDSHAKE
    (Phase.HANDSHAKE, Kind.HANDSHAKE_FAILED): _rule("tls_failed", client=Side.LINGER),
    (Phase.HANDSHAKE, Kind.CLIENT_EOF): _rule("tls_failed", client=Side.LINGER),
    (Phase.HANDSHAKE, Kind.CLIENT_LOST): _rule(
        "tls_failed", "connection_lost_during_handshake", client=_GONE
    ),
    (Phase.HANDSHAKE, Kind.HANDSHAKE_TIMEOUT): _rule(
        "handshake_timeout", "handshake_not_finished", client=Side.ABORT
    ),
    (Phase.HANDSHAKE, Kind.EVICTED): _rule(
        "over_capacity", client=Side.ABORT, prefix="handshake_evicted: "
    ),
    (Phase.HANDSHAKE, Kind.SHUTDOWN): _rule(_ABORTED),
    # ADMITTING (synchronous: only a refusal can end it)
    (Phase.ADMITTING, Kind.REJECTED): _rejected(close_notify=True),
    (Phase.ADMITTING, Kind.CLIENT_LOST): _rule(
        _ABORTED, "client_closed_before_upstream", client=_GONE
    ),
    (Phase.ADMITTING, Kind.SHUTDOWN): _rule(_ABORTED, close_notify=True),
    # DIALING
    (Phase.DIALING, Kind.REJECTED): _rejected(close_notify=True),
    (Phase.DIALING, Kind.CLIENT_LOST): _rule(
        _ABORTED, "client_closed_before_upstream", client=_GONE
    ),
    (Phase.DIALING, Kind.SHUTDOWN): _rule(_ABORTED, close_notify=True),
    (Phase.DIALING, Kind.REVOKED): _rule(_ABORTED, "revoked", close_notify=True),
    # FORWARDING (EOFs and a clean upstream close are in Lifecycle._forwarding)
    (Phase.FORWARDING, Kind.CLIENT_LOST): _client_lost,
    (Phase.FORWARDING, Kind.UPSTREAM_LOST): _rule(
        "forwarded", client=Side.ABORT, prefix="upstream_error: "
    ),
    (Phase.FORWARDING, Kind.CLIENT_TLS_ERROR): _rule(
        "forwarded", upstream=Side.ABORT, prefix="client_tls_error: "
    ),
    (Phase.FORWARDING, Kind.TLS_WRITE_ERROR): _rule(
        "forwarded", client=Side.ABORT, upstream=Side.ABORT, prefix="tls_write_error: "
    ),
    (Phase.FORWARDING, Kind.IDLE): _rule("forwarded", "idle_timeout", close_notify=True),
    (Phase.FORWARDING, Kind.LIFETIME): _rule("forwarded", "max_lifetime", close_notify=True),
    (Phase.FORWARDING, Kind.REVOKED): _rule("forwarded", "revoked", close_notify=True),
    (Phase.FORWARDING, Kind.SHUTDOWN): _rule("forwarded", close_notify=True),
}
