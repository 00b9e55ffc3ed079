"""Running one scenario: check the topology fits, start a :class:`~labkit.run.Run`, play
the steps, and collect a :class:`~labkit.result.ScenarioResult` (everything the run
started is removed afterwards, whatever happens)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import needs
from .. import topology as topo
from ..checks import Check, check
from ..engine import Engine, EngineError
from ..progress import Progress
from ..report import write_report
from ..result import ScenarioResult
from ..run import LabError, Run, TimelineEvent
from .steps import Scenario, play


class ScenarioUnfit(ValueError):
    """The topology lacks what the scenario needs (nothing was started)."""

    def __init__(self, scenario: str, topology: str, lacking: list[str]) -> None:
        super().__init__(
            f"scenario {scenario} cannot run on topology {topology}: it needs " + "; ".join(lacking)
        )
        self.lacking = lacking


def missing(scenario: Scenario, config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    """What ``topology`` (with its proxy ``config``) lacks for ``scenario``; [] if nothing."""
    return needs.rules_known(config, topology) + scenario.needs(config, topology)


def _add_log_timeline(run: Run, result: ScenarioResult) -> None:
    """Health transitions from the proxy's log and first/last reply per upstream."""
    events = list(run.timeline)
    for event in run.health():
        events.append(
            TimelineEvent(
                event.ts,
                "health",
                f"{event.upstream_name} {event.old} -> {event.new} "
                f"({event.source}: {event.reason})",
                event.upstream_name,
                state=event.new,
            )
        )
    attempts = run.attempts()
    for upstream in run.topology.upstream_names():
        replies = [a for a in attempts if a.ok and a.upstream == upstream]
        if replies:
            first, last = replies[0].end, replies[-1].end
            events.append(
                TimelineEvent(first, "first_reply", f"first reply from {upstream}", upstream)
            )
            events.append(
                TimelineEvent(last, "last_reply", f"last reply from {upstream}", upstream)
            )
    result.timeline = sorted(events, key=lambda e: e.at)
    result.attempts = attempts


def run_scenario(
    scenario: Scenario,
    *,
    engine: Engine,
    progress: Progress | None = None,
    keep: bool = False,
    report_dir: Path | None = None,
    topology_dir: Path = topo.TOPOLOGY_DIR,
    topology: str | None = None,
) -> ScenarioResult:
    """Run one scenario end to end (images must exist: see :func:`labkit.images.ensure_images`).

    Everything labelled with the run's id is removed before this returns (unless
    ``keep``), also when the scenario fails; on KeyboardInterrupt it is removed and
    the interrupt propagates."""
    progress = progress or Progress()
    layout = topo.load_topology(topology or scenario.topology, topology_dir)
    lacking = missing(scenario, topo.nominal_config(topo.load_reference_config(), layout), layout)
    if lacking:
        raise ScenarioUnfit(scenario.name, layout.name, lacking)
    started = time.time()
    clock = time.monotonic()
    out: list[Check] = []
    run = Run(engine, layout, progress, keep=keep)
    result = ScenarioResult(scenario.name, layout.name, run.id, started)
    progress.say(f"scenario {scenario.name}: {scenario.summary} (run {run.id})")
    try:
        with run:
            try:
                play(scenario, run, out)
            except (LabError, EngineError) as exc:
                result.error = str(exc)
                evidence = exc.evidence if isinstance(exc, LabError) else []
                out.append(check("scenario ran to completion", False, str(exc), evidence))
            finally:
                try:
                    run.poll()
                except EngineError as exc:
                    progress.say(f"could not read the final logs: {exc}")
                _add_log_timeline(run, result)
                result.logs = {
                    m.name: [line.text for line in m.lines] for m in run.members.values()
                }
                result.proxy_config = run.config
    except KeyboardInterrupt:
        result.interrupted = True
        raise
    finally:
        result.checks = out
        result.duration = time.monotonic() - clock
        result.removed = len(run.removed)
        if report_dir is not None:
            result.report_dir = write_report(result, report_dir, origin=run.origin)
            progress.say(f"report written to {result.report_dir}")
    return result
