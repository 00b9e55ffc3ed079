"""Parsing the lab containers' logs (pure: text in, values out).

``docker logs --timestamps`` prefixes every line with the engine's RFC 3339 time in
nanoseconds; the services themselves write one JSON object per line, each starting with
``ts`` (UTC, milliseconds) and ``event``. This module turns both into typed records:

* :class:`LogLine` -- one raw line of one container, with the engine's timestamp;
* :class:`Attempt` -- a client's ``attempt`` line;
* :class:`Access` -- a proxy ``access`` line;
* :class:`HealthEvent` -- a proxy ``health`` transition;
* :class:`ReloadEvent` -- a proxy ``reload`` line (ok or error).

Every time here is seconds since the epoch as a float (the containers share the host's
clock), so the time a fault was injected on the host compares directly with them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

_DOCKER_TS = re.compile(
    r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$"
)


def parse_docker_timestamp(text: str) -> int:
    """``2024-05-01T12:00:00.123456789Z`` -> nanoseconds since the epoch.

    The engine trims trailing zeros of the fraction, so strings do not sort by time;
    these integers do. Raises ValueError on anything else."""
    match = _DOCKER_TS.match(text)
    if not match:
        raise ValueError(f"not an RFC 3339 timestamp: {text!r}")
    whole, fraction, zone = match.groups()
    offset = "+00:00" if zone == "Z" else zone
    seconds = int(datetime.fromisoformat(whole + offset).timestamp())
    nanos = int((fraction or "0").ljust(9, "0"))
    return seconds * 1_000_000_000 + nanos


def parse_ts(value: object) -> float | None:
    """A service's ``ts`` (``2024-05-01T12:00:00.123Z``) -> epoch seconds, or None."""
    if not isinstance(value, str) or not value:
        return None
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_ts(epoch: float) -> str:
    """Epoch seconds -> ``2024-05-01T12:00:00.123Z`` (the services' own format)."""
    moment = datetime.fromtimestamp(epoch, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class LogLine:
    """One line of one container's output."""

    source: str  # the container's short name in the run: proxy, u1, client.b, ...
    docker_ns: int  # the engine's timestamp of the line
    text: str  # the line as the service wrote it
    record: dict[str, Any] | None  # the JSON object, if the line is one

    @property
    def event(self) -> str | None:
        value = self.record.get("event") if self.record else None
        return value if isinstance(value, str) else None

    @property
    def ts(self) -> float:
        """The service's ``ts`` if present, else the engine's timestamp."""
        found = parse_ts(self.record.get("ts")) if self.record else None
        return found if found is not None else self.docker_ns / 1e9

    def evidence(self) -> str:
        return f"{self.source}: {self.text}"


def parse_record(text: str) -> dict[str, Any] | None:
    """The JSON object on a line, or None for anything else (tracebacks, messages)."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


MIN_TAIL = 16  # lines asked for at least (each costs the engine ~13 us; a call ~1 ms)


@dataclass(slots=True)
class TailState:
    """Where an incremental read of one container's log stands."""

    last_ns: int = 0  # the newest engine timestamp seen
    at_last: set[str] = field(default_factory=set)  # lines seen with exactly that timestamp
    last_fresh: int = 0  # new lines the last read found

    def since(self) -> float | None:
        """The ``since`` to ask the engine for (a little early: it is a float)."""
        if self.last_ns == 0:
            return None
        return max(0.0, (self.last_ns - 5_000_000) / 1e9)

    def tail(self) -> int | None:
        """How many of the log's last lines to ask for next (None: all of them, the
        first time). The engine reads a ``since`` query from the log's first line on
        (10,000 lines: ~100 ms a call, 100,000: ~0.5 s, even when nothing is new), but
        a ``tail`` from its end (100 lines of 100,000: ~5 ms); twice what the last read
        found is usually enough, and :func:`tail_reaches` says when it was not."""
        if self.last_ns == 0:
            return None
        return max(MIN_TAIL, 2 * self.last_fresh)


def tail_reaches(chunk: str, asked: int, state: TailState) -> bool:
    """Does ``chunk``, the log's last ``asked`` lines, hold everything after what
    ``state`` has seen? Yes if it is the whole log (fewer lines than asked) or its
    first line is no newer than the newest seen; otherwise lines may lie in between,
    and the caller asks for more."""
    lines = chunk.splitlines()
    if len(lines) < asked:
        return True
    stamp = lines[0].partition(" ")[0]
    try:
        return parse_docker_timestamp(stamp) <= state.last_ns
    except ValueError:
        return False


def take_new_lines(chunk: str, source: str, state: TailState) -> list[LogLine]:
    """Parse a ``docker logs --timestamps`` chunk and keep only lines not seen before.

    ``since`` is inclusive and asked for a little early, so a chunk repeats lines; they
    are dropped by comparing (timestamp, text) with ``state``, which is updated."""
    fresh: list[LogLine] = []
    for raw in chunk.splitlines():
        if not raw.strip():
            continue
        stamp, sep, text = raw.partition(" ")
        try:
            ns = parse_docker_timestamp(stamp)
        except ValueError:
            if not sep:
                continue
            ns, text = state.last_ns, raw  # not prefixed (should not happen): keep it
        if ns < state.last_ns or (ns == state.last_ns and text in state.at_last):
            continue
        if ns > state.last_ns:
            state.last_ns = ns
            state.at_last = set()
        state.at_last.add(text)
        fresh.append(LogLine(source, ns, text, parse_record(text)))
    state.last_fresh = len(fresh)
    return fresh


# --- typed views of the services' events --------------------------------------------


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _num(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass(frozen=True, slots=True)
class Attempt:
    """A client's ``attempt`` line. ``end`` is when it was logged; ``start`` when the
    connect began (the attempt's latency earlier)."""

    client: str
    number: int
    outcome: str
    upstream: str | None
    end: float
    latency: float
    error: str | None
    line: LogLine
    # Transfer mode only (None otherwise): planned, sent and echoed bytes, byte-exact.
    transfer_bytes: int | None = None
    bytes_sent: int | None = None
    bytes_received: int | None = None
    match: bool | None = None
    began: float | None = None  # the client's "started" (epoch seconds), if it logged one

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def transfer(self) -> bool:
        return self.transfer_bytes is not None

    @property
    def start(self) -> float:
        """When it began: the client's own ``started`` (older clients: the line's time
        less the latency, which is late by however long closing the connection took)."""
        return self.began if self.began is not None else self.end - self.latency


@dataclass(frozen=True, slots=True)
class Access:
    """A proxy ``access`` line, logged when the connection ended."""

    ts: float
    client: str | None
    peer_ip: str
    decision: str
    reason: str
    upstream_name: str | None
    attempts: int
    duration: float  # seconds, accept to end
    handshake: float | None  # seconds, accept to handshake done
    line: LogLine

    @property
    def start(self) -> float:
        return self.ts - self.duration

    @property
    def admitted_at(self) -> float | None:
        """When the admission decision was taken (right after the handshake)."""
        return None if self.handshake is None else self.start + self.handshake


@dataclass(frozen=True, slots=True)
class ReloadEvent:
    """A proxy ``reload`` line: ``result`` ok (with the new config's SHA-256) or error
    (with the offending ``key`` and the ``message``)."""

    ts: float
    result: str
    sha256: str | None
    key: str | None
    message: str | None
    open_connections: int | None
    line: LogLine

    @property
    def ok(self) -> bool:
        return self.result == "ok"


@dataclass(frozen=True, slots=True)
class HealthEvent:
    ts: float
    upstream_name: str
    old: str
    new: str
    reason: str
    source: str  # active | passive
    line: LogLine


def peer_ip(peer: str) -> str:
    """``10.0.0.5:41234`` -> ``10.0.0.5``; ``[::1]:5`` -> ``::1``."""
    if peer.startswith("["):
        return peer[1:].partition("]")[0]
    return peer.rpartition(":")[0] or peer


def _events(lines: Iterable[LogLine], event: str) -> Iterator[tuple[LogLine, dict[str, Any]]]:
    """The JSON lines whose ``event`` is ``event``, with their decoded records."""
    for line in lines:
        rec = line.record
        if rec is not None and rec.get("event") == event:
            yield line, rec


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def attempts_of(lines: Iterable[LogLine]) -> list[Attempt]:
    found: list[Attempt] = []
    for line, rec in _events(lines, "attempt"):
        latency = _num(rec.get("latency_ms"))
        number = rec.get("attempt")
        match = rec.get("match")
        found.append(
            Attempt(
                client=_str(rec.get("client")) or line.source,
                number=number if isinstance(number, int) else 0,
                outcome=_str(rec.get("outcome")) or "?",
                upstream=_str(rec.get("upstream")),
                end=line.ts,
                latency=(latency or 0.0) / 1000,
                began=parse_ts(rec.get("started")),
                error=_str(rec.get("error")),
                line=line,
                transfer_bytes=_int(rec.get("transfer_bytes")),
                bytes_sent=_int(rec.get("bytes_sent")),
                bytes_received=_int(rec.get("bytes_received")),
                match=match if isinstance(match, bool) else None,
            )
        )
    return found


def reloads_of(lines: Iterable[LogLine]) -> list[ReloadEvent]:
    return [
        ReloadEvent(
            ts=line.ts,
            result=_str(rec.get("result")) or "?",
            sha256=_str(rec.get("config_sha256")),
            key=_str(rec.get("key")),
            message=_str(rec.get("message")),
            open_connections=_int(rec.get("open_connections")),
            line=line,
        )
        for line, rec in _events(lines, "reload")
    ]


def access_of(lines: Iterable[LogLine]) -> list[Access]:
    found: list[Access] = []
    for line, rec in _events(lines, "access"):
        handshake = _num(rec.get("handshake_ms"))
        attempts = rec.get("attempts")
        found.append(
            Access(
                ts=line.ts,
                client=_str(rec.get("client")),
                peer_ip=peer_ip(_str(rec.get("peer")) or ""),
                decision=_str(rec.get("decision")) or "?",
                reason=_str(rec.get("reason")) or "",
                upstream_name=_str(rec.get("upstream_name")),
                attempts=attempts if isinstance(attempts, int) else 0,
                duration=(_num(rec.get("duration_ms")) or 0.0) / 1000,
                handshake=None if handshake is None else handshake / 1000,
                line=line,
            )
        )
    return found


def health_of(lines: Iterable[LogLine]) -> list[HealthEvent]:
    found: list[HealthEvent] = []
    for line, rec in _events(lines, "health"):
        found.append(
            HealthEvent(
                ts=line.ts,
                upstream_name=_str(rec.get("upstream_name")) or _str(rec.get("upstream")) or "?",
                old=_str(rec.get("old")) or "?",
                new=_str(rec.get("new")) or "?",
                reason=_str(rec.get("reason")) or "",
                source=_str(rec.get("source")) or "?",
                line=line,
            )
        )
    return found


def health_states(events: Iterable[HealthEvent]) -> dict[str, str]:
    """The latest state of each upstream after these transitions (in order)."""
    states: dict[str, str] = {}
    for event in sorted(events, key=lambda e: e.ts):
        states[event.upstream_name] = event.new
    return states


def events_named(lines: Iterable[LogLine], event: str) -> list[LogLine]:
    return [line for line in lines if line.event == event]
