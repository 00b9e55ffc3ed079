"""labkit's pure parts: log parsing, verdicts, token-bucket expectations, topologies."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from l4proxy.config import parse_config
from l4proxy.ratelimit import TokenBucket
from labkit import checks as ck
from labkit import needs
from labkit import topology as topo
from labkit.certs import check_prepared
from labkit.checks import Check
from labkit.cli import EXIT_USAGE, cmd_scenario, parser, render
from labkit.engine import Engine
from labkit.logs import (
    LogLine,
    TailState,
    access_of,
    attempts_of,
    format_ts,
    health_of,
    health_states,
    parse_docker_timestamp,
    parse_record,
    parse_ts,
    peer_ip,
    reloads_of,
    take_new_lines,
)
from labkit.progress import Progress
from labkit.result import ScenarioResult
from labkit.run import config_text
from labkit.scenarios import SCENARIOS, missing

T0 = 1_800_000_000.0  # an epoch second; every synthetic line is relative to it


def line(source: str, at: float, /, **record: Any) -> LogLine:
    record = {"ts": format_ts(at), **record}
    text = json.dumps(record)
    return LogLine(source, int(at * 1e9), text, parse_record(text))


def attempt_line(
    client: str,
    end: float,
    outcome: str = "ok",
    upstream: str | None = "u1",
    latency_ms: float = 10.0,
    number: int = 1,
) -> LogLine:
    return line(
        client,
        end,
        event="attempt",
        client=client,
        attempt=number,
        outcome=outcome,
        upstream=upstream if outcome == "ok" else None,
        latency_ms=latency_ms,
        error=None if outcome == "ok" else "boom",
    )


def access_line(
    client: str | None,
    end: float,
    decision: str = "forwarded",
    upstream: str | None = "u1",
    duration_ms: float = 10.0,
    handshake_ms: float | None = 2.0,
    peer: str = "10.0.0.5:40000",
    reason: str = "eof",
    attempts: int = 1,
) -> LogLine:
    return line(
        "proxy",
        end,
        event="access",
        conn=1,
        client=client,
        peer=peer,
        decision=decision,
        reason=reason,
        upstream=None if upstream is None else f"10.0.0.20:8000-{upstream}",
        upstream_name=upstream,
        attempts=attempts,
        duration_ms=duration_ms,
        handshake_ms=handshake_ms,
    )


# --- logs ---------------------------------------------------------------------------------


def test_docker_timestamps_with_trimmed_fractions_order_by_time() -> None:
    a = parse_docker_timestamp("2024-05-01T12:00:00.1234Z")
    b = parse_docker_timestamp("2024-05-01T12:00:00.12345Z")
    assert b - a == 50_000
    assert parse_docker_timestamp("2024-05-01T12:00:01Z") % 1_000_000_000 == 0
    assert parse_docker_timestamp("2024-05-01T14:00:00+02:00") == parse_docker_timestamp(
        "2024-05-01T12:00:00Z"
    )
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_docker_timestamp("yesterday")


def test_service_ts_round_trips() -> None:
    assert parse_ts(format_ts(T0 + 0.123)) == pytest.approx(T0 + 0.123, abs=1e-6)
    assert parse_ts("2024-05-01T12:00:00.000Z") == pytest.approx(1714564800.0)
    assert parse_ts("not a time") is None
    assert parse_ts(None) is None


def test_incremental_reads_drop_repeated_lines_and_keep_new_ones() -> None:
    state = TailState()
    first = (
        '2024-05-01T12:00:00.1Z {"event": "listening"}\n'
        "2024-05-01T12:00:00.2Z plain text on stderr\n"
    )
    got = take_new_lines(first, "u1", state)
    assert [g.event for g in got] == ["listening", None]
    assert got[1].record is None
    assert got[1].text == "plain text on stderr"
    assert state.since() == pytest.approx(
        parse_docker_timestamp("2024-05-01T12:00:00.2Z") / 1e9 - 0.005
    )
    # ``since`` is inclusive and asked early: the engine repeats the tail of the last read.
    second = (
        "2024-05-01T12:00:00.2Z plain text on stderr\n"
        '2024-05-01T12:00:00.2Z {"event": "same instant, new line"}\n'
        '2024-05-01T12:00:00.3Z {"event": "connection"}\n'
    )
    got = take_new_lines(second, "u1", state)
    assert [g.event for g in got] == ["same instant, new line", "connection"]
    assert take_new_lines(second, "u1", state) == []
    assert TailState().since() is None


def test_attempt_access_and_health_records() -> None:
    lines = [
        attempt_line("client.b", T0 + 1.0, latency_ms=250.0),
        attempt_line("client.b", T0 + 2.0, outcome="timeout"),
        access_line("client.b", T0 + 3.0, duration_ms=500.0, handshake_ms=20.0),
        access_line(
            None,
            T0 + 3.5,
            decision="tls_failed",
            upstream=None,
            handshake_ms=None,
            peer="[fd00::5]:4000",
            reason="peer_did_not_return_a_certificate",
        ),
        line(
            "proxy",
            T0 + 4.0,
            event="health",
            upstream="10.0.0.21:8000",
            upstream_name="u2",
            old="up",
            new="down",
            reason="timeout",
            source="active",
        ),
        line(
            "proxy",
            T0 + 5.0,
            event="health",
            upstream="10.0.0.21:8000",
            upstream_name="u2",
            old="down",
            new="up",
            reason="connected",
            source="active",
        ),
        line("proxy", T0 + 5.0, event="listening"),
    ]
    ok, failed = attempts_of(lines)
    assert (ok.client, ok.ok, ok.upstream) == ("client.b", True, "u1")
    assert ok.start == pytest.approx(T0 + 0.75)
    assert (failed.ok, failed.outcome, failed.upstream) == (False, "timeout", None)
    forwarded, refused = access_of(lines)
    assert forwarded.start == pytest.approx(T0 + 2.5)
    assert forwarded.admitted_at == pytest.approx(T0 + 2.52)
    assert (refused.client, refused.peer_ip, refused.admitted_at) == (None, "fd00::5", None)
    events = health_of(lines)
    assert [(e.upstream_name, e.new) for e in events] == [("u2", "down"), ("u2", "up")]
    assert health_states(events) == {"u2": "up"}
    assert health_states(events[:1]) == {"u2": "down"}


def test_peer_ip() -> None:
    assert peer_ip("10.0.0.5:41234") == "10.0.0.5"
    assert peer_ip("[::1]:5") == "::1"
    assert peer_ip("weird") == "weird"


# --- authorization ------------------------------------------------------------------------

UPSTREAMS = [
    {"address": "10.0.0.20:8000", "name": "u1"},
    {"address": "10.0.0.21:8000", "name": "u2"},
    {"address": "10.0.0.22:8000", "name": "u3"},
]


def test_allowed_upstreams_follow_the_reference_rules_and_a_deny_everything_rule() -> None:
    authz = topo.load_topology("authz").proxy["authorization"]
    allowed = {c: ck.allowed_upstreams(c, UPSTREAMS, authz) for c in ("a", "b", "c", "d", "e")}
    assert allowed == {
        "a": {"u1", "u2", "u3"},
        "b": {"u1", "u2", "u3"},
        "c": {"u1", "u2", "u3"},
        "d": {"u1", "u2", "u3"},
        "e": {"u1", "u2", "u3"},
    }
    full = {c: ck.allowed_upstreams(f"client.{c}", UPSTREAMS, authz) for c in "abcde"}
    assert full == {
        "a": {"u2", "u3"},
        "b": {"u1", "u2", "u3"},
        "c": {"u3"},
        "d": {"u1", "u2", "u3"},
        "e": set(),
    }


def test_allowed_upstreams_first_match_wins_default_and_addresses() -> None:
    rules = {
        "default": "deny",
        "rules": [
            {"client": "*", "action": "allow", "upstream": "10.0.0.21:8000"},
            {"client": ["x", "y"], "action": "allow", "upstream": "*"},
            {"client": "x", "action": "deny", "upstream": "u1"},  # shadowed by the rule above
        ],
    }
    assert ck.allowed_upstreams("x", UPSTREAMS, rules) == {"u1", "u2", "u3"}
    assert ck.allowed_upstreams("z", UPSTREAMS, rules) == {"u2"}
    assert ck.allowed_upstreams("z", UPSTREAMS, {}) == {"u1", "u2", "u3"}


# --- token bucket -------------------------------------------------------------------------


def test_bucket_replay_gives_the_burst_then_the_rate() -> None:
    times = [T0 + i * 0.01 for i in range(500)]  # 100 requests/s for 5 s
    admitted = ck.simulate_bucket(times, rate=5, burst=10)
    assert admitted[:10] == [True] * 10
    assert admitted[10] is False
    assert sum(admitted) == 10 + 24  # 4.99 s of refill at 5/s: 24 whole tokens
    assert ck.expected_admitted(5, 10, 4.99) == pytest.approx(34.95)
    assert ck.rate_tolerance(34.95) == 2.0
    assert ck.rate_tolerance(100.0) == 5.0


@given(
    gaps=st.lists(st.floats(min_value=0.0, max_value=2.0), min_size=1, max_size=60),
    rate=st.floats(min_value=0.5, max_value=50.0),
    burst=st.integers(min_value=1, max_value=20),
)
def test_bucket_replay_matches_the_proxys_token_bucket(
    gaps: list[float], rate: float, burst: int
) -> None:
    times: list[float] = []
    now = 1000.0
    for gap in gaps:
        now += gap
        times.append(now)
    bucket = TokenBucket.full(rate, burst, times[0])
    assert ck.simulate_bucket(times, rate, burst) == [bucket.take(t) for t in times]


def bucket_lines(times: list[float], decisions: list[bool]) -> list[LogLine]:
    """client.b's access lines for connections decided at ``times`` as ``decisions`` say."""
    return [
        access_line(
            "client.b",
            t + 0.004,
            decision="forwarded" if ok else "rate_limited",
            duration_ms=4.0,
            handshake_ms=1.0,
            upstream="u1" if ok else None,
        )
        for t, ok in zip(times, decisions, strict=True)
    ]


def test_bucket_verdict_from_access_lines() -> None:
    times = [T0 + i * 0.01 for i in range(500)]
    decisions = ck.simulate_bucket(times, rate=5, burst=10)
    lines = bucket_lines(times, decisions)
    lines.append(access_line(None, T0 + 9, decision="tls_failed", handshake_ms=None))
    verdict = ck.bucket_verdict(access_of(lines), rate=5, burst=10)
    assert (verdict.admitted, verdict.limited) == (34, 466)
    assert verdict.elapsed == pytest.approx(4.99, abs=0.002)
    assert verdict.within
    assert verdict.simulated == 34
    assert "10 + 5 x 4.99" in verdict.describe(5, 10)
    # A limiter that let everything through is far outside the tolerance.
    loose = [access_line("client.b", t, duration_ms=1.0, handshake_ms=0.5) for t in times]
    assert not ck.bucket_verdict(access_of(loose), rate=5, burst=10).within


def test_bucket_verdict_for_a_client_slower_than_the_refill() -> None:
    """A burst client on a starved machine (bursts with pauses in between, while the
    bucket sits full and wastes its refill) gets fewer than burst + rate x elapsed:
    still right if each decision is the bucket's. A limiter that refilled too slowly is
    not."""

    def verdict(rate_used: float) -> ck.BucketVerdict:
        times = [T0 + i * 0.01 for i in range(12)] + [T0 + 2.6 + i * 0.01 for i in range(12)]
        decisions = ck.simulate_bucket(times, rate=rate_used, burst=10)
        return ck.bucket_verdict(access_of(bucket_lines(times, decisions)), rate=5, burst=10)

    slow = verdict(5)
    assert slow.limited > 0
    assert slow.admitted < slow.expected - slow.tolerance  # the old check failed here
    assert slow.within
    assert not verdict(2.5).within  # refilling at half the rate: the replay disagrees


# --- failures around a fault --------------------------------------------------------------


def test_failures_are_excused_only_in_flight_on_the_target() -> None:
    fault, detected = T0 + 10.0, T0 + 11.0
    attempts = attempts_of(
        [
            attempt_line("client.b", T0 + 9.0, outcome="error"),  # before the fault
            attempt_line("client.b", T0 + 10.1, outcome="error"),  # in flight on u2: excused
            attempt_line("client.d", T0 + 12.5, outcome="timeout", latency_ms=2000),  # excused
            attempt_line("client.d", T0 + 10.3, outcome="error"),  # went to u3: unexplained
            attempt_line("client.b", T0 + 13.0, outcome="error"),  # after detection
            attempt_line("client.c", T0 + 10.2, outcome="error"),  # not a watched client
            attempt_line("client.b", T0 + 10.3),  # ok
        ]
    )
    access = access_of(
        [
            access_line("client.b", T0 + 10.1, upstream="u2", reason="upstream_error: ECONNRESET"),
            access_line("client.d", T0 + 12.5, upstream="u2", duration_ms=2000),
            access_line("client.d", T0 + 10.3, upstream="u3"),
            access_line("client.b", T0 + 13.0, upstream="u2"),
            access_line("client.b", T0 + 9.0, upstream="u2"),
        ]
    )
    account = ck.account_failures(
        attempts,
        access,
        clients=["client.b", "client.d"],
        target="u2",
        fault_at=fault,
        detected=detected,
    )
    assert [a.client for a in account.on_target] == ["client.b", "client.d"]
    assert [a.end - T0 for a in account.on_target] == pytest.approx([10.1, 12.5])
    assert sorted(a.end - T0 for a in account.unexplained) == pytest.approx([9.0, 10.3, 13.0])
    assert account.total == 5


def test_replies_transitions_and_bins() -> None:
    attempts = attempts_of(
        [
            attempt_line("client.b", T0 + 1.0, upstream="u2"),
            attempt_line("client.b", T0 + 2.0, upstream="u2"),
            attempt_line("client.d", T0 + 2.2, upstream="u1"),
            attempt_line("client.d", T0 + 2.4, outcome="rejected"),
        ]
    )
    assert [a.end - T0 for a in ck.replies_from(attempts, "u2", T0 + 1.5)] == pytest.approx([2.0])
    assert ck.counts_by_upstream(attempts) == {"u2": 2, "u1": 1}
    assert ck.describe_counts(ck.outcome_counts(attempts)) == "ok 3, rejected 1"
    assert ck.describe_counts({}) == "none"
    edges, series = ck.replies_per_bin(attempts, T0, T0 + 3.0, 1.0)
    assert edges == [0.0, 1.0, 2.0]
    assert series == {"u1": [0, 0, 1], "u2": [0, 1, 1]}
    events = health_of(
        [
            line(
                "proxy",
                T0 + 1,
                event="health",
                upstream_name="u2",
                old="unknown",
                new="up",
                reason="connected",
                source="active",
            ),
            line(
                "proxy",
                T0 + 5,
                event="health",
                upstream_name="u2",
                old="up",
                new="down",
                reason="timeout",
                source="active",
            ),
        ]
    )
    found = ck.first_transition(events, "u2", "down", T0 + 4)
    assert found is not None
    assert found.ts == pytest.approx(T0 + 5)
    assert ck.first_transition(events, "u2", "down", T0 + 6) is None
    assert ck.first_transition(events, "u1", "up", T0) is None


def test_check_caps_its_evidence() -> None:
    made = ck.check("x", False, "detail", [f"line {i}" for i in range(20)])
    assert len(made.evidence) == ck.EVIDENCE_LIMIT + 1
    assert made.evidence[-1] == "... and 8 more line(s)"
    assert made.to_json()["passed"] is False


# --- topologies and the proxy config ------------------------------------------------------


@pytest.mark.parametrize("name", topo.list_topologies())
def test_every_shipped_topology_yields_a_valid_proxy_config(name: str) -> None:
    layout = topo.load_topology(name)
    addresses = topo.assign_addresses(
        "192.168.80.0/20",
        "192.168.96.0/20",
        layout.upstream_names(),
        [c.name for c in layout.containers()],
    )
    upstreams = {n: f"{ip}:{topo.UPSTREAM_PORT}" for n, ip in addresses.upstreams.items()}
    config = topo.proxy_config(topo.load_reference_config(), layout, upstreams)
    parsed = parse_config(config, Path("/certs"))  # the proxy's own validation
    assert [u.name for u in parsed.upstreams] == layout.upstream_names()
    assert str(parsed.tls.key) == "/certs/server.key"
    # The compose lab's metrics listener (for its Prometheus) is not a run's.
    compose = yaml.safe_load(topo.REFERENCE_PROXY_CONFIG.read_text())
    assert compose["admin"]["metrics_listen"] == "proxy-metrics:9101"
    assert parsed.admin.metrics_listen is None
    assert parsed.admin.listen is not None
    for client in layout.clients:
        command = client.command("proxy:8443")
        assert command[:4] == ["--id", client.id, "--proxy", "proxy:8443"]
    for box in layout.containers():
        command = box.command("proxy:8443")
        ids = command[: 2 * len(box.ids)]
        assert ids == [arg for i in box.ids for arg in ("--id", i)]
        assert command[len(ids) : len(ids) + 2] == ["--proxy", "proxy:8443"]


@pytest.mark.parametrize(
    ("scenario", "window"),
    [("failover", 1.8), ("hang", 1.8), ("partition", 1.8)],
)
def test_fault_topologies_have_short_health_windows(scenario: str, window: float) -> None:
    layout = topo.load_topology(SCENARIOS[scenario].topology)
    config = topo.deep_merge(topo.load_reference_config(), layout.proxy)
    timing = topo.timing(config)
    assert 0.5 <= timing.interval <= 1.0
    assert timing.window(1.0) == pytest.approx(window)
    assert needs.fault_target(config | {"upstreams": _named(layout)}, layout) == "u2"
    assert all(0.1 <= topo.parse_duration(c.interval_min) <= 0.3 for c in layout.clients)


def test_ratelimit_topology_has_a_greedy_and_a_polite_client() -> None:
    layout = topo.load_topology("ratelimit")
    enabled, rate, burst = topo.rate_limit(
        topo.deep_merge(topo.load_reference_config(), layout.proxy)
    )
    assert (enabled, rate, burst) == (True, 5.0, 10)
    greedy, polite = layout.clients
    assert greedy.burst
    assert "--burst" in greedy.command("proxy:8443")
    assert topo.parse_duration(polite.interval_min) >= 1 / rate
    assert topo.rate_limit({}) == (True, 2.0, 4)


def test_mtls_topology_certificates() -> None:
    layout = topo.load_topology("mtls")
    assert layout.own_cert_clients() == ["client.b"]
    assert layout.expired == ("client.expired",)
    assert layout.other_ca == ("client.otherca",)
    assert "--no-cert" in layout.client("client.nocert").command("p:1")
    assert layout.client("client.server").command("p:1")[-2:] == ["--cert-stem", "server"]
    assert {c.expect for c in layout.clients} >= {"peer_did_not_return_a_certificate"}
    with pytest.raises(KeyError):
        layout.client("client.z")


def test_deep_merge_merges_mappings_and_replaces_lists() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = topo.deep_merge(base, {"a": {"c": [3]}, "e": {"f": 2}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 2}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


def test_topology_parsing_defaults_and_counts() -> None:
    layout = topo.parse_topology(
        {
            "upstreams": 2,
            "upstream_defaults": {"somaxconn": 8, "mode": "echo"},
            "client_defaults": {"interval": ["100ms", 0.5], "count": 3},
            "clients": [{"id": "client.b", "concurrency": 2, "seed": 7}],
        },
        "t",
    )
    assert [(u.name, u.mode, u.somaxconn) for u in layout.upstreams] == [
        ("u1", "echo", 8),
        ("u2", "echo", 8),
    ]
    assert layout.upstreams[0].environment()["UPSTREAM_MODE"] == "echo"
    client = layout.clients[0]
    assert (client.interval_min, client.interval_max, client.count) == ("100ms", "0.5s", 3)
    assert client.finite
    command = client.command("proxy:8443")
    assert command[command.index("--concurrency") + 1] == "2"
    assert command[command.index("--seed") + 1] == "7"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": ["u1"], "colour": 1}, "unknown key"),
        ({"upstreams": ["u1", "u1"]}, "used twice"),
        ({"upstreams": ["u1"], "clients": [{"id": "c", "interval": ["1s"]}]}, "interval"),
        ({"upstreams": ["u1"], "clients": [{"id": "c", "timeout": "soon"}]}, "duration"),
        ({"upstreams": ["u1"], "clients": [{"id": "c", "interval": ["2s", "1s"]}]}, "greater"),
        ({"upstreams": ["u1"], "clients": [{"id": "bad name"}]}, "name"),
        ({"upstreams": ["u1"], "fault_target": "u1"}, "unknown key"),  # scenarios choose
        ({"upstreams": ["u1"], "certs": {"revoked": []}}, "unknown key"),
        ({"upstreams": [{"name": "u1", "somaxconn": -1}]}, "somaxconn"),
        ("just text", "mapping"),
    ],
)
def test_bad_topologies_are_refused_naming_the_key(raw: object, message: str) -> None:
    with pytest.raises(topo.TopologyError, match=message):
        topo.parse_topology(raw, "t")


def test_unknown_topology_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "one.yaml").write_text("upstreams: [u1]\n")
    with pytest.raises(topo.TopologyError, match="known: one"):
        topo.load_topology("two", tmp_path)
    assert topo.load_topology("one", tmp_path).upstream_names() == ["u1"]


def test_durations() -> None:
    assert topo.parse_duration("500ms") == pytest.approx(0.5)
    assert topo.parse_duration("2s") == 2.0
    assert topo.parse_duration("1m") == 60.0
    assert topo.parse_duration(3) == 3.0
    for bad in ("fast", True, None):
        with pytest.raises(topo.TopologyError):
            topo.parse_duration(bad)


def test_addresses_are_fixed_host_numbers_on_two_networks() -> None:
    got = topo.assign_addresses("172.30.0.0/16", "172.31.0.0/24", ["u1", "u2"], ["client.a"])
    assert (got.proxy_front, got.proxy_back) == ("172.30.0.10", "172.31.0.10")
    assert (topo.gateway(got.front), topo.gateway(got.back)) == ("172.30.0.1", "172.31.0.1")
    assert got.upstreams == {"u1": "172.31.0.20", "u2": "172.31.0.21"}  # back only
    assert got.clients == {"client.a": "172.30.0.100"}  # front only
    with pytest.raises(ValueError, match="too small"):
        topo.assign_addresses("10.0.0.0/24", "10.0.1.0/28", ["u1"], [])


def test_prepared_volume_keys_must_be_0600_and_owned_by_the_service_user() -> None:
    good = {"ca.key": {"mode": "0o600", "uid": 10001}, "ca.pem": {"mode": "0o644", "uid": 10001}}
    assert check_prepared(good) == []
    bad = {"ca.key": {"mode": "0o644", "uid": 0}}
    problems = check_prepared(bad)
    assert any("mode 0o644" in p for p in problems)
    assert any("uid 0" in p for p in problems)


# --- the command line's output ------------------------------------------------------------


def test_verdict_table_shows_failed_checks_with_evidence() -> None:
    result = ScenarioResult("failover", "failover", "failover-abc123", T0, duration=12.5)
    result.checks = [
        Check("steady", True, "replies so far: u1 3"),
        Check("u2 down in time", False, "down 3.10s after the kill", ['proxy: {"event":"health"}']),
    ]
    stream = io.StringIO()
    render(result, stream)
    text = stream.getvalue()
    assert "failover (run failover-abc123, topology failover): FAIL in 12.5s" in text
    assert "  PASS  steady" in text
    assert "  FAIL  u2 down in time" in text
    assert '| proxy: {"event":"health"}' in text
    assert not result.passed
    assert result.to_json()["checks"][1]["evidence"] == ['proxy: {"event":"health"}']
    assert not ScenarioResult("x", "x", "x-1", T0).passed  # no check ran: not a pass


def test_parser_knows_every_scenario_and_all() -> None:
    args = parser().parse_args(["scenario", "all", "--json", "--report", "out"])
    assert (args.name, args.json, args.report) == ("all", True, Path("out"))
    for name in SCENARIOS:
        assert parser().parse_args(["scenario", name]).name == name
    with pytest.raises(SystemExit):
        parser().parse_args(["scenario", "nope"])


# --- PROXY protocol, transfer clients, reload and drain -----------------------------------


def test_upstreams_expect_the_proxy_protocol_the_proxy_speaks() -> None:
    layout = topo.parse_topology(
        {"upstreams": ["u1", {"name": "u2", "proxy_protocol": "none"}, {"name": "e1"}]}, "t"
    )
    addresses = {"u1": "10.0.0.20:8000", "u2": "10.0.0.21:8000", "e1": "10.0.0.22:8000"}
    config = topo.proxy_config(topo.load_reference_config(), layout, addresses)
    assert config["proxy_protocol"] == "v2"  # lab/proxy.yaml
    assert config["upstreams"][1] == {
        "address": "10.0.0.21:8000",
        "name": "u2",
        "proxy_protocol": "none",
    }
    assert "proxy_protocol" not in config["upstreams"][0]
    got = {name: topo.upstream_proxy_protocol(config, name) for name in addresses}
    assert got == {"u1": "v2", "u2": "none", "e1": "v2"}
    assert topo.upstream_proxy_protocol({"upstreams": []}, "u1") == "none"
    none = topo.deep_merge(config, {"proxy_protocol": "none"})
    assert topo.upstream_proxy_protocol(none, "u1") == "none"
    env = layout.upstreams[0].environment(got["u1"])
    assert env["UPSTREAM_PROXY_PROTOCOL"] == "v2"
    assert layout.upstreams[0].environment()["UPSTREAM_PROXY_PROTOCOL"] == "none"
    parsed = parse_config(config, Path("/certs"))
    assert [u.proxy_protocol for u in parsed.upstreams] == ["v2", "none", "v2"]


def test_transfer_clients_and_autostart() -> None:
    layout = topo.parse_topology(
        {
            "upstreams": [{"name": "e1", "mode": "echo"}],
            "clients": [
                {"id": "client.t", "transfer_bytes": "4MiB", "transfer_time": "4s", "timeout": 9},
                {"id": "client.n", "transfer_bytes": 65536, "autostart": False},
            ],
        },
        "t",
    )
    paced, plain = layout.clients
    command = paced.command("proxy:8443")
    assert command[command.index("--transfer-bytes") + 1] == "4MiB"
    assert command[command.index("--transfer-time") + 1] == "4s"
    assert command[command.index("--timeout") + 1] == "9s"
    assert (paced.transfer, paced.autostart, plain.autostart) == (True, True, False)
    assert "--transfer-time" not in plain.command("p:1")
    assert plain.command("p:1")[-2:] == ["--transfer-bytes", "65536"]


@pytest.mark.parametrize(
    ("client", "message"),
    [
        ({"id": "c", "transfer_bytes": "lots"}, "transfer_bytes"),
        ({"id": "c", "transfer_bytes": 0}, "transfer_bytes"),
        ({"id": "c", "transfer_time": "2s"}, "needs transfer_bytes"),
        ({"id": "c", "transfer_bytes": "1MiB", "transfer_time": "2s"}, "longer than"),
        ({"id": "c", "colour": "red"}, "unknown key"),
    ],
)
def test_bad_transfer_clients(client: dict[str, Any], message: str) -> None:
    with pytest.raises(topo.TopologyError, match=message):
        topo.parse_topology({"upstreams": ["u1"], "clients": [client]}, "t")


def test_bad_upstream_proxy_protocol() -> None:
    with pytest.raises(topo.TopologyError, match="proxy_protocol"):
        topo.parse_topology({"upstreams": [{"name": "u1", "proxy_protocol": "v1"}]}, "t")


def test_reload_topology_changes_rules_and_stays_valid() -> None:
    layout = topo.load_topology("reload")
    names = layout.upstream_names()
    upstreams = {n: f"10.0.0.{20 + i}:8000" for i, n in enumerate(names)}
    old = topo.proxy_config(topo.load_reference_config(), layout, upstreams)
    new = {**old, "authorization": needs.reload_authorization(old, layout)}
    parse_config(new, Path("/certs"))  # the new config is one the proxy accepts
    before, after = needs.allowed(old, layout), needs.allowed(new, layout)
    assert (before["client.a"], after["client.a"]) == ({"u1"}, {"u2"})  # moved
    assert (before["client.b"], after["client.b"]) == ({"u1", "u2"}, set())  # denied
    assert (before["client.c"], after["client.c"]) == (set(), {"u1"})  # newly allowed
    transfers = [c for c in layout.clients if c.transfer]
    assert transfers
    assert all(before[c.id] == after[c.id] == {"e1"} for c in transfers)
    modes = {u.name: u.mode for u in layout.upstreams}
    assert modes["e1"] == "echo"


def test_drain_topology_transfers_fit_the_window() -> None:
    layout = topo.load_topology("drain")
    config = topo.deep_merge(topo.load_reference_config(), layout.proxy)
    grace = topo.drain_grace(config)
    assert grace == 10.0
    assert topo.drain_grace({}) == 30.0
    early = [c for c in layout.clients if c.transfer and c.autostart]
    late = [c for c in layout.clients if not c.autostart]
    assert len(early) == 4
    assert all(topo.parse_duration(c.transfer_time or "0") < grace for c in early)
    assert all(c.count == 1 for c in early + late)
    assert [c.id for c in late] == ["client.long"]
    assert topo.parse_duration(late[0].transfer_time or "0") > 2 * grace


def transfer_line(
    client: str, end: float, latency_s: float, *, ok: bool = True, size: int = 4096
) -> LogLine:
    return line(
        client,
        end,
        event="attempt",
        client=client,
        attempt=1,
        outcome="ok" if ok else "truncated",
        upstream=None,
        latency_ms=latency_s * 1000,
        error=None if ok else "cut",
        transfer_bytes=size,
        bytes_sent=size,
        bytes_received=size if ok else size // 2,
        match=ok,
    )


def test_transfer_attempts_and_reload_lines_parse() -> None:
    (plain,) = attempts_of([attempt_line("client.a", T0)])
    assert (plain.transfer, plain.transfer_bytes, plain.match) == (False, None, None)
    (moved,) = attempts_of([transfer_line("client.t1", T0 + 5, 4.0)])
    assert moved.transfer
    assert (moved.transfer_bytes, moved.bytes_sent, moved.bytes_received) == (4096, 4096, 4096)
    assert moved.match is True
    assert moved.start == pytest.approx(T0 + 1)
    ok, error = reloads_of(
        [
            line("proxy", T0, event="reload", result="ok", config_sha256="ab", open_connections=2),
            line("proxy", T0 + 1, event="reload", result="error", key="x", message="x: unknown"),
            line("proxy", T0 + 2, event="listening"),
        ]
    )
    assert (ok.ok, ok.sha256, ok.open_connections, ok.key) == (True, "ab", 2, None)
    assert (error.ok, error.key, error.message, error.sha256) == (False, "x", "x: unknown", None)


def test_rule_change_judges_each_attempt_by_when_it_started() -> None:
    old = {"client.a": {"u1"}, "client.b": {"u1"}, "client.c": set(), "client.t": {"e1"}}
    new = {"client.a": {"u3"}, "client.b": set(), "client.c": {"u2"}, "client.t": {"e1"}}
    at = T0 + 10
    attempts = attempts_of(
        [
            attempt_line("client.a", T0 + 5, upstream="u1"),  # before: old rules
            attempt_line("client.a", at + 0.1, upstream="u1"),  # around: either
            attempt_line("client.a", at + 2, upstream="u3"),  # after: new rules
            attempt_line("client.a", at + 3, upstream="u1"),  # after, old rules: wrong
            attempt_line("client.b", T0 + 5, upstream="u1"),
            attempt_line("client.b", at + 2, outcome="rejected"),
            attempt_line("client.c", T0 + 5, outcome="rejected"),
            attempt_line("client.c", at + 0.2, outcome="rejected"),
            attempt_line("client.c", at + 2, outcome="rejected"),  # should be served: wrong
            attempt_line("client.z", at + 2, outcome="error"),  # not judged
            transfer_line("client.t", at + 2, 4.0),  # transfers are judged elsewhere
        ]
    )
    change = ck.judge_rule_change(attempts, old, new, at=at, margin=0.5)
    assert len(change.before) == 3
    assert len(change.around) == 2
    assert len(change.after) == 4
    assert [(a.client, a.end) for a in change.wrong] == [
        ("client.a", at + 3),
        ("client.c", at + 2),
    ]
    assert len(change.per_client("client.a", "after")) == 2
    assert ck.follows_rules(attempts[0], {"u1", "u2"})
    assert not ck.follows_rules(attempts[0], set())


def test_access_change_uses_the_proxys_admission_time() -> None:
    old = {"client.a": {"u1"}, "client.b": {"u1"}}
    new = {"client.a": {"u3"}, "client.b": set()}
    at = T0 + 10
    # admitted_at = end - duration + handshake = end - 0.010 + 0.002
    access = access_of(
        [
            access_line("client.a", at - 1, upstream="u1"),
            access_line("client.b", at - 1, upstream="u1"),
            access_line("client.a", at + 0.05, upstream="u1"),  # within the slack: either
            access_line("client.a", at + 1, upstream="u3"),
            access_line("client.b", at + 1, "denied", None, reason="no_allowed_upstream"),
            access_line("client.b", at + 2, upstream="u1"),  # forwarded after: wrong
            access_line("client.b", at + 3, "tls_failed", None, handshake_ms=None),  # wrong
            access_line(None, at + 3, "tls_failed", None, handshake_ms=None),  # not judged
            access_line("client.z", at + 3, upstream="u9"),  # not judged
        ]
    )
    change = ck.judge_access_change(access, old, new, at=at, slack=0.1)
    assert (len(change.before), len(change.around), len(change.after)) == (2, 1, 3)
    assert [(a.client, a.decision) for a in change.wrong] == [
        ("client.b", "forwarded"),
        ("client.b", "tls_failed"),
    ]


def test_transfers_are_accounted_with_their_access_lines() -> None:
    size = 4096
    good = transfer_line("client.t1", T0 + 5, 4.0, size=size)
    cut = transfer_line("client.t2", T0 + 5, 4.0, ok=False, size=size)
    lonely = transfer_line("client.t3", T0 + 5, 4.0, size=size)
    attempts = attempts_of([good, cut, lonely])
    forwarded = [
        line(
            "proxy",
            T0 + 4.99,
            event="access",
            client=client,
            peer="10.0.0.5:1",
            decision="forwarded",
            reason=reason,
            upstream_name="e1",
            duration_ms=3900.0,
            handshake_ms=2.0,
            bytes_up=size,
            bytes_down=down,
        )
        for client, reason, down in (("client.t1", "eof", size), ("client.t2", "drain_timeout", 9))
    ]
    access = access_of(forwarded)
    account = ck.account_transfers(attempts, access, 0.05)
    assert [a.client for a in account.broken] == ["client.t2"]
    assert [a.client for a in account.unforwarded] == ["client.t2", "client.t3"]
    assert not account.intact
    assert len(account.evidence(access, 0.05)) == 3  # t2, its access line, t3
    assert ck.account_transfers(attempts[:1], access, 0.05).intact
    assert not ck.account_transfers([], access, 0.05).intact
    assert ck.in_flight(attempts, T0 + 2) == attempts
    assert ck.in_flight(attempts, T0 + 6) == []
    assert ck.transfer_intact(attempts[0])
    assert not ck.transfer_intact(attempts_of([attempt_line("client.a", T0)])[0])


def test_drain_helpers() -> None:
    attempts = attempts_of(
        [
            attempt_line("client.a", T0 + 1, latency_ms=5.0),
            attempt_line("client.a", T0 + 3, outcome="refused", latency_ms=1.0),
            attempt_line("client.a", T0 + 9, outcome="timeout", latency_ms=2000.0),
        ]
    )
    assert [a.outcome for a in ck.started_between(attempts, T0 + 2, T0 + 5)] == ["refused"]
    access = access_of([access_line("client.a", T0 + 1), access_line("client.a", T0 + 4)])
    assert [a.ts for a in ck.accepted_after(access, T0 + 2, 0.05)] == [T0 + 4]
    lines = [
        line("proxy", T0, event="stopped", reason="forced"),
        line("proxy", T0 + 2, event="draining", open_connections=4, grace_s=10.0),
        line("proxy", T0 + 5, event="stopped", reason="drained"),
    ]
    found = ck.event_after(lines, "stopped", T0 + 1)
    assert found is not None
    assert (found.record or {})["reason"] == "drained"
    assert ck.event_after(lines, "draining", T0 + 3) is None


def test_upstream_connection_lines_must_name_the_client() -> None:
    def conn(**fields: Any) -> LogLine:
        record = {"outcome": "replied", "proxy_protocol": "v2-proxy", "identity": "client.a"}
        return line("u1", T0, event="connection", **(record | fields))

    good = [
        conn(message="Hello from client.a"),
        conn(message=None, outcome="echoed"),  # echo mode has no message
        conn(outcome="empty", proxy_protocol="v2-local", identity=None),  # a health check
    ]
    bad = [
        conn(message="Hello from client.b"),
        conn(message="Hello from client.a", proxy_protocol=None, identity=None),
        conn(message=None, identity=None),
    ]
    assert ck.identity_problems(good) == []
    assert ck.identity_problems(good + bad) == bad


def test_config_text_names_the_run() -> None:
    text = config_text("reload-abc", {"listen": "0.0.0.0:8443", "upstreams": []})
    assert text.splitlines()[0] == "# generated by labkit for run reload-abc"
    assert "listen: 0.0.0.0:8443" in text


class _GonePipe:
    """A stream whose reader has gone, like stderr piped into ``head`` after it exits."""

    def __init__(self) -> None:
        self.attempts = 0

    def write(self, _text: str) -> int:
        self.attempts += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_progress_survives_a_reader_that_went_away() -> None:
    """A broken progress pipe must never abort a run (or its clean-up) half-way."""
    gone = _GonePipe()
    progress = Progress(gone)  # type: ignore[arg-type]
    with progress.step("removing the run"):
        progress.say("still going")
    assert gone.attempts == 1  # it stopped writing after the first failure
    assert progress.quiet


def _named(layout: topo.Topology) -> list[dict[str, str]]:
    return [{"address": f"{u.name}:8000", "name": u.name} for u in layout.upstreams]


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_can_run_on_its_own_topology(name: str) -> None:
    layout = topo.load_topology(SCENARIOS[name].topology)
    config = topo.nominal_config(topo.load_reference_config(), layout)
    assert missing(name, config, layout) == []


def test_a_scenario_says_what_a_topology_lacks() -> None:
    reference = topo.load_reference_config()
    single = topo.parse_topology(
        {
            "upstreams": ["u1"],
            "clients": [{"id": "client.a"}],
            "proxy": {"authorization": {"default": "allow", "rules": []}},
        },
        "one",
    )
    config = topo.nominal_config(reference, single)
    assert missing("failover", config, single) == ["two upstreams"]
    assert missing("isolation", config, single) == ["two upstreams"]
    lacking = missing("ratelimit", config, single)
    assert any("--burst client" in item for item in lacking)
    assert any("polite client" in item for item in lacking)
    assert missing("mtls", config, single)[0].startswith("a client with bad credentials")
    assert missing("drain", config, single) == [
        "a transfer client that stops by itself",
        "a transfer client the scenario starts itself (autostart: false)",
    ]


def test_the_fault_target_is_one_whose_clients_can_go_elsewhere() -> None:
    layout = topo.parse_topology(
        {
            "upstreams": ["alpha", "beta", "gamma"],
            "clients": [{"id": "svc-1"}, {"id": "svc-2"}],
            "proxy": {
                "authorization": {
                    "default": "deny",
                    "rules": [
                        {"client": "svc-1", "action": "allow", "upstream": ["alpha", "beta"]},
                        {"client": "svc-2", "action": "allow", "upstream": "gamma"},
                    ],
                }
            },
        },
        "t",
    )
    config = topo.nominal_config(topo.load_reference_config(), layout)
    # gamma is svc-2's only upstream: faulting it would leave svc-2 nowhere to go.
    assert needs.fault_target(config, layout) == "beta"
    config["authorization"]["rules"][0]["upstream"] = "alpha"
    assert needs.fault_target(config, layout) is None
    assert "whose clients may all reach" in missing("failover", config, layout)[0]


def test_hang_needs_a_capped_backlog_on_its_target() -> None:
    layout = topo.parse_topology({"upstreams": ["u1", "u2"], "clients": [{"id": "c"}]}, "t")
    config = topo.nominal_config(topo.load_reference_config(), layout)
    assert "somaxconn" in missing("hang", config, layout)[0]


def test_a_topology_may_be_named_by_its_file(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("upstreams: [a, b]\nclients: [{id: svc-1}]\n", encoding="utf-8")
    layout = topo.load_topology(str(path))
    assert (layout.name, layout.upstream_names()) == ("mine", ["a", "b"])


def test_a_scenario_on_an_unfit_topology_exits_2_before_touching_the_engine(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("upstreams: [u1, u2]\nclients: [{id: svc-1}]\n", encoding="utf-8")
    args = parser().parse_args(["scenario", "hang", "--topology", str(path)])
    untouched = cast(Engine, object())  # any call on it would raise AttributeError
    assert cmd_scenario(args, untouched, Progress(quiet=True)) == EXIT_USAGE
    said = capsys.readouterr().err
    assert said.startswith("scenario hang cannot run on topology mine: it needs a capped")


def test_rules_naming_upstreams_the_topology_lacks_are_named() -> None:
    layout = topo.parse_topology({"upstreams": ["north", "south"], "clients": [{"id": "c"}]}, "t")
    config = topo.nominal_config(topo.load_reference_config(), layout)  # the reference rules
    lacking = missing("isolation", config, layout)
    assert lacking == [
        "authorization rules that name its own upstreams (they name u1, u2; set "
        "proxy.authorization in the topology)"
    ]


@pytest.mark.parametrize(
    ("scenarios", "topology"),
    [
        (["failover", "hang", "partition", "stop", "authz", "isolation"], "alt-mesh"),
        (["ratelimit"], "alt-bucket"),
        (["mtls"], "alt-certs"),
        (["reload"], "alt-rules"),
        (["drain"], "alt-drain"),
    ],
)
def test_the_alternate_topologies_fit_their_scenarios(scenarios: list[str], topology: str) -> None:
    layout = topo.load_topology(topology)
    config = topo.nominal_config(topo.load_reference_config(), layout)
    for name in scenarios:
        assert missing(name, config, layout) == [], name
        assert set(layout.upstream_names()).isdisjoint(
            topo.load_topology(SCENARIOS[name].topology).upstream_names()
        )  # other names than the scenario's own topology


def test_an_attempt_began_when_its_client_says_not_when_the_line_was_written() -> None:
    """The client writes the line after closing the connection, which can take a second
    after a timeout; its ``started`` field says when the attempt really began."""
    logged = line(
        "client.a",
        T0 + 3.0,
        event="attempt",
        client="client.a",
        attempt=1,
        outcome="timeout",
        started=format_ts(T0),
        latency_ms=2000.0,
    )
    (timed_out,) = attempts_of([logged])
    assert timed_out.start == pytest.approx(T0)  # not T0 + 1.0 (ts less the latency)
    older = line("client.a", T0 + 3.0, event="attempt", client="client.a", latency_ms=2000.0)
    assert attempts_of([older])[0].start == pytest.approx(T0 + 1.0)


def test_the_ready_probe_asks_the_admin_listener_the_config_names() -> None:
    assert topo.ready_probe({})[-2:] == ["127.0.0.1", "9100"]  # the proxy's default
    assert topo.ready_probe({"admin": {"listen": "0.0.0.0:9200"}})[-2:] == ["127.0.0.1", "9200"]
    assert topo.ready_probe({"admin": {"listen": "[::]:9200"}})[-2:] == ["::1", "9200"]
    assert topo.ready_probe({"admin": {"listen": ""}}) == topo.adminctl("ready")


@pytest.mark.parametrize("name", topo.list_topologies())
def test_steady_clients_stay_under_the_rate_limit_of_their_topology(name: str) -> None:
    """A client that is not a burst client must not outrun its topology's per-identity
    rate on average, or scenarios that judge every attempt (authz) fail by chance once
    its burst is spent (pool did: one attempt in a CI run)."""
    layout = topo.load_topology(name)
    config = topo.nominal_config(topo.load_reference_config(), layout)
    limit = config.get("rate_limit") or {}
    if limit.get("enabled", True) is False:
        return
    rate = float(limit.get("rate", 2))
    for client in layout.clients:
        if client.burst or client.count is not None or client.concurrency > 1:
            continue  # meant to meet the limit, or bounded
        lo = topo.parse_duration(client.interval_min, "interval_min")
        hi = topo.parse_duration(client.interval_max, "interval_max")
        mean_rate = 2 / (lo + hi)
        assert mean_rate <= rate, (client.id, mean_rate, rate)
