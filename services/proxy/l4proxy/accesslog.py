"""The access log: one JSON line per connection when its socket is gone, and the
counters that go with it (a mixin of :class:`~l4proxy.proxy.Proxy`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .logs import JsonLog
from .metrics import Stats

if TYPE_CHECKING:
    from .connection import ClientConnection


class AccessLog:
    log: JsonLog
    stats: Stats

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
