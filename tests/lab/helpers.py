"""Helpers of the lab driver tier."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

from labkit import LABEL_RUN, Engine, ScenarioResult
from labkit.cli import render

ROOT = Path(__file__).resolve().parents[2]


def lab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python lab.py ARGS`` from the repository root, its output captured."""
    return subprocess.run(
        [sys.executable, str(ROOT / "lab.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def verdict_table(result: ScenarioResult) -> str:
    table = io.StringIO()
    render(result, table)
    return table.getvalue()


def assert_nothing_left(engine: Engine, labelled_before: set[str]) -> None:
    left = {item.id for item in engine.labelled(LABEL_RUN)} - labelled_before
    assert not left, f"labelled objects left behind: {left}"
