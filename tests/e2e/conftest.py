"""Fixtures for the compose end-to-end tests: the docker CLI only, through subprocess.

* ``docker_engine`` -- the engine is reachable, or the test is skipped (failed when
  ``CI=true``: CI must never skip these silently);
* ``lab_images`` -- ``scripts/setup`` has run: compose plugin, base image (built only if
  missing) and the service images;
* ``compose`` -- a :class:`ComposeProject` with a unique project name, so a run never
  touches the developer's own ``layer4lab`` project or a parallel run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "compose.yaml"
SETUP = ROOT / "scripts" / "setup"
PROJECT_LABEL = "com.docker.compose.project"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # compose 2.26 prefixes log lines with ESC[2K

SETUP_TIMEOUT = 900.0  # covers building the base image (~35 s) on a slow mirror
UP_TIMEOUT = 180.0
CLI_TIMEOUT = 60.0


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _skip_or_fail(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and {reason}; the e2e tests need a docker engine", pytrace=False)
    pytest.skip(f"{reason} (set CI=true to make this a failure)")


def run(
    args: Sequence[str], *, timeout: float = CLI_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command from the repository root; on failure show its output."""
    proc = subprocess.run(
        list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"--- stdout (tail)\n{proc.stdout[-4000:]}\n--- stderr (tail)\n{proc.stderr[-4000:]}",
            pytrace=False,
        )
    return proc


def json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects among ``docker compose logs --no-log-prefix`` lines."""
    records: list[dict[str, Any]] = []
    for raw in text.splitlines():
        line = ANSI.sub("", raw).strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass(frozen=True)
class ComposeProject:
    """``docker compose -p NAME`` on the repository's compose.yaml."""

    name: str

    def base(self) -> list[str]:
        return [
            "docker",
            "compose",
            "--ansi",
            "never",
            "--project-directory",
            str(ROOT),
            "-f",
            str(COMPOSE_FILE),
            "-p",
            self.name,
        ]

    def compose(
        self, *args: str, timeout: float = CLI_TIMEOUT, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.base(), *args], timeout=timeout, check=check)

    def up(self) -> None:
        # Images come from lab_images; --no-build keeps `up` from building anything.
        self.compose("up", "-d", "--no-build", timeout=UP_TIMEOUT)

    def records(self, service: str) -> list[dict[str, Any]]:
        proc = self.compose("logs", "--no-color", "--no-log-prefix", service)
        return json_lines(proc.stdout)

    def attempts(self, service: str) -> list[dict[str, Any]]:
        return [r for r in self.records(service) if r.get("event") == "attempt"]

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "--timeout", "10", timeout=UP_TIMEOUT)

    def leftovers(self) -> dict[str, list[str]]:
        """Containers, networks and volumes that still carry this project's label."""
        label = f"label={PROJECT_LABEL}={self.name}"
        found: dict[str, list[str]] = {}
        for kind, cmd in (
            ("containers", ["docker", "ps", "-a", "--filter", label, "--format", "{{.Names}}"]),
            ("networks", ["docker", "network", "ls", "--filter", label, "--format", "{{.Name}}"]),
            ("volumes", ["docker", "volume", "ls", "--filter", label, "--format", "{{.Name}}"]),
        ):
            found[kind] = run(cmd).stdout.split()
        return found

    def diagnostics(self) -> str:
        """State and log tails for a failure message."""
        ps = self.compose("ps", "-a", check=False)
        logs = self.compose("logs", "--no-color", "--tail", "15", check=False)
        return f"--- compose ps\n{ps.stdout}{ps.stderr}\n--- logs (tail)\n{logs.stdout[-6000:]}"


@pytest.fixture(scope="session")
def docker_engine() -> None:
    if shutil.which("docker") is None:
        _skip_or_fail("the docker CLI is not installed")
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        _skip_or_fail("the docker engine did not answer `docker info` within 30 s")
        return
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        _skip_or_fail(f"the docker engine is not reachable ({detail})")


@pytest.fixture(scope="session")
def lab_images(docker_engine: None) -> None:
    """Build everything the lab needs (idempotent; ~1 s when the images are current)."""
    run([str(SETUP)], timeout=SETUP_TIMEOUT)


@pytest.fixture
def compose(lab_images: None) -> ComposeProject:
    return ComposeProject(f"l4lab-e2e-{os.getpid()}-{secrets.token_hex(3)}")
