"""stop: docker stop an upstream (SIGTERM: it closes its listener and exits by itself),
then start it again. Written as the README's example of a new fault scenario."""

from __future__ import annotations

from ..run import Run
from .fault_cycle import fault_cycle, target_needs
from .steps import Fault, Scenario

STOP = Fault("stop", inject=Run.stop, recover=Run.restart, restarts=True)

SCENARIO = Scenario(
    "stop",
    "stop an upstream gracefully (SIGTERM), then start it again",
    topology="failover",
    steps=fault_cycle(STOP),
    needs=target_needs,
)
