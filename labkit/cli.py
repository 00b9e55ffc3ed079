"""``python lab.py ...``: the command line of the containerized lab.

    python lab.py list                          scenarios and topologies
    python lab.py scenario NAME|all [--keep] [--json] [--report DIR] [--rebuild]
    python lab.py scenario isolation --compose [--project NAME]   against `make up`
    python lab.py up [--topology NAME]          start a topology and leave it running
    python lab.py down [--run ID]               remove what `up` started
    python lab.py clean                         remove everything any run labelled
    python lab.py fault add TARGET KIND [PARAMS] [--for D] | list | clear [TARGET]
                                                faults on a running lab (up or --compose)
    python lab.py scenario scale                swarm stack, upstreams 3 -> 8 -> 2
    python lab.py swarm up|down|status          the compose lab as a swarm stack
    python lab.py watch [--run ID|--compose] [--once]   a live view of a running lab

Exit status: 0 passed / done, 1 a scenario failed, 2 bad usage or topology, 3 the
engine or the images are unavailable, 130 interrupted (after cleaning up).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from . import fault_cli, swarm_cli, watch
from . import topology as topo
from .compose_isolation import isolation_on_compose
from .engine import Engine, EngineError, EngineUnavailable
from .images import ImageError, ensure_images, image_tag
from .progress import Progress
from .result import ScenarioResult
from .run import (
    LABEL_MODE,
    LABEL_RUN,
    LabError,
    Run,
    new_run_id,
    remove_labelled,
    terminate_as_interrupt,
)
from .scenarios import SCENARIOS, ScenarioUnfit, missing, run_scenario, scale
from .swarm import at_risk_message, names_at_risk

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENGINE = 3
EXIT_INTERRUPTED = 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python lab.py",
        description="layer4lab's containerized lab (Docker SDK): topologies, faults, verdicts.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("list", help="list the scenarios and topologies")
    sc = sub.add_parser("scenario", help="run a scenario (or 'all') and print its verdicts")
    sc.add_argument(
        "name",
        choices=[*SCENARIOS, scale.NAME, "all"],
        metavar="NAME",
        help="|".join([*SCENARIOS, scale.NAME, "all"])
        + " (all: every scenario on one engine; scale runs alone: it makes the engine a "
        "swarm node for the run)",
    )
    sc.add_argument("--keep", action="store_true", help="leave the containers running afterwards")
    sc.add_argument("--json", action="store_true", help="print the verdicts as JSON on stdout")
    sc.add_argument(
        "--report", type=Path, metavar="DIR", help="write a report per scenario into DIR"
    )
    sc.add_argument("--rebuild", action="store_true", help="rebuild the service images first")
    sc.add_argument(
        "--topology",
        metavar="NAME|FILE",
        help="run on this topology (a name in lab/topologies or a YAML file) instead of the "
        "scenario's own; exit 2, naming what is missing, if it lacks what the scenario needs",
    )
    sc.add_argument(
        "--compose",
        action="store_true",
        help="isolation only: probe the running compose lab (make up) instead of a new run",
    )
    sc.add_argument(
        "--project",
        default="layer4lab",
        metavar="NAME",
        help="the compose project for --compose (default layer4lab)",
    )
    up = sub.add_parser("up", help="start a topology and leave it running")
    up.add_argument(
        "--topology", default="default", help="a file in lab/topologies (default: default)"
    )
    up.add_argument("--rebuild", action="store_true", help="rebuild the service images first")
    down = sub.add_parser("down", help="remove what `up` started")
    down.add_argument("--run", help="only this run id (default: every `up` run)")
    sub.add_parser("clean", help="remove every container, network and volume labelled by a run")
    fault_cli.add_parser(sub)
    swarm_cli.add_parser(sub)
    watch.add_parser(sub)
    return p


def render(result: ScenarioResult, stream: TextIO) -> None:
    """The verdict table of one scenario; evidence under each failed check."""
    state = "PASS" if result.passed else ("INTERRUPTED" if result.interrupted else "FAIL")
    print(
        f"\n== {result.scenario} (run {result.run_id}, topology {result.topology}): "
        f"{state} in {result.duration:.1f}s",
        file=stream,
    )
    for item in result.checks:
        mark = "PASS" if item.passed else "FAIL"
        print(f"  {mark}  {item.name}", file=stream)
        print(f"        {item.detail}", file=stream)
        if not item.passed:
            for line in item.evidence:
                print(f"        | {line}", file=stream)
    if not result.checks:
        print("  (no check ran)", file=stream)
    if result.report_dir is not None:
        print(f"  report: {result.report_dir}", file=stream)
    stream.flush()


def render_summary(results: Sequence[ScenarioResult], wall: float, stream: TextIO) -> None:
    print("\nSCENARIO    RESULT  TIME     CHECKS", file=stream)
    for r in results:
        passed = sum(1 for c in r.checks if c.passed)
        state = "PASS" if r.passed else "FAIL"
        print(
            f"{r.scenario:<11} {state:<7} {r.duration:6.1f}s  {passed}/{len(r.checks)}", file=stream
        )
    ok = sum(1 for r in results if r.passed)
    print(f"all: {ok}/{len(results)} scenarios passed in {wall:.1f}s", file=stream)
    stream.flush()


def cmd_list() -> int:
    print("scenarios:")
    for s in SCENARIOS.values():
        print(f"  {s.name:<10} {s.summary} (topology {s.topology})")
    print("topologies (lab/topologies/*.yaml):")
    for name in topo.list_topologies():
        try:
            description = topo.load_topology(name).description
        except topo.TopologyError as exc:
            description = f"INVALID: {exc}"
        print(f"  {name:<10} {description}")
    return 0


def cmd_scenario(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    if args.compose:
        if args.name != "isolation":
            print("lab.py: --compose runs the isolation scenario only", file=sys.stderr)
            return EXIT_USAGE
        result = isolation_on_compose(engine, args.project, progress)
        render(result, sys.stderr if args.json else sys.stdout)
        if args.json:
            print(json.dumps(result.to_json(), indent=2))
        return 0 if result.passed else EXIT_FAILED
    if args.name == scale.NAME:
        return cmd_scale(args, engine, progress)
    names = list(SCENARIOS) if args.name == "all" else [args.name]
    reference = topo.load_reference_config()
    for name in names:  # fail before starting anything if a topology is broken or unfit
        layout = topo.load_topology(args.topology or SCENARIOS[name].topology)
        lacking = missing(name, topo.nominal_config(reference, layout), layout)
        if lacking:
            print(str(ScenarioUnfit(name, layout.name, lacking)), file=sys.stderr)
            return EXIT_USAGE
    ensure_images(engine, progress, rebuild=args.rebuild)
    table = sys.stderr if args.json else sys.stdout
    results: list[ScenarioResult] = []
    began = time.monotonic()
    for name in names:
        result = run_scenario(
            name,
            engine=engine,
            progress=progress,
            keep=args.keep,
            report_dir=args.report,
            topology=args.topology,
        )
        results.append(result)
        render(result, table)
    wall = time.monotonic() - began
    if len(results) > 1:
        render_summary(results, wall, table)
    if args.json:
        payload: object = (
            results[0].to_json()
            if len(results) == 1
            else {
                "passed": all(r.passed for r in results),
                "wall_s": round(wall, 2),
                "scenarios": [r.to_json() for r in results],
            }
        )
        print(json.dumps(payload, indent=2))
    if args.report is not None and len(results) > 1:
        summary = {
            "passed": all(r.passed for r in results),
            "wall_s": round(wall, 2),
            "scenarios": {r.scenario: r.passed for r in results},
        }
        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(r.passed for r in results) else EXIT_FAILED


def cmd_scale(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    if args.topology or args.keep or args.compose:
        print(
            "lab.py: scale runs on its own swarm stack (no --topology, --keep, --compose)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if engine.swarm_node()[0] != "active" and (at_risk := names_at_risk(engine)):
        print(
            "lab.py: scale makes this engine a swarm node and leaves it afterwards: "
            f"{at_risk_message(at_risk)}. Stop them first (make down, python lab.py down).",
            file=sys.stderr,
        )
        return EXIT_USAGE
    ensure_images(engine, progress, rebuild=args.rebuild)
    result = scale.run(engine, progress, args.report, image_tag())
    render(result, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    return 0 if result.passed else EXIT_FAILED


def cmd_up(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    layout = topo.load_topology(args.topology)
    ensure_images(engine, progress, rebuild=args.rebuild)
    run = Run(engine, layout, progress, run_id=new_run_id("up"), mode="up")
    try:
        run.start()
    except BaseException:
        run.close()
        raise
    print(
        f"run {run.id} is up: clients on {run.front}, upstreams on {run.back}, the proxy "
        f"on both (its config: {topo.PROXY_CONFIG_PATH} in its container):"
    )
    for member in run.members.values():
        ids = [i for i, host in run.hosts.items() if host == member.name and i != member.name]
        print(
            f"  {member.role:<8} {member.name:<16} {member.spec.ip}  "
            f"docker logs -f {member.spec.name}"
            + (f"  ({len(ids)} identities: {ids[0]}..{ids[-1]})" if ids else "")
        )
    print(f"remove it with: python lab.py down --run {run.id}   (or: python lab.py clean)")
    return 0


def cmd_remove(label: str, engine: Engine, progress: Progress) -> int:
    with progress.step(f"removing everything labelled {label}"):
        removed = remove_labelled(engine, label, progress)
    print(f"removed {len(removed)} object(s) labelled {label}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "list":
        return cmd_list()
    progress = Progress()
    with terminate_as_interrupt():
        try:
            engine = Engine.connect()
        except EngineUnavailable as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return EXIT_ENGINE
        try:
            if args.command == "scenario":
                return cmd_scenario(args, engine, progress)
            if args.command == "up":
                return cmd_up(args, engine, progress)
            if args.command == "fault":
                return fault_cli.main(args, engine, progress)
            if args.command == "swarm":
                return swarm_cli.main(args, engine, progress)
            if args.command == "watch":
                return watch.main(args, engine)
            if args.command == "down":
                label = f"{LABEL_RUN}={args.run}" if args.run else f"{LABEL_MODE}=up"
                return cmd_remove(label, engine, progress)
            return cmd_remove(LABEL_RUN, engine, progress)
        except KeyboardInterrupt as exc:
            why = str(exc) or "SIGINT"
            print(
                f"lab: interrupted ({why}); the run's containers and networks were removed",
                file=sys.stderr,
            )
            return EXIT_INTERRUPTED
        except topo.TopologyError as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (ImageError, EngineError) as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return EXIT_ENGINE
        except LabError as exc:
            print(f"lab: {exc}", file=sys.stderr)
            for line in exc.evidence:
                print(f"  | {line}", file=sys.stderr)
            return EXIT_FAILED
        finally:
            engine.close()
