"""The access log: one JSON line per connection when its socket is gone, and the
counters that go with it (a mixin of :class:`~l4proxy.proxy.Proxy`)."""

from __future__ import annotations

import json.encoder
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .logs import JsonLog, utc_timestamp
from .metrics import Stats

if TYPE_CHECKING:
    from .connection import ClientConnection


# JSON string literals, escaped in C (every non-ASCII character as \\uXXXX, as the
# log's encoder writes them).
_quote: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _text(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def access_line(
    conn: ClientConnection, decision: str, reason: str, key: str | None, extra: str = ""
) -> str:
    """The access line's JSON text, written out member by member: a dict through the
    JSON encoder cost about three times as much (it escapes every key again), and this
    is written for every connection. ``extra``: the log's own members (a worker's
    number). The schema is the README's; ``tests/unit/test_accesslog.py`` holds this
    to the encoder's output for any values."""
    upstream = conn.upstream
    handshake_ms = conn.handshake_ms
    close = conn.close_kind
    line = (
        f'{{"ts":"{utc_timestamp()}","event":"access"{extra},"conn":{conn.id},'
        f'"client":{_text(conn.identity)},"peer":{_quote(conn.peer)},'
        f'"decision":{_quote(decision)},"reason":{_quote(reason)},"upstream":{_text(key)},'
        f'"upstream_name":{_text(upstream.name if upstream is not None else None)},'
        f'"attempts":{conn.attempts},"bytes_up":{conn.bytes_up},'
        f'"bytes_down":{conn.bytes_down},'
        f'"duration_ms":{round((time.monotonic() - conn.started) * 1000, 3)!r},'
        f'"handshake_ms":{"null" if handshake_ms is None else repr(handshake_ms)},'
        f'"close":{_quote(close)}'
    )
    if close == "forced":
        line += f',"unsent_bytes":{conn.unsent}'
    if handshake_ms is not None:
        line += f',"tls_version":{_text(conn.tls.version())}'
    return line + "}"


class AccessLog:
    log: JsonLog
    stats: Stats

    def log_access(self, conn: ClientConnection, decision: str, reason: str) -> None:
        upstream = conn.upstream
        key = upstream.key if upstream is not None else None
        self.stats.connection_closed(
            decision,
            reason,
            identity=conn.identity,
            upstream=key,
            bytes_up=conn.bytes_up,
            bytes_down=conn.bytes_down,
            close=conn.close_kind,
        )
        self.log.write_line(access_line(conn, decision, reason, key, self.log.fields_json))
