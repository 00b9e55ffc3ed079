"""labkit: the Docker SDK driver of layer4lab's containerized lab (``python lab.py``).

The pure parts -- log parsing (:mod:`labkit.logs`), verdicts and token-bucket
expectations (:mod:`labkit.checks`), topologies and proxy configs
(:mod:`labkit.topology`) -- need no engine; :mod:`labkit.engine` wraps docker-py,
:mod:`labkit.run` drives one run, :mod:`labkit.scenarios` holds the scenarios.
"""

from __future__ import annotations

from .engine import Engine, EngineError, EngineUnavailable
from .images import ensure_images
from .progress import Progress
from .result import ScenarioResult
from .run import LABEL_RUN, LabError, Run, remove_labelled
from .scenarios import SCENARIOS, run_scenario

__all__ = [
    "LABEL_RUN",
    "SCENARIOS",
    "Engine",
    "EngineError",
    "EngineUnavailable",
    "LabError",
    "Progress",
    "Run",
    "ScenarioResult",
    "ensure_images",
    "remove_labelled",
    "run_scenario",
]
