"""The services' source folders, and the environment that runs one as a process."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON_DIR = REPO / "services" / "common"  # l4common, which every service imports


def service_env(service_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with ``PYTHONPATH`` naming the
    service's folder and the shared package's, as each image's ``/app`` holds both."""
    env = dict(os.environ if base is None else base)
    paths = [str(service_dir), str(COMMON_DIR), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env
