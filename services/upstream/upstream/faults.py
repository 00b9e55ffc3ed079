"""Run-time faults of the upstream (pure): what the control socket may switch on, and
which one is in force at a given moment. No I/O and no clock here: ``now`` is passed in.

A fault is switched on with a JSON line on the control socket (``python3 -m
upstream.ctl``), optionally for a while, and applies to connections whose response
starts while it is in force:

* ``delay D``: wait D more before responding (on top of ``--delay``);
* ``close``: close instead of responding (FIN); ``abort``: reset instead (RST);
* ``hang``: never respond; the bytes the peer sends are read and dropped, so its own
  close or the idle timeout ends the connection (``fault_hang``);
* ``drip N I``: send the response N bytes at a time, one piece every I seconds.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .config import ConfigError, parse_duration

Kind = Literal["delay", "close", "abort", "hang", "drip"]
KINDS: tuple[Kind, ...] = get_args(Kind)
MAX_SECONDS = 24 * 3600.0  # any duration here (delay, interval, --for) stays below a day
MAX_LINE = 4096  # a control request is one JSON line at most this long


class RequestError(ValueError):
    """A control request that cannot be carried out; the message says why."""


def parse_seconds(text: object, what: str) -> float:
    """``250ms``, ``2s``, ``1.5m`` or a plain number of seconds -> seconds, in (0, a day]."""
    if isinstance(text, bool):
        raise RequestError(f"{what}: a duration like 250ms or 2s, not {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        try:
            seconds = parse_duration(str(text), what, allow_zero=True)  # 0: refused below
        except ConfigError as exc:
            raise RequestError(str(exc)) from None
    if not math.isfinite(seconds) or not 0 < seconds <= MAX_SECONDS:
        raise RequestError(f"{what}: more than 0 and at most a day, not {text!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Fault:
    kind: Kind
    delay: float = 0.0  # delay: the extra wait
    drip_bytes: int = 0  # drip: bytes per piece
    drip_interval: float = 0.0  # drip: seconds between pieces
    until: float | None = None  # monotonic deadline; None = until cleared

    def describe(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"kind": self.kind}
        if self.kind == "delay":
            fields["delay_ms"] = round(self.delay * 1000, 3)
        if self.kind == "drip":
            fields["drip_bytes"] = self.drip_bytes
            fields["drip_interval_ms"] = round(self.drip_interval * 1000, 3)
        return fields


def make_fault(kind: str, params: list[Any], *, lasting: float | None, now: float) -> Fault:
    """A checked :class:`Fault` from a request's ``fault``, ``params`` and ``for``."""
    if kind not in KINDS:
        raise RequestError(f"fault: one of {', '.join(KINDS)}, not {kind!r}")
    until = None if lasting is None else now + lasting
    wanted = {"delay": 1, "drip": 2}.get(kind, 0)
    if len(params) != wanted:
        raise RequestError(f"{kind} takes {wanted} parameter(s), got {len(params)}")
    if kind == "delay":
        return Fault("delay", delay=parse_seconds(params[0], "delay"), until=until)
    if kind == "drip":
        count = params[0]
        if isinstance(count, str) and count.isascii() and count.isdigit():
            count = int(count)
        if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= 1 << 20:
            raise RequestError(f"drip: bytes per piece in 1..1048576, not {params[0]!r}")
        interval = parse_seconds(params[1], "drip interval")
        return Fault("drip", drip_bytes=count, drip_interval=interval, until=until)
    return Fault(kind, until=until)


@dataclass(frozen=True, slots=True)
class Request:
    op: Literal["set", "clear", "show"]
    fault: Fault | None = None


def parse_request(line: bytes, now: float) -> Request:
    """One control line: ``{"op": "set", "fault": "drip", "params": [16, "100ms"],
    "for": "10s"}``, ``{"op": "clear"}`` or ``{"op": "show"}``."""
    if len(line) > MAX_LINE:
        raise RequestError(f"a request is one line of at most {MAX_LINE} bytes")
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise RequestError("a request is one JSON object on one line") from None
    if not isinstance(value, dict):
        raise RequestError("a request is one JSON object on one line")
    op = value.get("op")
    if op in ("clear", "show"):
        return Request(op)
    if op != "set":
        raise RequestError(f"op: set, clear or show, not {op!r}")
    params = value.get("params", [])
    if not isinstance(params, list):
        raise RequestError("params: a list")
    lasting = value.get("for")
    seconds = None if lasting is None else parse_seconds(lasting, "for")
    return Request("set", make_fault(str(value.get("fault")), params, lasting=seconds, now=now))


class FaultSwitch:
    """The fault in force, if any. :meth:`active` forgets one whose time is up."""

    def __init__(self) -> None:
        self.fault: Fault | None = None

    def set(self, fault: Fault) -> None:
        self.fault = fault

    def clear(self) -> Fault | None:
        cleared, self.fault = self.fault, None
        return cleared

    def active(self, now: float) -> Fault | None:
        fault = self.fault
        if fault is not None and fault.until is not None and now >= fault.until:
            self.fault = None
            return None
        return fault

    def state(self, now: float) -> dict[str, Any]:
        """What ``show`` answers: the fault in force and how long it has left."""
        fault = self.active(now)
        if fault is None:
            return {"fault": None}
        left = None if fault.until is None else round(max(0.0, fault.until - now), 3)
        return {"fault": fault.describe(), "left_s": left}
