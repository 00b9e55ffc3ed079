"""hang: pause an upstream (a hung process: its kernel still accepts), then unpause."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import needs
from .. import topology as topo
from ..run import Run
from .fault_cycle import backlog_allowance, fault_cycle, target_needs
from .steps import Fault, Scenario

PAUSE = Fault("pause", inject=Run.pause, recover=Run.unpause, allowance=backlog_allowance)


def hang_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    lacking = target_needs(config, topology)
    target = needs.fault_target(config, topology)
    spec = next((u for u in topology.upstreams if u.name == target), None)
    if spec is not None and spec.somaxconn is None:
        lacking.append(
            f"a capped listen backlog on {target} (somaxconn: a paused process's "
            "kernel accepts connections until its queue is full)"
        )
    return lacking


SCENARIO = Scenario(
    "hang",
    "pause an upstream (hung process), then unpause",
    topology="hang",
    steps=fault_cycle(PAUSE),
    needs=hang_needs,
)
