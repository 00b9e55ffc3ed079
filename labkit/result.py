"""The outcome of one scenario: its checks, timeline, logs and attempts (a value the
command line renders and :mod:`labkit.report` writes; it imports no scenario)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checks import Check
from .logs import Attempt, format_ts
from .run import TimelineEvent


@dataclass(slots=True)
class ScenarioResult:
    scenario: str
    topology: str
    run_id: str
    started: float
    duration: float = 0.0
    checks: list[Check] = field(default_factory=list)
    error: str | None = None
    interrupted: bool = False
    timeline: list[TimelineEvent] = field(default_factory=list)
    logs: dict[str, list[str]] = field(default_factory=dict)
    proxy_config: dict[str, Any] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=list)
    report_dir: Path | None = None
    removed: int = 0

    @property
    def passed(self) -> bool:
        return (
            self.error is None
            and not self.interrupted
            and bool(self.checks)
            and all(c.passed for c in self.checks)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "topology": self.topology,
            "run": self.run_id,
            "passed": self.passed,
            "started": format_ts(self.started),
            "duration_s": round(self.duration, 2),
            "error": self.error,
            "interrupted": self.interrupted,
            "checks": [c.to_json() for c in self.checks],
            "removed_objects": self.removed,
        }
