"""The access log: one JSON line per connection when its socket is gone, and the
counters that go with it (a mixin of :class:`~l4proxy.proxy.Proxy`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .logs import JsonLog, utc_timestamp
from .metrics import Stats

if TYPE_CHECKING:
    from .connection import ClientConnection


class AccessLog:
    log: JsonLog
    stats: Stats

    def log_access(self, conn: ClientConnection, decision: str, reason: str) -> None:
        upstream = conn.upstream
        key = upstream.key if upstream is not None else None
        close = conn.close_kind
        self.stats.connection_closed(
            decision,
            reason,
            identity=conn.identity,
            upstream=key,
            bytes_up=conn.bytes_up,
            bytes_down=conn.bytes_down,
            close=close,
        )
        # Built in the line's order in one go, and written without emit's copies: this
        # runs for every connection.
        record: dict[str, Any] = {
            "ts": utc_timestamp(),
            "event": "access",
            **self.log.fields,
            "conn": conn.id,
            "client": conn.identity,
            "peer": conn.peer,
            "decision": decision,
            "reason": reason,
            "upstream": key,
            "upstream_name": upstream.name if upstream is not None else None,
            "attempts": conn.attempts,
            "bytes_up": conn.bytes_up,
            "bytes_down": conn.bytes_down,
            "duration_ms": round((time.monotonic() - conn.started) * 1000, 3),
            "handshake_ms": conn.handshake_ms,
            "close": close,
        }
        if close == "forced":
            record["unsent_bytes"] = conn.unsent
        if conn.handshake_ms is not None:
            record["tls_version"] = conn.tls.version()
        self.log.write(record)
