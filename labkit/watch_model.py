"""What ``python lab.py watch`` shows (pure: log lines, the proxy's ``/status`` and the
time in; a :class:`Frame` out; then plain text or rich renderables).

A frame covers the last ``window`` seconds (10 by default) ending at ``now``:

- the topology in one line: clients -> proxy -> upstreams;
- one row per upstream (the proxy's config order, from ``/status``): health and since
  when (its last ``health`` line, or "since start"), active connections (``/status``),
  replies in the window (clients' ``ok`` attempts naming it) and their share, and bytes
  (both directions, from the proxy's ``access`` lines of connections to it that ended in
  the window);
- one row per client identity: ok, refused (``rejected``) and errors in the window, and
  its last outcome with the reason (the error, or the upstream that replied; for a
  refusal, the proxy's decision and reason from its access line when one was logged
  within a second of it);
- the last events: health transitions, faults applied and cleared (fault helpers and
  the upstreams' own), reloads, draining, capacity, discovered members changing.

Counting uses each line's own ``ts`` (the service's clock), so a frame and the logs of
the same window agree exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .logs import LogLine, format_ts

WINDOW = 10.0
EVENTS = 8
EVENT_KINDS = (
    "health",
    "fault",
    "fault_applied",
    "fault_cleared",
    "reload",
    "draining",
    "capacity",
    "resolve",
)


@dataclass(frozen=True, slots=True)
class UpstreamRow:
    name: str
    health: str
    since: float | None  # when it entered that state (epoch s), None: since start
    active: int
    replies: int
    share: float  # of all replies in the window, 0..1
    bytes: int


@dataclass(frozen=True, slots=True)
class ClientRow:
    client: str
    ok: int
    refused: int
    errors: int
    last: str  # its last outcome
    reason: str  # the last outcome's error, or the upstream that replied


@dataclass(frozen=True, slots=True)
class Event:
    at: float
    source: str
    text: str


@dataclass(slots=True)
class Frame:
    now: float
    window: float
    title: str
    state: str  # the proxy's: serving, draining, or unknown
    topology: str
    upstreams: list[UpstreamRow] = field(default_factory=list)
    clients: list[ClientRow] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)


# How far apart a client's refused attempt and the proxy's access line for it may be
# logged and still be read as one connection (both are written when it closes).
JOIN_SLACK = 1.0


def _rec(line: LogLine) -> Mapping[str, Any]:
    return line.record or {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def describe_event(line: LogLine) -> str | None:
    """One short sentence for a line worth showing in the feed, or None."""
    rec = _rec(line)
    kind = rec.get("event")
    if kind == "health":
        name = rec.get("upstream_name") or rec.get("upstream")
        return f"{name} {rec.get('old')} -> {rec.get('new')} ({rec.get('reason')})"
    if kind in ("fault_applied", "fault_cleared"):
        what = rec.get("fault") or rec.get("kind") or line.source
        target = f"{rec['target']}: " if rec.get("target") else ""
        if kind == "fault_applied":
            return f"fault applied: {target}{what}"
        return f"fault cleared ({rec.get('reason')}): {target}{what}"
    if kind == "fault":
        return f"{rec.get('upstream')} fault {rec.get('op')}: {rec.get('fault') or ''}".strip()
    if kind == "reload":
        if rec.get("result") == "ok":
            return "config reloaded"
        return f"reload refused: {rec.get('key')}: {rec.get('message')}"
    if kind == "draining":
        return f"proxy draining ({rec.get('open_connections', '?')} open)"
    if kind == "capacity":
        return f"capacity {rec.get('state')}: {rec.get('message') or rec.get('limit')}"
    if kind == "resolve" and rec.get("group"):
        return (
            f"{rec.get('group')}: {len(rec.get('members') or [])} members "
            f"(+{len(rec.get('added') or [])} -{len(rec.get('removed') or [])})"
        )
    return None


def build(
    lines: Iterable[LogLine],
    status: Mapping[str, Any] | None,
    now: float,
    *,
    title: str,
    window: float = WINDOW,
) -> Frame:
    """The frame for the ``window`` seconds ending at ``now``."""
    start = now - window
    seen = sorted(lines, key=lambda line: line.ts)
    status = status or {}
    upstream_names = [str(u.get("name")) for u in status.get("upstreams") or []]
    active = {
        str(u.get("name")): _int(u.get("active_connections")) for u in status.get("upstreams") or []
    }
    health = {
        str(u.get("name")): str(u.get("health") or "?") for u in status.get("upstreams") or []
    }
    since: dict[str, float] = {}
    replies: dict[str, int] = {}
    volume: dict[str, int] = {}
    clients: dict[str, list[int]] = {}
    last: dict[str, tuple[str, str, float]] = {}  # outcome, reason, when
    # The proxy's last refusal of each identity: why, which a refused client cannot see.
    refusals: dict[str, tuple[float, str]] = {}
    events: list[Event] = []
    for line in seen:
        rec = _rec(line)
        kind = rec.get("event")
        at = line.ts
        if kind == "health":
            name = str(rec.get("upstream_name") or rec.get("upstream"))
            since[name] = at
        if kind in EVENT_KINDS and at <= now:
            text = describe_event(line)
            if text is not None:
                events.append(Event(at, line.source, text))
        if not start < at <= now:
            continue
        if kind == "attempt":
            client = str(rec.get("client") or line.source)
            counts = clients.setdefault(client, [0, 0, 0])
            outcome = str(rec.get("outcome") or "?")
            if outcome == "ok":
                counts[0] += 1
                upstream = str(rec.get("upstream") or "?")
                replies[upstream] = replies.get(upstream, 0) + 1
                last[client] = (outcome, f"from {upstream}", at)
            else:
                counts[1 if outcome == "rejected" else 2] += 1
                last[client] = (outcome, str(rec.get("error") or ""), at)
        elif kind == "access":
            if rec.get("upstream_name"):
                name = str(rec["upstream_name"])
                volume[name] = (
                    volume.get(name, 0) + _int(rec.get("bytes_up")) + _int(rec.get("bytes_down"))
                )
            decision = rec.get("decision")
            if rec.get("client") and decision not in (None, "forwarded"):
                why = f"{decision}: {rec.get('reason')}" if rec.get("reason") else str(decision)
                refusals[str(rec["client"])] = (at, why)
    total = sum(replies.values())
    names = upstream_names + sorted(set(replies) - set(upstream_names))
    rows = [
        UpstreamRow(
            name=name,
            health=health.get(name, "?"),
            since=since.get(name),
            active=active.get(name, 0),
            replies=replies.get(name, 0),
            share=replies.get(name, 0) / total if total else 0.0,
            bytes=volume.get(name, 0),
        )
        for name in names
    ]
    client_rows = []
    for client, (ok, refused, errors) in sorted(clients.items()):
        outcome, reason, at = last.get(client, ("-", "", 0.0))
        refusal = refusals.get(client)
        if outcome == "rejected" and refusal is not None and abs(refusal[0] - at) <= JOIN_SLACK:
            reason = f"proxy: {refusal[1]}"  # the proxy's word for the same refusal
        client_rows.append(ClientRow(client, ok, refused, errors, outcome, reason))
    shown_clients = [c.client for c in client_rows]
    topology = (
        f"{_span(shown_clients)} -> proxy -> {_span(names)}"
        if shown_clients or names
        else "proxy (no traffic yet)"
    )
    return Frame(
        now=now,
        window=window,
        title=title,
        state=str(status.get("state") or "unknown"),
        topology=topology,
        upstreams=rows,
        clients=client_rows,
        events=events[-EVENTS:],
    )


def _span(names: Sequence[str]) -> str:
    if not names:
        return "(none)"
    if len(names) <= 4:
        return ", ".join(names)
    return f"{names[0]} .. {names[-1]} ({len(names)})"


def _ago(now: float, at: float | None) -> str:
    return "since start" if at is None else f"{max(0.0, now - at):.0f}s ago"


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def header(frame: Frame) -> str:
    return f"{frame.title} | proxy {frame.state} | last {frame.window:g}s to {format_ts(frame.now)}"


UPSTREAM_COLUMNS = ("upstream", "health", "changed", "active", "replies", "share", "bytes")
CLIENT_COLUMNS = ("client", "ok", "refused", "errors", "last", "reason")


def upstream_cells(frame: Frame) -> list[tuple[str, ...]]:
    return [
        (
            row.name,
            row.health,
            _ago(frame.now, row.since),
            str(row.active),
            str(row.replies),
            f"{row.share:.0%}",
            _size(row.bytes),
        )
        for row in frame.upstreams
    ]


def client_cells(frame: Frame) -> list[tuple[str, ...]]:
    return [
        (row.client, str(row.ok), str(row.refused), str(row.errors), row.last, row.reason)
        for row in frame.clients
    ]


def event_cells(frame: Frame) -> list[str]:
    return [f"{format_ts(e.at)[11:23]}  {e.source:<10} {e.text}" for e in frame.events]


def as_text(frame: Frame) -> str:
    """The frame as plain text (stdout is not a terminal, or ``--once``)."""
    out = [header(frame), frame.topology, ""]
    out += _table(UPSTREAM_COLUMNS, upstream_cells(frame))
    out.append("")
    out += _table(CLIENT_COLUMNS, client_cells(frame))
    out += ["", "events:"] + (["  " + e for e in event_cells(frame)] or ["  (none yet)"])
    return "\n".join(out) + "\n"


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines
