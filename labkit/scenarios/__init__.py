"""The lab's scenarios, one file each (name: what it shows):

    failover   kill an upstream, then start it again
    authz      replies only from allowed upstreams; denied client
    ratelimit  token bucket: --burst client vs polite client
    mtls       bad client certificates refused, valid one served
    hang       pause an upstream (hung process), then unpause
    partition  disconnect an upstream's network, reconnect
    stop       stop an upstream gracefully (SIGTERM), then start it again
    reload     change authorization and reload under load; bad config
    drain      SIGTERM under long transfers: drain, then cut-off
    isolation  clients cannot reach upstreams, forge headers or read others' keys
    blackhole  drop an upstream's packets (no reset), then let them through
    reset      an echo upstream resets its connections mid-stream
    slow       an upstream accepts and never answers (hang), then recovers
    lossy      10% packet loss on a reply and an echo upstream for 20 s
    flap       an upstream cut off and back every 1.5 s for 20 s
    bandwidth  an echo upstream throttled to 1 Mbit/s for 20 s under transfers

A scenario is a :class:`~labkit.scenarios.steps.Scenario` value: a short tuple of steps
from the vocabulary in :mod:`~labkit.scenarios.steps` (Start, Steady, Inject, Await,
Judge, Recover, ...), what it needs of a topology, and its default topology. The fault
scenarios share :func:`~labkit.scenarios.fault_cycle.fault_cycle`. Oracles read the run's
own proxy config: allowed upstreams from its rules, admissions from its rate and burst,
detection windows from its health-check timing. :func:`run_scenario` plays one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import topology as topo
from ..result import ScenarioResult
from . import (
    authz,
    bandwidth,
    blackhole,
    drain,
    failover,
    flap,
    hang,
    isolation,
    lossy,
    mtls,
    partition,
    ratelimit,
    reload,
    reset,
    runner,
    slow,
    stop,
)
from .runner import ScenarioUnfit
from .steps import Scenario

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        failover.SCENARIO,
        authz.SCENARIO,
        ratelimit.SCENARIO,
        mtls.SCENARIO,
        hang.SCENARIO,
        partition.SCENARIO,
        stop.SCENARIO,
        reload.SCENARIO,
        drain.SCENARIO,
        isolation.SCENARIO,
        blackhole.SCENARIO,
        reset.SCENARIO,
        slow.SCENARIO,
        lossy.SCENARIO,
        flap.SCENARIO,
        bandwidth.SCENARIO,
    )
}


def missing(name: str, config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    """What ``topology`` (with its proxy ``config``) lacks for scenario ``name``."""
    return runner.missing(SCENARIOS[name], config, topology)


def run_scenario(name: str, **options: Any) -> ScenarioResult:
    """Run scenario ``name``; ``options`` (engine, progress, keep, report_dir,
    topology_dir, topology) as for :func:`labkit.scenarios.runner.run_scenario`."""
    return runner.run_scenario(SCENARIOS[name], **options)


__all__ = ["SCENARIOS", "Scenario", "ScenarioUnfit", "missing", "run_scenario"]
