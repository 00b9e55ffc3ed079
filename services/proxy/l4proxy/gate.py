"""Where a connection asks for its upstream: the router in this process
(:class:`LocalGate`), or the supervisor's ledger over a channel (``worker.RemoteGate``).

A gate's answers are an :class:`~l4proxy.config.Upstream` (admitted: dial it), a
:class:`~l4proxy.router.Rejected`, or a future of one of those (the supervisor answers
later). The connection does the same with each.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from .config import Upstream
from .router import Admission, Rejected

if TYPE_CHECKING:
    from .connection import ClientConnection
    from .proxy import Proxy

Answer = Upstream | Rejected | asyncio.Future[Upstream | Rejected]


class Gate(Protocol):
    def opened(self, conn: ClientConnection) -> None:
        """``conn`` was accepted (and is within the proxy's own caps)."""

    def admit(self, conn: ClientConnection) -> Answer:
        """``conn`` finished its handshake as ``conn.identity``."""
        ...

    def dial_failed(self, conn: ClientConnection, reason: str) -> Answer:
        """The dial to ``conn.upstream`` failed: the next upstream, or the rejection."""
        ...

    def host(self, upstream: Upstream) -> str:
        """The address to dial for ``upstream`` (the health checks' last lookup)."""
        ...

    def release(self, conn: ClientConnection) -> None:
        """``conn`` ended: whatever it holds is given back, once."""


class LocalGate:
    """The single-process proxy's gate: the router, called directly."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def opened(self, conn: ClientConnection) -> None:
        pass  # the caps were applied at accept (Capacity.full)

    def admit(self, conn: ClientConnection) -> Answer:
        assert conn.identity is not None
        result = self.proxy.router.admit(conn.identity, self.proxy.loop.time())
        if isinstance(result, Rejected):
            return result
        conn.admission = result
        return result.lease.upstream

    def dial_failed(self, conn: ClientConnection, reason: str) -> Answer:
        admission = conn.admission
        assert isinstance(admission, Admission)
        proxy = self.proxy
        failed = admission.lease.upstream
        transition, picked = proxy.router.dial_failed(admission, proxy.loop.time(), reason)
        if transition is not None:
            proxy.log_transition(failed, transition, passive=True)
        if isinstance(picked, Rejected):
            conn.admission = None  # dial_failed gave every slot back
            return picked
        return picked.upstream

    def host(self, upstream: Upstream) -> str:
        return self.proxy.dial_host(upstream)

    def release(self, conn: ClientConnection) -> None:
        admission = conn.admission
        if admission is not None:
            conn.admission = None
            admission.release()
