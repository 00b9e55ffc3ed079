"""``python lab.py fault add|list|clear``: faults on a running lab, Toxiproxy-style.

The lab is a ``python lab.py up`` run (``--run ID`` when there are several) or the
compose lab (``--compose [--project NAME]``). Network faults are helper containers
(:mod:`labkit.faulting`) labelled with the lab they belong to, so ``python lab.py down``
(and ``make down``, for the compose lab: the helpers carry the project's label)
removes them with it; an expiring fault removes itself. Application faults live in the
upstream, which expires them itself. Engine faults (kill, stop, pause, disconnect) with
``--for`` keep this command in the foreground until they are undone (Ctrl-C undoes them
early); without it, ``fault clear`` undoes kill, stop and pause.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from .compose_isolation import PROJECT_LABEL, SERVICE_LABEL, compose_services
from .engine import Engine, EngineError
from .faulting import (
    LABEL_FAULT,
    LABEL_TARGET,
    ActiveFault,
    FaultFailed,
    application_fault,
    apply_application,
    apply_network,
    clear_network,
    ctl_command,
    network_faults,
    remove_network,
)
from .faults import FaultError, FaultSpec, parse_fault
from .images import ensure_netfault
from .progress import Progress
from .run import LABEL_MODE, LABEL_NAME, LABEL_ROLE, LABEL_RUN


class NoLab(LookupError):
    """No running lab matches (or several do); the message says which to name."""


@dataclass(frozen=True, slots=True)
class Lab:
    """A running lab: its members by name (container ids), which are upstreams, the
    labels its helpers carry, and the label that finds them."""

    description: str
    members: dict[str, str]
    upstreams: list[str]
    helper_labels: dict[str, str]
    selector: str
    prefix: str  # helper container names start with this

    def container(self, target: str) -> str:
        if target not in self.members:
            raise NoLab(
                f"{self.description} has no member {target!r}; it has {', '.join(self.members)}"
            )
        return self.members[target]


def _running(engine: Engine, label: str) -> list[tuple[str, dict[str, str]]]:
    """Containers labelled ``label``, fault helpers left out."""
    return [
        (item.id, item.labels)
        for item in engine.labelled(label)
        if item.kind == "container" and LABEL_FAULT not in item.labels
    ]


def locate(engine: Engine, args: argparse.Namespace) -> Lab:
    if args.compose:
        project = args.project
        members = compose_services(engine, project, running=False)
        if not members:
            raise NoLab(f"no compose lab {project!r} is running (start it with: make up)")
        return Lab(
            f"compose project {project}",
            members,
            sorted(m for m in members if m.startswith("upstream")),
            # The project's label: `make down` finds the helpers by it and removes them
            # before the lab (`docker compose down --remove-orphans` does not).
            {PROJECT_LABEL: project, SERVICE_LABEL: "fault"},
            f"{PROJECT_LABEL}={project}",
            f"{project}-fault",
        )
    runs = {
        labels[LABEL_RUN]
        for _, labels in _running(engine, f"{LABEL_MODE}=up")
        if LABEL_RUN in labels
    }
    if args.run is not None:
        runs &= {args.run}
    if len(runs) != 1:
        which = ", ".join(sorted(runs)) or "none"
        raise NoLab(
            f"name the run with --run (running `up` runs: {which})"
            if runs
            else "no `python lab.py up` run is running (or use --compose for the compose lab)"
        )
    run = runs.pop()
    found = _running(engine, f"{LABEL_RUN}={run}")
    members = {labels.get(LABEL_NAME, cid[:12]): cid for cid, labels in found}
    upstreams = sorted(
        labels[LABEL_NAME] for _, labels in found if labels.get(LABEL_ROLE) == "upstream"
    )
    return Lab(
        f"run {run}",
        members,
        upstreams,
        {LABEL_RUN: run, LABEL_MODE: "up", LABEL_ROLE: "fault"},
        f"{LABEL_RUN}={run}",
        f"l4l-{run}-fault",
    )


def _exec(engine: Engine, container: str) -> Callable[[list[str]], tuple[int, str]]:
    return lambda command: engine.exec_run(container, command)


def _spec(args: argparse.Namespace) -> FaultSpec:
    return parse_fault(
        args.kind,
        list(args.params),
        duration=args.lasting,
        direction=args.direction,
        flap=args.flap,
    )


def _hold(engine: Engine, lab: Lab, target: str, spec: FaultSpec, progress: Progress) -> None:
    """An engine fault: do it; with --for, wait in the foreground and undo it."""
    container = lab.container(target)
    undo = {"kill": engine.start, "stop": engine.start, "pause": engine.unpause}
    if spec.kind == "disconnect":
        raise FaultError(
            "disconnect is only for scenarios here (reconnecting needs the run's addresses)"
        )
    if spec.kind == "kill":
        engine.kill(container)
    elif spec.kind == "stop":
        engine.stop(container)
    else:
        engine.pause(container)
    progress.say(f"FAULT: {spec.describe()} on {target}")
    if spec.duration is None:
        print(f"{spec.kind} {target}: done; undo it with: python lab.py fault clear {target}")
        return
    try:
        deadline = time.monotonic() + spec.duration
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 1.0))  # the fault's own duration: the user asked to wait
    finally:
        undo[spec.kind](container)
        progress.say(f"RECOVER: {spec.kind} on {target} undone")


def cmd_add(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    spec = _spec(args)
    lab = locate(engine, args)
    target = args.target
    container = lab.container(target)
    if spec.family == "engine":
        _hold(engine, lab, target, spec, progress)
        return 0
    if spec.family == "application":
        if target not in lab.upstreams:
            raise FaultError(
                f"{spec.kind} is an upstream's fault; upstreams: {', '.join(lab.upstreams)}"
            )
        active = apply_application(_exec(engine, container), target, spec)
    else:
        ensure_netfault(engine, progress)
        stamp = f"{int(time.time() * 1000) % 10**8:08d}"
        active = apply_network(
            engine,
            container,
            target,
            spec,
            labels={**lab.helper_labels, LABEL_TARGET: target},
            name=f"{lab.prefix}-{target}-{stamp}",
        )
    print(f"{active.description} on {target} ({lab.description})")
    return 0


def faults_of(engine: Engine, lab: Lab) -> list[ActiveFault]:
    found = network_faults(engine, lab.selector)
    for upstream in lab.upstreams:
        with contextlib.suppress(EngineError):
            active = application_fault(_exec(engine, lab.members[upstream]), upstream)
            if active is not None:
                found.append(active)
    for name, container in lab.members.items():
        state = engine.state(container)
        if state.get("Paused"):
            found.append(ActiveFault(name, "pause", "engine", 0.0, None))
        elif not state.get("Running") and name in lab.upstreams:
            found.append(ActiveFault(name, "kill/stop (not running)", "engine", 0.0, None))
    return found


def cmd_list(args: argparse.Namespace, engine: Engine) -> int:
    lab = locate(engine, args)
    now = time.time()
    found = faults_of(engine, lab)
    if args.json:
        print(json.dumps([f.to_json(now) for f in found], indent=2))
        return 0
    if not found:
        print(f"no fault in force ({lab.description})")
        return 0
    print(f"{'TARGET':<12} {'FAMILY':<12} {'LEFT':>8}  FAULT   ({lab.description})")
    for fault in found:
        left = fault.left(now)
        shown = "-" if left is None else f"{left:.1f}s"
        print(f"{fault.target:<12} {fault.family:<12} {shown:>8}  {fault.description}")
    return 0


def cmd_clear(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    lab = locate(engine, args)
    targets = [args.target] if args.target else list(lab.members)
    for target in targets:
        lab.container(target)
    cleared = 0
    for fault in network_faults(engine, lab.selector):
        if fault.target in targets and fault.helper is not None:
            if remove_network(engine, fault.helper) is None:
                clear_network(
                    engine, lab.members[fault.target], lab.helper_labels, f"{lab.prefix}-clear"
                )
            progress.say(f"removed {fault.description} from {fault.target}")
            cleared += 1
    for upstream in (u for u in lab.upstreams if u in targets):
        container = lab.members[upstream]
        if application_fault(_exec(engine, container), upstream) is not None:
            engine.exec_run(container, ctl_command(None, "clear"))
            progress.say(f"cleared the application fault of {upstream}")
            cleared += 1
    for target in targets:
        state = engine.state(lab.members[target])
        if state.get("Paused"):
            engine.unpause(lab.members[target])
        elif not state.get("Running") and target in lab.upstreams:
            engine.start(lab.members[target])
        else:
            continue
        progress.say(f"{target} running again")
        cleared += 1
    print(f"cleared {cleared} fault(s) ({lab.description})")
    return 0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fault = sub.add_parser("fault", help="faults on a running lab (python lab.py up, or --compose)")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--run", help="the `up` run (when several are running)")
    where.add_argument("--compose", action="store_true", help="the compose lab (make up)")
    where.add_argument("--project", default="layer4lab", help="its compose project")
    fsub = fault.add_subparsers(dest="fault_command", required=True, metavar="add|list|clear")
    add = fsub.add_parser("add", parents=[where], help="apply a fault to a member")
    add.add_argument("target", help="a member: u1, proxy, client.a (compose: upstream1, ...)")
    add.add_argument(
        "kind",
        help="blackhole|loss|reset|bandwidth|latency|jitter|kill|stop|pause|delay|close|abort|hang|drip",
    )
    add.add_argument(
        "params", nargs="*", help="e.g. 20%% (loss), 1mbit (bandwidth), 16 100ms (drip)"
    )
    add.add_argument("--for", dest="lasting", metavar="DURATION", help="remove it after this long")
    add.add_argument("--flap", metavar="PERIOD", help="network faults: off and on every PERIOD")
    add.add_argument(
        "--direction", default="both", choices=["in", "out", "both"], help="blackhole, loss, reset"
    )
    lst = fsub.add_parser("list", parents=[where], help="the faults in force and their time left")
    lst.add_argument("--json", action="store_true")
    clr = fsub.add_parser("clear", parents=[where], help="remove the faults (of one target)")
    clr.add_argument("target", nargs="?")


def main(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    try:
        if args.fault_command == "add":
            return cmd_add(args, engine, progress)
        if args.fault_command == "list":
            return cmd_list(args, engine)
        return cmd_clear(args, engine, progress)
    except (FaultError, NoLab) as exc:
        print(f"lab fault: {exc}", file=sys.stderr)
        return 2
    except FaultFailed as exc:
        print(f"lab fault: {exc}", file=sys.stderr)
        return 1
