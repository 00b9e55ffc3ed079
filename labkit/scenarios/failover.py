"""failover: kill an upstream (SIGKILL), then start it again."""

from __future__ import annotations

from ..run import Run
from .fault_cycle import fault_cycle, target_needs
from .steps import Fault, Scenario

KILL = Fault("kill", inject=Run.kill, recover=Run.restart, restarts=True)

SCENARIO = Scenario(
    "failover",
    "kill an upstream, then start it again",
    topology="failover",
    steps=fault_cycle(KILL),
    needs=target_needs,
)
