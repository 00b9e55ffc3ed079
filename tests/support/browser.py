"""Headless Chromium (Debian's ``chromium``) as a test sees a page: the DOM it built,
the console lines it logged, and a screenshot."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CHROMIUM = shutil.which("chromium")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run")


@dataclass(frozen=True, slots=True)
class Rendered:
    dom: str
    console: list[str]  # the page's console messages, as Chromium logs them
    png: bytes


def render(page: Path, shot: Path, timeout: float = 60) -> Rendered:
    """Load ``page`` twice (once for the DOM and the log, once for a screenshot)."""
    if CHROMIUM is None:
        raise RuntimeError("chromium is not installed (apt-get install chromium)")
    uri = page.resolve().as_uri()
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, "--enable-logging=stderr", "--v=0", "--dump-dom", uri],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    subprocess.run(
        [CHROMIUM, *FLAGS, f"--screenshot={shot}", "--window-size=1100,1400", uri],
        capture_output=True,
        timeout=timeout,
        check=True,
    )
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    return Rendered(dom.stdout, console, shot.read_bytes())
