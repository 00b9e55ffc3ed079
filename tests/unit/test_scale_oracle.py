"""The scale scenario's oracle (labkit.scenarios.scale.judge): a pure function of the
clients' and the proxy's log lines, the times the scenario scaled, and the final
``/status``. A story that passes, then each way the proxy could get scaling wrong."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from labkit.logs import LogLine, access_of, attempts_of, format_ts, health_of
from labkit.scenarios.scale import Observed, judge, member_name, resolves_of

T0 = 1_800_000_000.0
UP_AT, DOWN_AT, CUT = T0 + 10, T0 + 30, T0 + 45
OLD = [f"10.0.1.{i}:8000" for i in (2, 3, 4)]
NEW = [f"10.0.1.{i}:8000" for i in (5, 6, 7, 8, 9)]
KEPT = ["10.0.1.2:8000", "10.0.1.5:8000"]  # the two left after scaling down
GONE = [k for k in OLD + NEW if k not in KEPT]


def line(origin: str, at: float, **record: Any) -> LogLine:
    record = {"ts": format_ts(at), **record}
    return LogLine(origin, int(at * 1e9), json.dumps(record), record)


def resolve(at: float, added: list[str], removed: list[str], members: list[str]) -> LogLine:
    return line(
        "proxy", at, event="resolve", group="up", added=added, removed=removed, members=members
    )


def health_up(at: float, key: str) -> LogLine:
    return line(
        "proxy",
        at,
        event="health",
        upstream=key,
        upstream_name=member_name(key),
        old="unknown",
        new="up",
        reason="connected",
        source="active",
    )


def access(start: float, end: float, client: str, key: str, reason: str = "eof") -> LogLine:
    return line(
        "proxy",
        end,
        event="access",
        client=client,
        peer="10.0.0.9:5000",
        decision="forwarded",
        reason=reason,
        upstream_name=member_name(key),
        attempts=1,
        duration_ms=(end - start) * 1000,
        handshake_ms=5.0,
    )


def attempt(start: float, end: float, client: str, outcome: str, upstream: str | None) -> LogLine:
    return line(
        client,
        end,
        event="attempt",
        client=client,
        attempt=1,
        outcome=outcome,
        upstream=upstream,
        latency_ms=(end - start) * 1000,
        started=format_ts(start),
        error=None if outcome == "ok" else "upstream_closed",
    )


def story() -> tuple[list[LogLine], list[LogLine], dict[str, Any]]:
    """3 members; 5 added at +11.5 s (up at once); 6 retired at +32 s; traffic to each
    member in each phase, one connection per retired member open across the scale-down."""
    proxy = [resolve(T0 + 1, OLD, [], OLD)]
    proxy += [health_up(T0 + 1.01, k) for k in OLD]
    proxy.append(resolve(T0 + 11.5, NEW, [], OLD + NEW))
    proxy += [health_up(T0 + 11.51, k) for k in NEW]
    proxy.append(resolve(T0 + 32, [], GONE, KEPT))
    clients: list[LogLine] = []
    n = 0

    def traffic(start: float, key: str, end: float | None = None) -> None:
        nonlocal n
        n += 1
        client = f"client.{n % 4 + 1}"
        stop = end if end is not None else start + 1.1
        proxy.append(access(start, stop, client, key))
        clients.append(attempt(start - 0.01, stop + 0.01, client, "ok", f"u{n}"))

    for i, key in enumerate(OLD):
        traffic(T0 + 2 + i * 0.1, key)
    for i, key in enumerate(NEW):
        traffic(T0 + 11.6 + i * 0.1, key)  # within 0.1-0.5 s of its first passing check
    for i, key in enumerate(GONE):
        traffic(T0 + 29.5 + i * 0.05, key, end=T0 + 30.8)  # open when the replicas go
    for i, key in enumerate(KEPT * 3):
        traffic(T0 + 33 + i * 0.5, key)
    status = {
        "upstreams": [{"name": member_name(k), "active_connections": 0} for k in KEPT],
        "retired_upstreams": [],
        "connections": {"open": 0, "forwarding": 0, "handshaking": 0, "closing": 0},
    }
    return clients, proxy, status


def observed(clients: list[LogLine], proxy: list[LogLine], status: dict[str, Any]) -> Observed:
    return Observed(
        attempts=attempts_of(clients),
        access=access_of(proxy),
        resolves=resolves_of(proxy),
        health=health_of(proxy),
        scaled={8: UP_AT, 2: DOWN_AT},
        clients_started=T0,
        cut=CUT,
        status=status,
        slot_names={f"u{i}" for i in range(1, 40)},
    )


def failed(seen: Observed) -> list[str]:
    return [c.name for c in judge(seen) if not c.passed]


def test_a_clean_scale_passes_every_check() -> None:
    checks = judge(observed(*story()))
    assert len(checks) == 6
    assert [c.name for c in checks if not c.passed] == []


def test_a_new_member_without_traffic_for_longer_than_an_interval_fails() -> None:
    clients, proxy, status = story()
    late = NEW[0]
    proxy = [
        p
        for p in proxy
        if not (p.event == "access" and (p.record or {}).get("upstream_name") == member_name(late))
    ]
    proxy.append(access(T0 + 14.0, T0 + 15.0, "client.1", late))  # 2.49 s after its check
    assert failed(observed(clients, proxy, status)) == [
        "each new member carries a connection within one health interval (2s) of its first "
        "passing check"
    ]


def test_a_connection_admitted_to_a_retired_member_fails() -> None:
    clients, proxy, status = story()
    proxy.append(access(T0 + 33.0, T0 + 34.0, "client.2", GONE[0]))
    names = failed(observed(clients, proxy, status))
    assert names == [
        "removed members get no new connection, and those open when the replicas went finish"
    ]


def test_a_connection_cut_when_its_member_went_fails() -> None:
    clients, proxy, status = story()
    proxy.append(access(T0 + 29.9, T0 + 30.5, "client.3", GONE[1], reason="upstream_reset"))
    assert failed(observed(clients, proxy, status)) == [
        "removed members get no new connection, and those open when the replicas went finish"
    ]


def test_failures_are_excused_only_in_flight_on_a_removed_member() -> None:
    clients, proxy, status = story()
    # In flight on a removed member across the scale-down: excused.
    proxy.append(access(T0 + 29.8, T0 + 30.4, "client.4", GONE[2], reason="eof"))
    clients.append(attempt(T0 + 29.79, T0 + 30.41, "client.4", "error", None))
    assert "no client attempt fails beyond connections in flight on a removed member" not in (
        failed(observed(clients, proxy, status))
    )
    # A failure on a kept member, later: not excused.
    clients.append(attempt(T0 + 40.0, T0 + 40.5, "client.1", "error", None))
    assert failed(observed(clients, proxy, status)) == [
        "no client attempt fails beyond connections in flight on a removed member"
    ]


def test_members_that_never_reach_the_replica_count_fail() -> None:
    clients, proxy, status = story()
    proxy = [p for p in proxy if not (p.event == "resolve" and (p.record or {}).get("removed"))]
    names = failed(observed(clients, proxy, status))
    assert "the group's members follow the replicas: 3 -> 8 -> 2" in names


def test_counts_left_in_status_fail() -> None:
    clients, proxy, status = story()
    for bad in (
        {**status, "upstreams": [{"name": "up@10.0.1.2", "active_connections": 1}] * 2},
        {**status, "retired_upstreams": [{"address": GONE[0], "active_connections": 1}]},
        {**status, "connections": {"open": 1, "forwarding": 1}},
        {},
    ):
        assert failed(observed(clients, proxy, bad)) == [
            "after the clients stop, the proxy counts no connection anywhere"
        ]


def test_an_answer_from_an_upstream_that_never_ran_fails_accounting() -> None:
    seen = replace(observed(*story()), slot_names={"u1"})
    assert failed(seen) == [
        "every attempt ends ok (from a running upstream) or with a named outcome"
    ]
