"""The isolation scenario's verdicts (pure): probe results and log records in, checks out."""

from __future__ import annotations

import json

import pytest

from labkit.isolation import (
    Holder,
    Probe,
    forged_identity,
    judge_client,
    judge_forgery,
    judge_holder,
    judge_unreached,
    probe_command,
    served_as_ruled,
)
from labkit.logs import Attempt, LogLine

UPSTREAMS = ["u1", "u2"]


def probe(
    resolve: dict[str, list[str] | None] | None = None,
    connect: dict[str, dict[str, object]] | None = None,
    keys: tuple[str, ...] = ("/certs/client.a.key",),
) -> Probe:
    output = json.dumps(
        {
            "resolve": resolve if resolve is not None else {"u1": None, "u2": None},
            "connect": connect
            if connect is not None
            else {"10.0.1.20:8000": {"connected": False, "error": "TimeoutError: timed out"}},
            "keys": {k: "(the PEM text the probe read)" for k in keys},
            "unreadable": [],
        }
    )
    return Probe.parse("client.a", "some noise\n" + output + "\n")


def test_an_isolated_client_passes() -> None:
    checks = judge_client(probe(), "/certs/client.a.key", UPSTREAMS)
    assert [c.passed for c in checks] == [True, True, True]


def test_a_resolving_name_an_answering_upstream_or_another_key_fail() -> None:
    resolved = judge_client(probe(resolve={"u1": ["10.0.1.20"]}), "/certs/client.a.key", UPSTREAMS)
    assert [c.passed for c in resolved] == [False, True, True]
    assert "10.0.1.20" in resolved[0].detail
    reached = {"10.0.1.20:8000": {"connected": True, "reply": "Reply from upstream u1"}}
    connected = judge_client(probe(connect=reached), "/certs/client.a.key", UPSTREAMS)
    assert [c.passed for c in connected] == [True, False, True]
    keys = ("/certs/client.a.key", "/certs/ca.key")
    leaked = judge_client(probe(keys=keys), "/certs/client.a.key", UPSTREAMS)
    assert [c.passed for c in leaked] == [True, True, False]
    assert "/certs/ca.key" in leaked[2].detail


def test_the_metrics_listener_must_neither_resolve_nor_answer() -> None:
    what = "proxy-metrics, 10.0.9.2:9101"
    closed = {"10.0.9.2:9101": {"connected": False, "error": "OSError: unreachable"}}
    quiet = judge_unreached(probe(resolve={"proxy-metrics": None}, connect=closed), what)
    assert quiet.passed
    assert quiet.name == "client.a: proxy-metrics, 10.0.9.2:9101 neither resolves nor answers"
    named = judge_unreached(probe(resolve={"proxy-metrics": ["10.0.9.2"]}, connect=closed), what)
    assert not named.passed
    assert "10.0.9.2" in named.detail
    answered: dict[str, dict[str, object]] = {"10.0.9.2:9101": {"connected": True}}
    reached = judge_unreached(probe(resolve={"proxy-metrics": None}, connect=answered), what)
    assert not reached.passed


def test_a_client_without_a_certificate_may_read_no_key_at_all() -> None:
    assert judge_client(probe(keys=()), None, UPSTREAMS)[2].passed
    assert not judge_client(probe(), None, UPSTREAMS)[2].passed
    # ... and a client whose own key is missing is wrong too.
    assert not judge_client(probe(keys=()), "/certs/client.a.key", UPSTREAMS)[2].passed


def test_a_container_of_several_identities_may_read_theirs_and_no_other() -> None:
    holder = Holder("pool-1", "client.01", "client.01", ("client.02", "client.03"))
    assert holder.identities == ("client.01", "client.02", "client.03")
    assert holder.keys == [f"/certs/client.0{i}.key" for i in (1, 2, 3)]
    assert Holder("p", "c.1", None, ("c.2",)).keys == []  # --no-cert: none of them has one
    theirs = probe(keys=tuple(holder.keys))
    checks = judge_client(theirs, holder.keys, UPSTREAMS)
    assert checks[2].passed
    assert checks[2].name.endswith("its 3 identities' own")
    fewer = judge_client(probe(keys=tuple(holder.keys[:2])), holder.keys, UPSTREAMS)
    assert not fewer[2].passed  # one pair missing
    more = judge_client(probe(keys=(*holder.keys, "/certs/client.04.key")), holder.keys, UPSTREAMS)
    assert not more[2].passed  # a fourth identity's key: not its own
    assert "client.04" in more[2].detail


def test_the_proxy_may_hold_its_key_but_never_the_ca_key() -> None:
    own = {"/certs/server.key"}
    assert judge_holder(probe(keys=("/certs/server.key",)), own, "own key only").passed
    assert not judge_holder(probe(keys=("/certs/server.key", "/x/ca.key")), own, "x").passed


def test_a_probe_without_output_is_an_error_naming_the_container() -> None:
    with pytest.raises(ValueError, match=r"the probe in client\.a printed no result"):
        Probe.parse("client.a", "Traceback ...\n")


def record(peer: str, outcome: str, identity: str | None = None) -> dict[str, object]:
    return {"event": "connection", "peer": peer, "outcome": outcome, "identity": identity}


def test_a_forged_header_must_be_refused_and_never_believed() -> None:
    refused = [record("10.0.1.20:4000", "untrusted_proxy"), record("10.0.1.10:5", "replied", "c")]
    assert judge_forgery("10.0.1.20", "client.b", "u2", refused).passed
    believed = [record("10.0.1.20:4000", "replied", "client.b")]
    assert not judge_forgery("10.0.1.20", "client.b", "u2", believed).passed
    # Nothing arrived from the forger: the probe did not happen, which proves nothing.
    assert not judge_forgery("10.0.1.20", "client.b", "u2", refused[1:]).passed


def test_forged_identities_are_another_clients() -> None:
    assert forged_identity(["client.a", "client.b"], "client.a") == "client.b"
    assert forged_identity(["client.a"], "client.a") == "client.forged"


def test_the_probe_command_carries_its_spec() -> None:
    command = probe_command(["u1"], ["u1:8000"], forge="client.b", keys=False)
    assert command[:2] == ["python3", "-c"]
    assert json.loads(command[3]) == {
        "names": ["u1"],
        "addresses": ["u1:8000"],
        "forge": "client.b",
        "keys": False,
        "timeout": 1.5,
    }


def attempt(client: str, outcome: str, upstream: str | None) -> Attempt:
    line = LogLine(client, 0, "{}", {})
    return Attempt(client, 1, outcome, upstream, 0.0, 0.0, None, line)


def test_clients_are_judged_by_their_rules_after_the_probes() -> None:
    rules = {"svc-1": {"alpha"}, "svc-x": set()}
    assert served_as_ruled([attempt("svc-1", "ok", "alpha")], rules) is None  # svc-x unseen
    both = [attempt("svc-1", "ok", "alpha"), attempt("svc-x", "rejected", None)]
    assert served_as_ruled(both, rules) == [
        "svc-1: reply from alpha",
        "svc-x: refused (rejected), as its rules say",
    ]
    wrong = [attempt("svc-1", "ok", "beta"), attempt("svc-x", "rejected", None)]
    assert served_as_ruled(wrong, rules) is None  # a reply from a denied upstream is none
