"""Faults as values (pure): what a user asks for, checked, and the commands that apply
and remove it.

Three families, one vocabulary (``KIND [PARAMS] [--for DURATION]``):

* **network** faults run in a short-lived helper container that shares the target's
  network namespace (``network_mode=container:<id>``) and alone holds ``NET_ADMIN``:
  ``blackhole``, ``loss PERCENT``, ``reset [new|established]``, ``bandwidth RATE``,
  ``latency DELAY`` and ``jitter DELAY JITTER`` (the last two need the kernel's
  ``sch_netem``). They live in chains and a qdisc of their own, so removing them
  removes exactly them;
* **engine** faults are Docker operations: ``kill``, ``stop``, ``pause``,
  ``disconnect``;
* **application** faults switch the upstream's behaviour at run time through its control
  socket (``docker exec``; no network reaches it): ``delay DURATION``, ``close``,
  ``abort`` (a reset from the application), ``hang`` (accept, never answer) and
  ``drip BYTES INTERVAL``.

Nothing here runs a command; :mod:`labkit.faulting` does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .topology import parse_duration

Family = Literal["network", "engine", "application"]
Direction = Literal["in", "out", "both"]

NETWORK = ("blackhole", "loss", "reset", "bandwidth", "latency", "jitter")
ENGINE = ("kill", "stop", "pause", "disconnect")
APPLICATION = ("delay", "close", "abort", "hang", "drip")
KINDS = (*NETWORK, *ENGINE, *APPLICATION)
NEEDS_NETEM = ("latency", "jitter")

CHAIN_IN = "L4L-FAULT-IN"
CHAIN_OUT = "L4L-FAULT-OUT"

_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit|bps|kbps|mbps|gbps)$", re.IGNORECASE)
_PERCENT = re.compile(r"^(\d+(?:\.\d+)?)\s*%?$")
_BYTES = re.compile(r"^(\d+)$")


class FaultError(ValueError):
    """A fault asked for in a way that cannot work; the message says what to write."""


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """One fault against one target: kind, parameters (normalized), direction (network
    faults) and how long it lasts (None: until cleared)."""

    kind: str
    params: tuple[str, ...] = ()
    direction: Direction = "both"
    duration: float | None = None
    flap: float | None = None  # network faults: on and off every this many seconds

    @property
    def family(self) -> Family:
        if self.kind in NETWORK:
            return "network"
        if self.kind in ENGINE:
            return "engine"
        return "application"

    def describe(self) -> str:
        text = " ".join([self.kind, *self.params])
        if self.kind in ("blackhole", "loss", "reset"):
            text += f" ({self.direction})"
        if self.flap is not None:
            text += f" flapping every {self.flap:g}s"
        if self.duration is not None:
            text += f" for {self.duration:g}s"
        return text


def _percent(text: str) -> str:
    match = _PERCENT.match(text.strip())
    if not match or not 0 < float(match.group(1)) <= 100:
        raise FaultError(f"loss wants a percentage in (0, 100], like 10%; got {text!r}")
    return f"{float(match.group(1)):g}%"


def _rate(text: str) -> str:
    match = _RATE.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise FaultError(
            f"bandwidth wants a rate like 1mbit, 512kbit or 2mbps (tc units); got {text!r}"
        )
    return f"{match.group(1)}{match.group(2).lower()}"


def _seconds(text: str, what: str) -> float:
    try:
        seconds = parse_duration(text, what)
    except ValueError as exc:
        raise FaultError(str(exc)) from None
    if seconds <= 0:
        raise FaultError(f"{what} must be more than 0; got {text!r}")
    return seconds


def _duration(text: str, what: str) -> str:
    return f"{round(_seconds(text, what) * 1000)}ms"


def _count(expected: int, kind: str, params: list[str], usage: str) -> None:
    if len(params) != expected:
        raise FaultError(f"{kind} takes {usage}; got {' '.join(params) or 'nothing'}")


def parse_fault(
    kind: str,
    params: list[str],
    *,
    duration: str | None = None,
    direction: str = "both",
    flap: str | None = None,
) -> FaultSpec:
    """``KIND PARAMS...`` as a user writes it (``loss 20%``, ``bandwidth 1mbit``,
    ``reset established``, ``drip 16 100ms``) -> a checked :class:`FaultSpec`."""
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise FaultError(f"unknown fault {kind!r}; one of: {', '.join(KINDS)}")
    if direction not in ("in", "out", "both"):
        raise FaultError(f"direction is in, out or both; got {direction!r}")
    if direction != "both" and kind not in ("blackhole", "loss", "reset"):
        raise FaultError(f"{kind} has no direction (only blackhole, loss and reset do)")
    try:
        lasting = None if duration is None else parse_duration(duration, "--for")
    except ValueError as exc:
        raise FaultError(str(exc)) from None
    if lasting is not None and lasting <= 0:
        raise FaultError(f"--for must be more than 0; got {duration!r}")
    period = None if flap is None else _seconds(flap, "--flap")
    if period is not None and kind not in NETWORK:
        raise FaultError(f"--flap is for network faults ({', '.join(NETWORK)}), not {kind}")
    normalized: tuple[str, ...]
    if kind == "loss":
        _count(1, kind, params, "one percentage (loss 10%)")
        normalized = (_percent(params[0]),)
    elif kind == "reset":
        if len(params) > 1 or (params and params[0] not in ("new", "established")):
            raise FaultError("reset takes new (the default) or established")
        normalized = (params[0] if params else "new",)
    elif kind == "bandwidth":
        _count(1, kind, params, "one rate (bandwidth 1mbit)")
        normalized = (_rate(params[0]),)
    elif kind == "latency":
        _count(1, kind, params, "one delay (latency 100ms)")
        normalized = (_duration(params[0], "latency"),)
    elif kind == "jitter":
        _count(2, kind, params, "a delay and a jitter (jitter 100ms 20ms)")
        normalized = (_duration(params[0], "delay"), _duration(params[1], "jitter"))
    elif kind == "delay":
        _count(1, kind, params, "one duration (delay 2s)")
        normalized = (_duration(params[0], "delay"),)
    elif kind == "drip":
        _count(2, kind, params, "a byte count and an interval (drip 16 100ms)")
        if not _BYTES.match(params[0]) or int(params[0]) <= 0:
            raise FaultError(f"drip's byte count is a whole number above 0; got {params[0]!r}")
        normalized = (params[0], _duration(params[1], "drip interval"))
    else:
        _count(0, kind, params, "no parameters")
        normalized = ()
    return FaultSpec(kind, normalized, direction, lasting, period)  # type: ignore[arg-type]


# --- network faults: the commands the helper runs ----------------------------------------


def _probability(percent: str) -> str:
    return f"{float(percent.rstrip('%')) / 100:.4f}"


def _rules(spec: FaultSpec) -> list[tuple[str, list[str]]]:
    """(chain, rule) pairs for an iptables fault; loopback is never touched."""
    chains = []
    if spec.direction in ("in", "both"):
        chains.append((CHAIN_IN, "-i"))
    if spec.direction in ("out", "both"):
        chains.append((CHAIN_OUT, "-o"))
    rules: list[tuple[str, list[str]]] = []
    for chain, flag in chains:
        base = ["!", flag, "lo"]
        if spec.kind == "blackhole":
            rules.append((chain, [*base, "-j", "DROP"]))
        elif spec.kind == "loss":
            rule = ["-m", "statistic", "--mode", "random", "--probability"]
            rules.append((chain, [*base, *rule, _probability(spec.params[0]), "-j", "DROP"]))
        elif spec.kind == "reset":
            # Stateless on purpose: conntrack in a namespace may start tracking only
            # when a rule first needs it, and then not see connections already open.
            # "established": every segment with neither SYN nor RST -- the resets that
            # REJECT itself sends must get out.
            match = ["--syn"] if spec.params[0] == "new" else ["--tcp-flags", "SYN,RST", "NONE"]
            reject = ["-j", "REJECT", "--reject-with", "tcp-reset"]
            rules.append((chain, [*base, "-p", "tcp", *match, *reject]))
    return rules


def apply_commands(spec: FaultSpec, interfaces: list[str]) -> list[list[str]]:
    """What the helper runs, in order, to apply a network fault. Assumes a clean start
    (:func:`clear_commands` first)."""
    if spec.family != "network":
        raise FaultError(f"{spec.kind} is not a network fault")
    if spec.kind in ("blackhole", "loss", "reset"):
        commands = [
            ["iptables", "-w", "-N", CHAIN_IN],
            ["iptables", "-w", "-N", CHAIN_OUT],
            ["iptables", "-w", "-I", "INPUT", "1", "-j", CHAIN_IN],
            ["iptables", "-w", "-I", "OUTPUT", "1", "-j", CHAIN_OUT],
        ]
        commands += [["iptables", "-w", "-A", chain, *rule] for chain, rule in _rules(spec)]
        return commands
    commands = []
    for dev in interfaces:
        if spec.kind == "bandwidth":
            qdisc = ["tbf", "rate", spec.params[0], "burst", "32kbit", "latency", "400ms"]
        elif spec.kind == "latency":
            qdisc = ["netem", "delay", spec.params[0]]
        else:  # jitter
            qdisc = ["netem", "delay", spec.params[0], spec.params[1]]
        commands.append(["tc", "qdisc", "add", "dev", dev, "root", *qdisc])
    return commands


def clear_commands(interfaces: list[str]) -> list[list[str]]:
    """What removes every network fault this module applies (each may fail harmlessly
    when there is nothing to remove: the helper ignores those failures)."""
    commands = [
        ["iptables", "-w", "-D", "INPUT", "-j", CHAIN_IN],
        ["iptables", "-w", "-D", "OUTPUT", "-j", CHAIN_OUT],
        ["iptables", "-w", "-F", CHAIN_IN],
        ["iptables", "-w", "-F", CHAIN_OUT],
        ["iptables", "-w", "-X", CHAIN_IN],
        ["iptables", "-w", "-X", CHAIN_OUT],
    ]
    commands += [["tc", "qdisc", "del", "dev", dev, "root"] for dev in interfaces]
    return commands


def netem_missing(stderr: str) -> bool:
    """Does ``tc``'s complaint mean the kernel has no ``sch_netem``?"""
    text = stderr.lower()
    return any(
        sign in text for sign in ("qdisc kind is unknown", "unknown qdisc", "netem", "no such file")
    )
