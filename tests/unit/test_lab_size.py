"""Labs of real size: numbered names, client containers running several identities, the
run's view of them, and the authz oracle at 24 upstreams x 200 identities (pure)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest

from l4proxy.authz import Authorizer
from l4proxy.config import parse_config
from labkit import checks as ck
from labkit import needs
from labkit import topology as topo
from labkit.certs import Certificates
from labkit.engine import ContainerSpec, Engine
from labkit.logs import (
    MIN_TAIL,
    Attempt,
    LogLine,
    TailState,
    format_ts,
    tail_reaches,
    take_new_lines,
)
from labkit.progress import Progress
from labkit.ranges import MAX_NAMES, RangeError, expand, expand_all
from labkit.run import Member, Run, brief, in_parallel
from labkit.scenarios import authz

# --- numbered names ---------------------------------------------------------------------


def test_ranges_expand_like_a_shells_braces() -> None:
    assert expand("u{1..3}", "k") == ["u1", "u2", "u3"]
    assert expand("u{01..12}", "k")[:2] == ["u01", "u02"]
    assert expand("client.{001..200}", "k")[-1] == "client.200"
    assert len(expand("client.{001..200}", "k")) == 200
    assert expand("c{8..10}.x", "k") == ["c8.x", "c9.x", "c10.x"]
    assert expand("c{0..2}", "k") == ["c0", "c1", "c2"]  # a lone 0 is no padding
    assert expand("plain", "k") == ["plain"]
    assert expand_all(["a", "b{1..2}"], "k") == ["a", "b1", "b2"]
    assert expand_all(3, "k") is None


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("u{3..1}", "backwards"),
        ("u{1..2}{1..2}", "at most one"),
        ("u{1..2}}", "stray brace"),
        ("u{a..b}", "expected a range"),
        ("u{1...3}", "expected a range"),
        (f"u{{1..{MAX_NAMES + 1}}}", "at most"),
    ],
)
def test_bad_ranges_name_the_key(pattern: str, message: str) -> None:
    with pytest.raises(RangeError, match=message) as info:
        expand(pattern, "clients[0].ids")
    assert "clients[0].ids" in str(info.value)


# --- topologies with many upstreams and shared client containers -----------------------


def _parse(**doc: Any) -> topo.Topology:
    return topo.parse_topology({"upstreams": ["u1"], **doc}, "t")


def test_upstreams_by_count_pattern_list_and_mapping() -> None:
    assert _parse(upstreams=3).upstream_names() == ["u1", "u2", "u3"]
    assert _parse(upstreams="u{01..24}").upstream_names()[::23] == ["u01", "u24"]
    layout = _parse(upstreams=["a", "b{1..2}", {"name": "e{1..2}", "mode": "echo"}])
    assert [(u.name, u.mode) for u in layout.upstreams] == [
        ("a", "reply"),
        ("b1", "reply"),
        ("b2", "reply"),
        ("e1", "echo"),
        ("e2", "echo"),
    ]


def test_ids_are_split_into_named_containers() -> None:
    layout = _parse(
        client_defaults={"interval": ["1s", "2s"]},
        clients=[
            {"ids": "client.{001..25}", "container": "pool", "per_container": 10},
            {"ids": ["ops.1", "ops.2"], "container": "ops"},
            {"ids": "svc.{1..2}"},
            {"id": "solo"},
        ],
    )
    boxes = layout.containers()
    assert [(b.name, len(b.ids)) for b in boxes] == [
        ("pool-1", 10),
        ("pool-2", 10),
        ("pool-3", 5),
        ("ops", 2),
        ("svc.1", 1),
        ("svc.2", 1),
        ("solo", 1),
    ]
    assert boxes[2].ids == [f"client.{i:03d}" for i in range(21, 26)]
    assert {c.interval_max for c in layout.clients} == {"2s"}
    assert len(layout.clients) == 30
    command = boxes[3].command("proxy:8443")
    assert command[:6] == ["--id", "ops.1", "--id", "ops.2", "--proxy", "proxy:8443"]
    assert boxes[3].cert_stems == ["ops.1", "ops.2"]
    assert boxes[6].command("p:1") == layout.client("solo").command("p:1")
    # Ten containers of 20 are numbered with two digits.
    wide = _parse(clients=[{"ids": "c{1..200}", "container": "p", "per_container": 20}])
    assert [b.name for b in wide.containers()][::9] == ["p-01", "p-10"]


def test_containers_start_and_stop_whole() -> None:
    layout = _parse(clients=[{"ids": "c{1..4}", "container": "p", "per_container": 2}])
    assert [b.name for b in layout.containers(["c3", "c4"])] == ["p-2"]
    with pytest.raises(topo.TopologyError, match="c2 would have to start or stop with"):
        layout.containers(["c1"])
    with pytest.raises(topo.TopologyError, match="no client nobody"):
        layout.containers(["nobody"])


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ([{"id": "a", "ids": "b{1..2}"}], "not both"),
        ([{"ids": "b{1..4}", "per_container": 2}], "per_container needs container"),
        ([{"id": "a", "per_container": 2}], "per_container needs ids"),
        ([{"ids": "b{1..4}", "container": "p", "per_container": 0}], "per_container"),
        ([{"ids": []}], "non-empty"),
        ([{"ids": "b{2..1}"}], "backwards"),
        (
            [{"id": "a", "container": "p"}, {"id": "b", "container": "p", "timeout": "3s"}],
            "differ in timeout",
        ),
        ([{"ids": "b{1..2}", "container": "p", "cert_stem": "server"}], "no cert_stem"),
        ([{"ids": "b{1..2}", "container": "u1"}], "taken by an upstream"),
        ([{"ids": "b{1..2}", "container": "proxy"}], "taken by an upstream or proxy"),
        ([{"id": "b1"}, {"ids": ["x", "y"], "container": "b1"}], "also an identity"),
        ([{"id": "b1", "container": "x"}, {"id": "x", "container": "y"}], "also an identity"),
        ([{"ids": "b{1..2}"}, {"id": "b2"}], "used twice: b2"),
        ([{"ids": "b{1..2}", "container": "bad name"}], "container"),
    ],
)
def test_bad_client_entries_are_refused_naming_the_key(
    clients: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(topo.TopologyError, match=message):
        _parse(clients=clients)


def test_rules_may_name_ranges() -> None:
    layout = _parse(
        upstreams="u{1..3}",
        proxy={
            "authorization": {
                "rules": [
                    {"client": "c{1..2}", "action": "deny", "upstream": "u{2..3}"},
                    {"client": ["c3", "d{1..2}"], "action": "deny", "upstream": "u1"},
                    {"client": "c4", "action": "deny", "upstream": "*"},
                ]
            }
        },
    )
    rules = layout.proxy["authorization"]["rules"]
    assert rules == [
        {"client": ["c1", "c2"], "action": "deny", "upstream": ["u2", "u3"]},
        {"client": ["c3", "d1", "d2"], "action": "deny", "upstream": "u1"},
        {"client": "c4", "action": "deny", "upstream": "*"},
    ]
    with pytest.raises(topo.TopologyError, match=r"rules\[0\]\.client"):
        _parse(proxy={"authorization": {"rules": [{"client": "c{2..1}"}]}})


def test_addresses_go_to_containers_not_identities() -> None:
    layout = topo.load_topology("large")
    boxes = [b.name for b in layout.containers()]
    got = topo.assign_addresses("10.9.0.0/24", "10.8.0.0/24", layout.upstream_names(), boxes)
    assert list(got.clients) == [f"pool-{i:02d}" for i in range(1, 11)]
    assert len(got.upstreams) == 24


def test_each_container_gets_only_its_identities_pairs() -> None:
    layout = topo.load_topology("large")
    files = {"ca.pem": b"ca", "server.pem": b"s", "server.key": b"k"}
    for client in layout.clients:
        files |= {f"{client.id}.pem": b"c", f"{client.id}.key": b"k"}
    certificates = Certificates(files)
    box = layout.containers()[1]
    given = certificates.for_clients(box.cert_stems)
    assert sorted(given) == sorted(
        ["/certs/ca.pem"]
        + [f"/certs/client.{i:03d}.{ext}" for i in range(21, 41) for ext in ("pem", "key")]
    )
    assert {mode for path, (_, mode) in given.items() if path.endswith(".key")} == {0o600}
    assert certificates.for_client(None) == certificates.for_clients([])


# --- the large topology and its rules ---------------------------------------------------


def _large() -> tuple[topo.Topology, dict[str, Any]]:
    layout = topo.load_topology("large")
    return layout, topo.nominal_config(topo.load_reference_config(), layout)


def test_the_large_topology_has_six_rule_classes_and_a_denied_one() -> None:
    layout, config = _large()
    assert (len(layout.upstreams), len(layout.clients), len(layout.containers())) == (24, 200, 10)
    allowed = needs.allowed(config, layout)
    groups = authz.classes(allowed, [c.id for c in layout.clients])
    sizes = sorted((len(g), len(allowed[g[0]])) for g in groups)
    assert sizes == [(10, 0), (10, 1), (30, 21), (30, 24), (60, 12), (60, 12)]
    assert allowed["client.151"] == {"u24"}
    assert authz.authz_needs(config, layout) == []


def test_the_lab_reads_the_rules_as_the_proxy_does_at_size() -> None:
    layout, config = _large()
    parsed = parse_config(config, Path("/certs"))
    authorizer = Authorizer(
        parsed.authorization.rules, parsed.authorization.default, parsed.upstreams
    )
    ours = needs.allowed(config, layout)
    for client in layout.clients:
        theirs = {parsed.upstreams[i].name for i in authorizer.allowed(client.id)}
        assert ours[client.id] == theirs, client.id
        single = ck.allowed_upstreams(client.id, config["upstreams"], config["authorization"])
        assert single == theirs


# --- the authz oracle: strict when small, achievable when large ---------------------------


def _attempt(client: str, upstream: str | None, ok: bool = True) -> Attempt:
    line = LogLine(client, 0, "{}", {})
    return Attempt(client, 1, "ok" if ok else "rejected", upstream, 0.0, 0.0, None, line)


def test_a_small_client_must_reach_every_allowed_upstream() -> None:
    allowed = {"a": {"u1", "u2", "u3"}, "b": set()}
    two = [_attempt("a", f"u{1 + i % 2}") for i in range(authz.ATTEMPTS)]
    denied = [_attempt("b", None, ok=False) for _ in range(authz.ATTEMPTS)]
    assert not authz.covered(two + denied, allowed, ["a", "b"])
    assert authz.covered([*two, _attempt("a", "u3"), *denied], allowed, ["a", "b"])
    assert not authz.covered([*two, _attempt("a", "u3")], allowed, ["a", "b"])  # b silent


def test_a_large_client_reaches_a_few_and_its_class_reaches_all() -> None:
    ups = {f"u{i}" for i in range(1, 7)}
    allowed = {"a": ups, "b": ups}
    a = [_attempt("a", f"u{1 + i % 3}") for i in range(authz.ATTEMPTS)]  # u1..u3
    b = [_attempt("b", f"u{4 + i % 2}") for i in range(authz.ATTEMPTS)]  # u4, u5
    assert not authz.covered(a + b, allowed, ["a", "b"])  # b reached 2 of 3; u6 by nobody
    b3 = [_attempt("b", f"u{4 + i % 3}") for i in range(authz.ATTEMPTS)]  # u4..u6
    assert authz.covered(a + b3, allowed, ["a", "b"])
    assert authz.span(["c.001", "c.002", "c.003"]) == "c.001..c.003 (3)"


def test_the_oracle_judges_200_identities_in_milliseconds() -> None:
    """At size the oracle runs every poll (0.15 s): it once took 140-440 ms a poll."""
    layout, config = _large()
    allowed = needs.allowed(config, layout)
    clients = [c.id for c in layout.clients]
    attempts = [
        _attempt(c, sorted(allowed[c])[n % len(allowed[c])] if allowed[c] else None)
        for c in clients
        for n in range(30)
    ]
    began = time.perf_counter()
    assert authz.covered(attempts, allowed, clients)
    assert time.perf_counter() - began < 0.1


# --- the run's view: identities in shared containers ----------------------------------------


class _Logs:
    """An engine that only reads logs: chunks by container id (a test may add to them),
    each read recorded with the tail it asked for."""

    def __init__(self, chunks: dict[str, str]) -> None:
        self.chunks = chunks
        self.asked: list[int | None] = []

    logs_after = Engine.logs_after  # what the run calls: the real one, over this logs()

    def logs(self, container: str, since: float | None, *, tail: int | None = None) -> str:
        assert since is None  # read by tail: a since costs the engine the whole log
        self.asked.append(tail)
        lines = self.chunks.get(container, "").splitlines(keepends=True)
        return "".join(lines if tail is None else lines[-tail:])


def _line(at: float, **record: Any) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1e9):09d}Z"
    return f"{stamp} {json.dumps({'ts': format_ts(at), **record})}\n"


def test_a_shared_containers_lines_are_filed_by_identity() -> None:
    layout = _parse(
        clients=[{"ids": "c{1..2}", "container": "p"}, {"id": "solo"}],
    )
    at = 1_700_000_000.0
    chunks = {
        "id-p": _line(at, event="started", client="c1")
        + _line(at + 0.1, event="started", client="c2")
        + _line(at + 1, event="attempt", client="c2", attempt=1, outcome="ok", upstream="u1")
        + "Traceback: not JSON\n",
        "id-solo": _line(at, event="started", client="solo"),
    }
    run = Run(cast(Engine, _Logs(chunks)), layout, Progress(quiet=True), reference={})
    for name, ids in (("p", ["c1", "c2"]), ("solo", ["solo"])):
        spec = ContainerSpec(name=name, image="i", labels={})
        run.members[name] = Member(name, "client", f"id-{name}", spec)
        run.hosts |= dict.fromkeys(ids, name)
    assert run.member_names(["c1", "c2", "solo", "proxy"]) == ["p", "solo", "proxy"]
    run.poll(["c2"])  # polls the container behind c2
    assert [line.event for line in run.lines("c2")] == ["started", "attempt"]
    assert [line.event for line in run.lines("c1")] == ["started"]
    assert len(run.lines("p")) == 4  # the container's own, the traceback too
    run.poll(["solo"])
    assert [line.event for line in run.lines("solo")] == ["started"]  # not filed twice
    assert run.client_names() == ["c1", "c2", "solo"]
    assert [(a.client, a.upstream) for a in run.attempts()] == [("c2", "u1")]
    assert run.events("c1", "started")
    run.poll()  # nothing new: nothing repeated
    assert len(run.attempts(["c2"])) == 1


def test_a_growing_log_is_read_by_its_tail_and_nothing_is_missed() -> None:
    """Each poll asks for about twice the lines the last one found, and for eight times
    more while the answer does not reach back to what was seen."""
    layout = _parse(clients=[{"id": "solo"}])
    logs = _Logs({"id-solo": ""})
    run = Run(cast(Engine, logs), layout, Progress(quiet=True), reference={})
    run.members["solo"] = Member(
        "solo", "client", "id-solo", ContainerSpec(name="solo", image="i", labels={})
    )
    at = 1_700_000_000.0
    written = 0

    def write(count: int) -> None:
        nonlocal written
        for _ in range(count):
            written += 1
            logs.chunks["id-solo"] += _line(at + written / 1000, event="n", n=written)

    write(10)
    run.poll()
    assert logs.asked == [None]  # the whole log, the first time
    write(5)
    run.poll()
    assert logs.asked[1:] == [20]  # twice the 10 the first read found
    assert run.members["solo"].state.tail() == MIN_TAIL  # 5 found: at least 16
    write(1000)  # a burst: 16 lines do not reach back, 128 neither, 1024 do
    run.poll()
    assert logs.asked[2:] == [16, 128, 1024]
    write(5)
    run.poll()
    assert logs.asked[5:] == [2000]  # twice the burst
    assert [line.record["n"] for line in run.lines("solo") if line.record] == list(
        range(1, written + 1)
    )


def test_tail_reaches_what_was_seen() -> None:
    state = TailState()
    seen = _line(1_700_000_000.0, event="a") + _line(1_700_000_001.0, event="b")
    take_new_lines(seen, "x", state)
    later = _line(1_700_000_002.0, event="c")
    assert tail_reaches(later, 5, state)  # fewer lines than asked: the whole log
    assert not tail_reaches(later, 1, state)  # one line, newer than anything seen
    assert tail_reaches(_line(1_700_000_001.0, event="b") + later, 2, state)
    assert not tail_reaches("garbage\n", 1, state)
    assert state.tail() == MIN_TAIL
    assert TailState().tail() is None


def test_work_in_parallel_keeps_the_order_and_raises_after_trying_everything() -> None:
    tried: list[int] = []

    def work(n: int) -> int:
        tried.append(n)
        if n == 3:
            raise ValueError("three")
        return n * n

    assert in_parallel(work, [1, 2, 4, 5], workers=3) == [1, 4, 16, 25]
    tried.clear()
    with pytest.raises(ValueError, match="three"):
        in_parallel(work, list(range(8)), workers=3)
    assert sorted(tried) == list(range(8))


def test_clients_dial_the_proxy_by_address_and_verify_its_name() -> None:
    box = _parse(clients=[{"ids": "c{1..2}", "container": "p"}]).containers()[0]
    command = box.command("10.0.0.10:8443", server_name="proxy")
    assert command[4:10] == [
        "--proxy",
        "10.0.0.10:8443",
        "--certs",
        "/certs",
        "--server-name",
        "proxy",
    ]


def test_brief_lists_of_names() -> None:
    assert brief(["a", "b"]) == "a, b"
    names = [f"c{i}" for i in range(1, 201)]
    assert brief(names) == "c1, c2, c3, c4, c5, ..., c200 (200 in all)"
