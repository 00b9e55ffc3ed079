"""lab.py watch's frame (labkit.watch_model.build): counts over exactly the window,
rows in the proxy's order, the event feed, and the text form."""

from __future__ import annotations

import json
from typing import Any

from labkit.logs import LogLine, format_ts
from labkit.watch_model import as_text, build

NOW = 1_800_000_100.0


def line(origin: str, at: float, **record: Any) -> LogLine:
    record = {"ts": format_ts(at), **record}
    return LogLine(origin, int(at * 1e9), json.dumps(record), record)


def attempt(client: str, at: float, outcome: str = "ok", upstream: str | None = None) -> LogLine:
    return line(
        client,
        at,
        event="attempt",
        client=client,
        outcome=outcome,
        upstream=upstream,
        error=None if outcome == "ok" else "denied: no allowed upstream",
    )


STATUS = {
    "state": "serving",
    "upstreams": [
        {"name": "u1", "health": "up", "active_connections": 0},
        {"name": "u2", "health": "down", "active_connections": 0},
        {"name": "u3", "health": "up", "active_connections": 2},
    ],
}


def lines() -> list[LogLine]:
    return [
        attempt("client.a", NOW - 11, "ok", "u2"),  # outside the window
        attempt("client.a", NOW - 9, "ok", "u1"),
        attempt("client.a", NOW - 5, "ok", "u3"),
        attempt("client.b", NOW - 4, "ok", "u3"),
        attempt("client.e", NOW - 3, "rejected"),
        attempt("client.b", NOW - 2, "timeout"),
        attempt("client.a", NOW, "ok", "u3"),  # the window's end is included
        attempt("client.a", NOW + 1, "ok", "u1"),  # later than now: not counted
        line(
            "proxy",
            NOW - 30,
            event="health",
            upstream="u2",
            upstream_name="u2",
            old="up",
            new="down",
            reason="connect refused",
        ),
        line("proxy", NOW - 4, event="access", upstream_name="u3", bytes_up=100, bytes_down=2048),
        line("proxy", NOW - 12, event="access", upstream_name="u3", bytes_up=5, bytes_down=5),
        line("fault", NOW - 31, event="fault_applied", fault="blackhole (both)", target="u2"),
        line("proxy", NOW - 1, event="reload", result="ok"),
    ]


def test_a_refused_clients_reason_is_the_proxys_when_it_logged_one() -> None:
    refused = [
        line(
            "client.c",
            NOW - 2,
            event="attempt",
            client="client.c",
            outcome="rejected",
            error="closed without a reply",
        ),
        line(
            "proxy",
            NOW - 1.99,
            event="access",
            client="client.c",
            decision="no_healthy_upstream",
            reason="u3 is down",
        ),
        line("client.d", NOW - 2, event="attempt", client="client.d", outcome="rejected"),
        line("proxy", NOW - 6, event="access", client="client.d", decision="rate_limited"),
    ]
    rows = {c.client: c for c in build(refused, STATUS, NOW, title="t").clients}
    assert rows["client.c"].reason == "proxy: no_healthy_upstream: u3 is down"
    assert rows["client.d"].reason == ""  # 4 s apart: not the same connection


def test_counts_cover_exactly_the_window() -> None:
    frame = build(lines(), STATUS, NOW, title="run up-1")
    rows = {r.name: r for r in frame.upstreams}
    assert [r.name for r in frame.upstreams] == ["u1", "u2", "u3"]  # the proxy's order
    assert (rows["u1"].replies, rows["u2"].replies, rows["u3"].replies) == (1, 0, 3)
    assert rows["u3"].share == 0.75
    assert rows["u3"].bytes == 2148  # the access line 12 s ago is outside
    assert rows["u3"].active == 2
    assert rows["u2"].health == "down"
    assert rows["u2"].since == NOW - 30
    assert rows["u1"].since is None
    clients = {c.client: c for c in frame.clients}
    assert (clients["client.a"].ok, clients["client.a"].errors) == (3, 0)
    assert (clients["client.b"].ok, clients["client.b"].errors) == (1, 1)
    assert clients["client.b"].last == "timeout"
    assert (clients["client.e"].refused, clients["client.e"].reason) == (
        1,
        "denied: no allowed upstream",
    )
    assert clients["client.a"].reason == "from u3"
    assert frame.state == "serving"
    assert frame.topology == "client.a, client.b, client.e -> proxy -> u1, u2, u3"


def test_the_event_feed_is_in_time_order_and_short() -> None:
    frame = build(lines(), STATUS, NOW, title="run up-1")
    texts = [e.text for e in frame.events]
    assert texts == [
        "fault applied: u2: blackhole (both)",
        "u2 up -> down (connect refused)",
        "config reloaded",
    ]
    many = [
        line(
            "proxy",
            NOW - 50 + i,
            event="health",
            upstream_name="u1",
            old="up",
            new="down",
            reason=str(i),
        )
        for i in range(20)
    ]
    assert len(build(many, STATUS, NOW, title="t").events) == 8


def test_without_status_or_traffic() -> None:
    frame = build([], None, NOW, title="run up-1")
    assert frame.state == "unknown"
    assert frame.upstreams == []
    assert frame.topology == "proxy (no traffic yet)"
    text = as_text(frame)
    assert "(none yet)" in text


def test_the_text_form_has_a_row_per_upstream_and_client() -> None:
    text = as_text(build(lines(), STATUS, NOW, title="run up-1"))
    rows = text.splitlines()
    assert rows[0].startswith("run up-1 | proxy serving | last 10s to ")
    for name in ("u1", "u2", "u3", "client.a", "client.b", "client.e"):
        assert any(r.split()[:1] == [name] for r in rows), name
    u3 = next(r for r in rows if r.startswith("u3 "))
    assert u3.split() == ["u3", "up", "since", "start", "2", "3", "75%", "2.1", "KiB"]
