"""Capacity: ``max_connections`` and ``max_handshakes``, and evicting stalled handshakes
to make room (a mixin of :class:`~l4proxy.proxy.Proxy`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .closing import reset
from .config import Config
from .logs import JsonLog

if TYPE_CHECKING:
    from .connection import ClientConnection

# A handshake that made progress (its ClientHello got our reply) less than this long ago
# is not evicted to make room for a new connection (see Capacity.handshake_victim).
HANDSHAKE_GRACE = 1.0


class Capacity:
    config: Config
    log: JsonLog
    loop: asyncio.AbstractEventLoop
    connections: set[ClientConnection]
    handshaking: dict[ClientConnection, None]
    at_capacity: dict[str, list[int]]

    if TYPE_CHECKING:  # AccessLog's, in Proxy

        def connection_closed(self, conn: ClientConnection, decision: str, reason: str) -> None: ...

    def full(self) -> str | None:
        """The cap a new connection would exceed, if any: ``max_connections`` counts
        every socket, ``max_handshakes`` the connections still in their handshake."""
        config = self.config  # on every accept: plain attribute reads, no getattr
        if config.max_connections and len(self.connections) >= config.max_connections:
            return "max_connections"
        if config.max_handshakes and len(self.handshaking) >= config.max_handshakes:
            return "max_handshakes"
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
        if self.at_capacity:
            self.capacity_check()

    def capacity_counts(self) -> tuple[int, int]:
        """Open connections and handshakes, as the caps count them (with ``workers: N``
        the supervisor's are the whole proxy's)."""
        return len(self.connections), len(self.handshaking)

    def _at_cap(self, limit: str) -> bool:
        cap: int = getattr(self.config, limit)
        connections, handshakes = self.capacity_counts()
        count = connections if limit == "max_connections" else handshakes
        return bool(cap) and count >= cap

    def capacity_check(self) -> None:
        """A connection closed or left its handshake: a cap that was reached may have
        room again (its ``available`` line)."""
        for limit in ("max_connections", "max_handshakes"):
            if limit in self.at_capacity and not self._at_cap(limit):
                self._capacity_available(limit)

    def over_capacity(self, conn: ClientConnection, limit: str) -> None:
        """``conn`` was refused at accept: ``limit`` is reached and no handshake could
        make room."""
        cap = getattr(self.config, limit)
        self._capacity_full(limit, refused=1)
        self.connection_closed(conn, "over_capacity", f"{limit} {cap} reached")

    def _capacity_full(self, limit: str, *, refused: int = 0, evicted: int = 0) -> None:
        """``limit`` made this process refuse a connection or evict a handshake: the
        ``full`` line at the first of an episode, counted until ``available``."""
        counts = self.at_capacity.get(limit)
        if counts is None:
            cap = getattr(self.config, limit)
            counts = self.at_capacity[limit] = [0, 0]
            what = "evicting stalled handshakes" if evicted else "refusing new connections"
            connections, handshakes = self.capacity_counts()
            self.log.emit(
                "capacity",
                state="full",
                limit=limit,
                **{limit: cap},
                open_connections=connections,
                handshakes=handshakes,
                message=f"{limit} ({cap}) reached: {what}",
            )
        counts[0] += refused
        counts[1] += evicted

    def _capacity_available(self, limit: str) -> None:
        refused, evicted = self.at_capacity.pop(limit)
        connections, handshakes = self.capacity_counts()
        self.log.emit(
            "capacity",
            state="available",
            limit=limit,
            **{limit: getattr(self.config, limit)},
            open_connections=connections,
            handshakes=handshakes,
            refused=refused,
            evicted=evicted,
        )

    def close_bounded(self, transport: asyncio.Transport) -> None:
        """Close ``transport`` after its buffered bytes, resetting it if they have not
        gone within ``timeouts.close`` (a peer that stopped reading)."""
        transport.close()
        if transport.get_write_buffer_size():
            self.loop.call_later(self.config.timeouts.close, reset, transport)
