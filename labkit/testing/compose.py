"""The compose lab (``compose.yaml``) under testcontainers' ``DockerCompose``.

:func:`compose_lab` gives the lab its own project name (``l4tc-<session>-<n>``, set by a
one-line override file), so it never touches a developer's running ``layer4lab``
project, and ties it to the test session: the session's finaliser, or the next session
after a killed one, removes whatever the project left. ``up --wait`` returns once the
proxy (and every service with a health check) is healthy.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testcontainers.compose import DockerCompose

from ..logs import Attempt, LogLine, attempts_of, parse_record
from ..topology import ROOT
from .session import Session, current_session

COMPOSE_FILE = ROOT / "compose.yaml"
ADMINCTL = ["python3", "-m", "l4proxy.adminctl"]


def json_lines(text: str, source: str) -> list[LogLine]:
    """The JSON records in ``docker compose logs`` output (``service-1  | {...}`` lines,
    possibly with terminal escapes before the prefix)."""
    found: list[LogLine] = []
    for raw in text.splitlines():
        start = raw.find("{")
        record = parse_record(raw[start:]) if start >= 0 else None
        if record is not None:
            found.append(LogLine(source, 0, raw[start:], record))
    return found


@dataclass
class LabCompose(DockerCompose):
    """``DockerCompose`` on the repository's compose.yaml with a project of its own."""

    project: str = ""
    _override_dir: Path | None = field(default=None, init=False, repr=False)

    def records(self, service: str) -> list[LogLine]:
        stdout, _ = self.get_logs(service)
        return json_lines(stdout, service)

    def attempts(self, service: str) -> list[Attempt]:
        return attempts_of(self.records(service))

    def adminctl(self, command: str) -> tuple[str, str, int]:
        """``adminctl COMMAND`` in the proxy service: stdout, stderr, exit code."""
        return self.exec_in_container([*ADMINCTL, command], service_name="proxy")

    def stop(self, down: bool = True) -> None:
        try:
            super().stop(down)
        finally:
            if down and self._override_dir is not None:
                shutil.rmtree(self._override_dir, ignore_errors=True)
                self._override_dir = None


def compose_lab(
    *, project: str | None = None, session: Session | None = None, wait: bool = True
) -> LabCompose:
    """The compose lab, not yet started (use it as a context manager). The images must
    exist already (``scripts/setup``); nothing is built or pulled here."""
    session = session or current_session()
    session.begin()
    name = project or session.next_project()
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    override = folder / "project.yaml"
    # Prometheus' UI on any free port of the host's loopback, not 9090: a developer's
    # own lab may hold that.
    override.write_text(
        f"name: {name}\nservices:\n  prometheus:\n    ports: !override ['127.0.0.1::9090']\n",
        encoding="utf-8",
    )
    lab = LabCompose(
        context=str(ROOT),
        compose_file_name=[str(COMPOSE_FILE), str(override)],
        wait=wait,
        project=name,
    )
    lab._override_dir = folder
    return lab
