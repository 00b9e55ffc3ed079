"""Applying and removing faults on running containers, through the Docker SDK only.

* A **network** fault is a helper container (``layer4lab/netfault``: the base image
  plus Debian's ``iproute2`` and ``iptables``) that joins the target's network namespace
  (``network_mode=container:<id>``), holds ``NET_ADMIN`` and nothing else, applies the
  rules, and lives exactly as long as the fault: it removes them when its time is up or
  when it is stopped (SIGTERM), then exits. So ``fault list`` is a list of helpers,
  and an expired fault needs nobody to remember it.
* An **application** fault is a request on the upstream's control socket, through
  ``docker exec ... python3 -m upstream.ctl`` (the upstream expires it itself).
* **Engine** faults (kill, stop, pause, disconnect) are the engine's own operations;
  :class:`~labkit.run.Run` has them.

Every helper carries the labels of what it belongs to (a run's, or a compose
project's), the target, the fault and when it expires; whatever removes those removes
the helpers too, and :func:`clear_network` removes a target's rules even if a helper
was killed before it could.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .engine import ContainerSpec, Engine, EngineError, EngineNotFound
from .faults import FaultSpec, apply_commands, clear_commands, netem_missing
from .images import NETFAULT_IMAGE
from .logs import format_ts

LABEL_FAULT = "layer4lab.fault"  # the fault's description (kind and parameters)
LABEL_TARGET = "layer4lab.fault.target"  # the target's name as the user wrote it
LABEL_TARGET_ID = "layer4lab.fault.target-id"
LABEL_EXPIRES = "layer4lab.fault.expires"  # epoch seconds, or "" for "until cleared"
UPSTREAM_CTL = ["python3", "-m", "upstream.ctl"]
APPLY_TIMEOUT = 15.0
CLEAR_TIMEOUT = 10.0
DEVICE = "{dev}"  # stands for each of the target's interfaces in a command

# The helper program (python3 in the helper image; runs as root with NET_ADMIN only).
# argv[1]: {"apply": [[...]], "clear": [[...]], "for": seconds | null, "period": seconds
# | null}. It removes any earlier rules of ours, applies, says so, waits for its time or
# SIGTERM/SIGINT (with a period: removing and re-applying the rules every period, saying
# "flap" each time), removes them, says so. Each line has "began" (before the commands
# ran) and "ts" (after): the change took effect in between. The signals are blocked and waited for,
# which works for PID 1 too.
HELPER_SCRIPT = r"""
import json, signal, subprocess, sys, time
spec = json.loads(sys.argv[1])
def say(event, **fields):
    print(json.dumps({"ts": time.time(), "event": event, **fields}), flush=True)
def devices():
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ": " in line]
    return [name for name in names if name != "lo"]
def expand(commands, devs):
    out = []
    for command in commands:
        if "{dev}" in command:
            out += [[dev if arg == "{dev}" else arg for arg in command] for dev in devs]
        else:
            out.append(command)
    return out
def run(command):
    done = subprocess.run(command, capture_output=True, text=True)
    return done.returncode, done.stderr.strip()
wanted = {signal.SIGTERM, signal.SIGINT}
signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
devs = devices()
for command in expand(spec["clear"], devs):
    run(command)
began = time.time()
for command in expand(spec["apply"], devs):
    code, err = run(command)
    if code:
        say("fault_error", command=" ".join(command), stderr=err)
        for undo in expand(spec["clear"], devs):
            run(undo)
        sys.exit(3)
say("fault_applied", devices=devs, began=began, fault=spec.get("fault"), target=spec.get("target"))
started = time.monotonic()
period = spec.get("period")
def wait(seconds):
    if seconds is None:
        return signal.sigwait(wanted)
    return signal.sigtimedwait(wanted, max(0.0, seconds))
def left():
    return None if spec["for"] is None else spec["for"] - (time.monotonic() - started)
got = None
if period is None:
    got = wait(left())
else:
    on = True
    while True:
        remaining = left()
        step = period if remaining is None else min(period, remaining)
        got = wait(step)
        if got is not None or (remaining is not None and remaining <= period):
            break
        began = time.time()
        for command in expand(spec["clear"] if on else spec["apply"], devs):
            run(command)
        on = not on
        say("flap", state="on" if on else "off", began=began)
began = time.time()
for command in expand(spec["clear"], devs):
    run(command)
say(
    "fault_cleared",
    reason="expired" if got is None else "stopped",
    began=began,
    fault=spec.get("fault"),
    target=spec.get("target"),
)
"""


class FaultFailed(RuntimeError):
    """A fault could not be applied (the message says why; nothing is left applied)."""


class NetemMissing(FaultFailed):
    """This kernel has no ``sch_netem``: latency and jitter cannot be applied here."""


@dataclass(frozen=True, slots=True)
class ActiveFault:
    """A fault in force: who applied it (a helper container, or an upstream's own
    switch), on what, and until when (None: until cleared)."""

    target: str
    description: str
    family: str
    applied: float
    expires: float | None
    helper: str | None = None  # the helper container's id (network faults)
    kind: str = ""  # the fault's kind (kill, loss, hang, ...)

    def left(self, now: float) -> float | None:
        return None if self.expires is None else max(0.0, self.expires - now)

    def to_json(self, now: float) -> dict[str, Any]:
        left = self.left(now)
        return {
            "target": self.target,
            "fault": self.description,
            "family": self.family,
            "applied": format_ts(self.applied),
            "left_s": None if left is None else round(left, 1),
        }


def helper_lines(engine: Engine, helper: str) -> list[dict[str, Any]]:
    found = []
    for line in engine.logs(helper, None).splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line.split(" ", 1)[1] if line[:4].isdigit() else line)
            if isinstance(record, dict):
                found.append(record)
    return found


def _wait_event(
    engine: Engine, helper: str, events: tuple[str, ...], timeout: float
) -> dict[str, Any] | None:
    """The helper's first line whose event is one of ``events``; None if it exited
    without one or the deadline passed."""
    deadline = time.monotonic() + timeout
    while True:
        for record in helper_lines(engine, helper):
            if record.get("event") in events:
                return record
        running = bool(engine.state(helper).get("Running"))
        if not running or time.monotonic() >= deadline:
            # One last read: it may have said it just before exiting.
            for record in helper_lines(engine, helper):
                if record.get("event") in events:
                    return record
            return None
        time.sleep(0.1)


def helper_spec(
    target_id: str, command: list[str], labels: Mapping[str, str], name: str
) -> ContainerSpec:
    """A container of the helper image in ``target_id``'s network namespace, with
    ``NET_ADMIN`` and no other capability."""
    return ContainerSpec(
        name=name,
        image=NETFAULT_IMAGE,
        labels=dict(labels),
        command=command,
        network_mode=f"container:{target_id}",
        cap_drop=["ALL"],
        cap_add=["NET_ADMIN"],
    )


def apply_network(
    engine: Engine,
    target_id: str,
    target: str,
    spec: FaultSpec,
    *,
    labels: Mapping[str, str],
    name: str,
) -> ActiveFault:
    """Start a helper in ``target_id``'s network namespace and wait until it says the
    fault is applied. FaultFailed (NetemMissing for netem) with the reason otherwise;
    the failed helper is removed."""
    now = time.time()
    expires = None if spec.duration is None else now + spec.duration
    program = {
        "apply": apply_commands(spec, [DEVICE]),
        "clear": clear_commands([DEVICE]),
        "for": spec.duration,
        "period": spec.flap,
        "fault": spec.describe(),  # said in its lines, for a reader of its log alone
        "target": target,
    }
    labelled = {
        **labels,
        LABEL_FAULT: spec.describe(),
        LABEL_TARGET: target,
        LABEL_TARGET_ID: target_id,
        LABEL_EXPIRES: "" if expires is None else f"{expires:.3f}",
    }
    command = ["python3", "-c", HELPER_SCRIPT, json.dumps(program)]
    helper = engine.create_container(helper_spec(target_id, command, labelled, name))
    engine.start(helper)
    said = _wait_event(engine, helper, ("fault_applied", "fault_error"), APPLY_TIMEOUT)
    if said is None or said.get("event") != "fault_applied":
        with contextlib.suppress(EngineError):
            engine.remove_container(helper)
        why = (
            f"{said.get('command')}: {said.get('stderr')}"
            if said
            else "the helper said nothing in time"
        )
        if said and spec.kind in ("latency", "jitter") and netem_missing(str(said.get("stderr"))):
            raise NetemMissing(
                f"{spec.kind} needs the kernel's sch_netem qdisc, which this kernel lacks ({why})"
            )
        raise FaultFailed(f"{spec.describe()} on {target} could not be applied: {why}")
    # The helper's clock: it began changing the rules at "began" (the fault may take
    # effect from then on) and was done at "ts".
    applied = float(said.get("began") or said.get("ts") or now)
    return ActiveFault(target, spec.describe(), "network", applied, expires, helper, spec.kind)


def remove_network(engine: Engine, helper: str) -> list[dict[str, Any]] | None:
    """Stop a helper (it removes its rules, then exits) and remove it. Returns what it
    said, ending with its ``fault_cleared`` line (``reason`` expired or stopped, ``ts``
    when), or None if it could not say so (then :func:`clear_network` is the fallback)."""
    with contextlib.suppress(EngineError):
        engine.kill(helper, "SIGTERM")
    said = None
    lines: list[dict[str, Any]] = []
    with contextlib.suppress(EngineNotFound):
        said = _wait_event(engine, helper, ("fault_cleared",), CLEAR_TIMEOUT)
        lines = helper_lines(engine, helper)
    with contextlib.suppress(EngineError):
        engine.remove_container(helper)
    return None if said is None else lines


def clear_network(engine: Engine, target_id: str, labels: Mapping[str, str], name: str) -> bool:
    """Remove every network fault of ours from ``target_id``'s namespace, whoever applied
    it (a helper that runs the clearing commands only). True if it ran to the end."""
    program = {"apply": [], "clear": clear_commands([DEVICE]), "for": 0.001}
    command = ["python3", "-c", HELPER_SCRIPT, json.dumps(program)]
    helper = engine.create_container(helper_spec(target_id, command, labels, name))
    try:
        engine.start(helper)
        return _wait_event(engine, helper, ("fault_cleared",), CLEAR_TIMEOUT) is not None
    finally:
        with contextlib.suppress(EngineError):
            engine.remove_container(helper)


def network_faults(engine: Engine, label: str) -> list[ActiveFault]:
    """The network faults in force among the helpers labelled ``label``."""
    found = []
    for item in engine.labelled(label):
        if item.kind != "container" or LABEL_FAULT not in item.labels or item.state != "running":
            continue
        expires = item.labels.get(LABEL_EXPIRES) or None
        found.append(
            ActiveFault(
                item.labels.get(LABEL_TARGET, "?"),
                item.labels[LABEL_FAULT],
                "network",
                0.0,
                None if expires is None else float(expires),
                item.id,
            )
        )
    return found


def ctl_command(spec: FaultSpec | None, op: str = "set") -> list[str]:
    """The ``upstream.ctl`` command line for an application fault (or clear/show)."""
    if spec is None or op != "set":
        return [*UPSTREAM_CTL, op]
    command = [*UPSTREAM_CTL, "set", spec.kind, *spec.params]
    if spec.duration is not None:
        command += ["--for", f"{spec.duration:g}s"]
    return command


def _ctl_answer(out: str) -> dict[str, Any]:
    """``upstream.ctl``'s answer: the JSON object on its last line ({} if none)."""
    try:
        answer = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {}
    return answer if isinstance(answer, dict) else {}


def apply_application(
    exec_in: Callable[[list[str]], tuple[int, str]], target: str, spec: FaultSpec
) -> ActiveFault:
    """Switch an application fault on in an upstream (through ``exec_in``, which runs a
    command in it)."""
    now = time.time()
    code, out = exec_in(ctl_command(spec))
    if code != 0:
        raise FaultFailed(f"{spec.describe()} on {target}: upstream.ctl said {out.strip()}")
    took_effect = _ctl_answer(out).get("ts")
    if isinstance(took_effect, int | float):
        now = float(took_effect)  # the upstream's clock: when it took effect
    expires = None if spec.duration is None else now + spec.duration
    return ActiveFault(target, spec.describe(), "application", now, expires, kind=spec.kind)


def application_fault(
    exec_in: Callable[[list[str]], tuple[int, str]], target: str
) -> ActiveFault | None:
    """The application fault in force in an upstream, if any (``upstream.ctl show``)."""
    code, out = exec_in(ctl_command(None, "show"))
    if code != 0:
        return None
    answer = _ctl_answer(out)
    fault = answer.get("fault")
    if not isinstance(fault, dict) or not fault:
        return None
    now = time.time()
    left = answer.get("left_s")
    params = [f"{k}={v}" for k, v in fault.items() if k != "kind"]
    return ActiveFault(
        target,
        " ".join([str(fault["kind"]), *params]),
        "application",
        now,
        None if left is None else now + float(left),
        kind=str(fault["kind"]),
    )
