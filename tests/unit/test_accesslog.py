"""The access line, written member by member (``l4proxy.accesslog.access_line``), is
exactly what the log's JSON encoder writes for the same record, in the README's order,
for any values: identities and reasons with quotes, control characters or non-ASCII
text; no upstream; a forced close; no handshake; a worker's own members."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

from hypothesis import example, given
from hypothesis import strategies as st

from l4common.logs import JsonLog, to_json
from l4proxy import accesslog
from l4proxy.connection import ClientConnection
from l4proxy.metrics import Stats

NOW = 1000.0  # the monotonic clock when the line is written
TS = "2026-11-30T12:00:00.123Z"

texts = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**63)
durations = st.floats(min_value=0, max_value=1e6, allow_nan=False)


class Tls:
    def __init__(self, version: str | None) -> None:
        self._version = version

    def version(self) -> str | None:
        return self._version


def expected(conn: Any, decision: str, reason: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The record as the README lists it, built the plain way."""
    upstream = conn.upstream
    record: dict[str, Any] = {
        "ts": TS,
        "event": "access",
        **fields,
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
        "duration_ms": round((NOW - conn.started) * 1000, 3),
        "handshake_ms": conn.handshake_ms,
        "close": conn.close_kind,
    }
    if conn.close_kind == "forced":
        record["unsent_bytes"] = conn.unsent
    if conn.handshake_ms is not None:
        record["tls_version"] = conn.tls.version()
    return record


@given(
    identity=st.none() | texts,
    peer=texts,
    decision=texts,
    reason=texts,
    upstream=st.none() | st.tuples(texts, texts),
    numbers=st.tuples(counts, counts, counts, counts, counts),
    elapsed=durations,
    handshake_ms=st.none() | durations.map(lambda ms: round(ms, 3)),
    close=st.sampled_from(["graceful", "abort", "forced", "peer"]),
    version=st.none() | st.sampled_from(["TLSv1.3", "TLSv1.2"]),
    fields=st.sampled_from([{}, {"worker": 2}]),
)
@example(
    identity='cl"ient\\\n\x00é\u2028😀',
    peer="[::1]:443",
    decision="forwarded",
    reason="eof",
    upstream=("127.0.0.1:9001", "u1"),
    numbers=(1, 1, 0, 0, 0),
    elapsed=0.0,
    handshake_ms=None,
    close="forced",
    version=None,
    fields={"worker": 1},
)
def test_the_access_line_is_what_the_encoder_writes(
    identity: str | None,
    peer: str,
    decision: str,
    reason: str,
    upstream: tuple[str, str] | None,
    numbers: tuple[int, int, int, int, int],
    elapsed: float,
    handshake_ms: float | None,
    close: str,
    version: str | None,
    fields: dict[str, Any],
) -> None:
    conn_id, attempts, up, down, unsent = numbers
    conn = SimpleNamespace(
        id=conn_id,
        identity=identity,
        peer=peer,
        upstream=None if upstream is None else SimpleNamespace(key=upstream[0], name=upstream[1]),
        attempts=attempts,
        bytes_up=up,
        bytes_down=down,
        started=NOW - elapsed,
        handshake_ms=handshake_ms,
        close_kind=close,
        unsent=unsent,
        tls=Tls(version),
    )
    stream = io.StringIO()
    log = JsonLog(stream, fields)
    sink = SimpleNamespace(log=log, stats=Stats())
    with (
        mock.patch.object(accesslog, "utc_timestamp", return_value=TS),
        mock.patch("time.monotonic", return_value=NOW),
    ):
        accesslog.AccessLog.log_access(
            cast(accesslog.AccessLog, sink), cast(ClientConnection, conn), decision, reason
        )
    line = stream.getvalue()
    record = expected(conn, decision, reason, fields)
    assert line == to_json(record) + "\n"
    assert list(json.loads(line)) == list(record)  # the README's order
    assert line.isascii()
    assert sink.stats.closed[decision] == 1
