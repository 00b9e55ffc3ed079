"""Fault values (labkit.faults): parsing what a user writes, and the commands that apply
and remove a network fault."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labkit import topology as topo
from labkit.faults import (
    CHAIN_IN,
    CHAIN_OUT,
    KINDS,
    FaultError,
    apply_commands,
    clear_commands,
    netem_missing,
    parse_fault,
)
from labkit.scenarios.reset import echo_target


@pytest.mark.parametrize(
    ("kind", "params", "expected"),
    [
        ("loss", ["20%"], ("20%",)),
        ("loss", ["7.5"], ("7.5%",)),
        ("bandwidth", ["1mbit"], ("1mbit",)),
        ("bandwidth", ["512KBit"], ("512kbit",)),
        ("reset", [], ("new",)),
        ("reset", ["established"], ("established",)),
        ("latency", ["0.1s"], ("100ms",)),
        ("jitter", ["100ms", "20ms"], ("100ms", "20ms")),
        ("delay", ["2s"], ("2000ms",)),
        ("drip", ["16", "100ms"], ("16", "100ms")),
        ("hang", [], ()),
        ("kill", [], ()),
        ("BLACKHOLE", [], ()),
    ],
)
def test_what_a_user_writes_becomes_a_checked_value(
    kind: str, params: list[str], expected: tuple[str, ...]
) -> None:
    spec = parse_fault(kind, params)
    assert (spec.kind, spec.params, spec.duration) == (kind.lower(), expected, None)


@pytest.mark.parametrize(
    ("kind", "params", "options", "said"),
    [
        ("smoke", [], {}, "unknown fault 'smoke'"),
        ("loss", [], {}, "loss takes one percentage"),
        ("loss", ["0%"], {}, "percentage in (0, 100]"),
        ("loss", ["120%"], {}, "percentage in (0, 100]"),
        ("loss", ["lots"], {}, "percentage in (0, 100]"),
        ("bandwidth", ["fast"], {}, "a rate like 1mbit"),
        ("reset", ["sometimes"], {}, "reset takes new"),
        ("drip", ["-1", "1s"], {}, "whole number above 0"),
        ("delay", ["0s"], {}, "more than 0"),
        ("hang", ["now"], {}, "hang takes no parameters"),
        ("loss", ["5%"], {"duration": "0s"}, "--for must be more than 0"),
        ("loss", ["5%"], {"direction": "sideways"}, "in, out or both"),
        ("bandwidth", ["1mbit"], {"direction": "in"}, "has no direction"),
    ],
)
def test_a_fault_that_cannot_work_is_refused_with_what_to_write(
    kind: str, params: list[str], options: dict[str, str], said: str
) -> None:
    with pytest.raises(FaultError, match=None) as caught:
        parse_fault(kind, params, **options)
    assert said in str(caught.value)


def test_a_network_fault_lives_in_chains_of_its_own_and_never_on_loopback() -> None:
    spec = parse_fault("loss", ["10%"], direction="in", duration="20s")
    commands = apply_commands(spec, ["{dev}"])
    assert commands[:4] == [
        ["iptables", "-w", "-N", CHAIN_IN],
        ["iptables", "-w", "-N", CHAIN_OUT],
        ["iptables", "-w", "-I", "INPUT", "1", "-j", CHAIN_IN],
        ["iptables", "-w", "-I", "OUTPUT", "1", "-j", CHAIN_OUT],
    ]
    (rule,) = commands[4:]  # "in" only
    assert rule[:4] == ["iptables", "-w", "-A", CHAIN_IN]
    assert rule[4:7] == ["!", "-i", "lo"]
    assert "0.1000" in rule
    assert rule[-2:] == ["-j", "DROP"]
    assert spec.describe() == "loss 10% (in) for 20s"


def test_resets_hit_new_or_established_connections_both_ways() -> None:
    new = apply_commands(parse_fault("reset", []), [])[4:]
    assert [r[3] for r in new] == [CHAIN_IN, CHAIN_OUT]
    assert all("--syn" in r and r[-3:] == ["REJECT", "--reject-with", "tcp-reset"] for r in new)
    established = apply_commands(parse_fault("reset", ["established"]), [])[4:]
    # Every segment but a SYN or a RST (the resets REJECT sends must pass OUTPUT).
    assert all(r[-7:-4] == ["--tcp-flags", "SYN,RST", "NONE"] for r in established)


def test_qdisc_faults_go_on_every_interface_and_clearing_removes_them() -> None:
    spec = parse_fault("bandwidth", ["1mbit"])
    assert apply_commands(spec, ["eth0", "eth1"]) == [
        [
            "tc",
            "qdisc",
            "add",
            "dev",
            dev,
            "root",
            "tbf",
            "rate",
            "1mbit",
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ]
        for dev in ("eth0", "eth1")
    ]
    jitter = apply_commands(parse_fault("jitter", ["100ms", "20ms"]), ["eth0"])
    assert jitter == [
        ["tc", "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "100ms", "20ms"]
    ]
    cleared = clear_commands(["eth0"])
    assert ["tc", "qdisc", "del", "dev", "eth0", "root"] in cleared
    assert ["iptables", "-w", "-X", CHAIN_IN] in cleared
    with pytest.raises(FaultError):
        apply_commands(parse_fault("hang", []), ["eth0"])


def test_netem_missing_is_recognised_from_tcs_complaint() -> None:
    assert netem_missing("Error: Specified qdisc kind is unknown.")  # this kernel
    assert netem_missing("RTNETLINK answers: No such file or directory")
    assert not netem_missing("RTNETLINK answers: Operation not permitted")


@given(st.sampled_from(KINDS), st.lists(st.text(max_size=8), max_size=3))
def test_any_input_is_a_value_or_a_fault_error(kind: str, params: list[str]) -> None:
    try:
        spec = parse_fault(kind, params)
    except FaultError as exc:
        said = str(exc)
        assert said, "a refusal says why"
        return
    assert spec.kind == kind


def test_a_network_fault_may_flap_and_nothing_else_may() -> None:
    spec = parse_fault("blackhole", [], duration="20s", flap="1.5s")
    assert (spec.flap, spec.duration) == (1.5, 20.0)
    assert spec.describe() == "blackhole (both) flapping every 1.5s for 20s"
    with pytest.raises(FaultError, match="--flap is for network faults"):
        parse_fault("hang", [], flap="1s")
    with pytest.raises(FaultError, match="--flap must be more than 0"):
        parse_fault("loss", ["5%"], flap="0s")


def test_the_echo_target_is_one_whose_transfer_clients_can_go_elsewhere() -> None:
    def layout(rules: list[dict[str, object]]) -> topo.Topology:
        return topo.parse_topology(
            {
                "upstreams": [{"name": "e1", "mode": "echo"}, {"name": "e2", "mode": "echo"}],
                "clients": [{"id": "t", "transfer_bytes": "1MiB", "transfer_time": "1s"}],
                "proxy": {"authorization": {"default": "deny", "rules": rules}},
            },
            "t",
        )

    both = layout([{"client": "t", "action": "allow", "upstream": ["e1", "e2"]}])
    config = topo.nominal_config(topo.load_reference_config(), both)
    assert echo_target(config, both) == "e2"
    one = layout([{"client": "t", "action": "allow", "upstream": "e2"}])
    assert echo_target(topo.nominal_config(topo.load_reference_config(), one), one) is None
