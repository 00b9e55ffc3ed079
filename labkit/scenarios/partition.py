"""partition: disconnect an upstream from the back network, then reconnect it."""

from __future__ import annotations

from ..run import Run
from .fault_cycle import fault_cycle, target_needs
from .steps import Fault, Scenario

DISCONNECT = Fault("disconnect", inject=Run.disconnect, recover=Run.reconnect)

SCENARIO = Scenario(
    "partition",
    "disconnect an upstream's network, reconnect",
    topology="partition",
    steps=fault_cycle(DISCONNECT),
    needs=target_needs,
)
