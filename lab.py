#!/usr/bin/env python3
"""layer4lab's containerized lab: a thin front to :mod:`labkit` (Docker SDK for Python).

    python lab.py list
    python lab.py scenario NAME|all|scale [--keep] [--json] [--report DIR]
    python lab.py up [--topology NAME] | down [--run ID] | clean
    python lab.py fault add TARGET KIND [PARAMS] [--for D] | list | clear [TARGET]
    python lab.py swarm up|down|status
    python lab.py watch [--run ID | --compose] [--once]

Every container, network and volume a run creates is labelled ``layer4lab.run=<id>``
and removed when the run ends (also on failure, Ctrl-C and SIGTERM).

Any Python 3.11+ may run this file: when the running interpreter lacks labkit's
dependencies (docker-py 7+, PyYAML, rich) and the project's virtual environment exists
(``make setup`` makes ``.venv``), it runs itself again there; when that does not exist
either, it says in one line which command makes it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venv" / "bin" / "python"
REEXEC = "LAYER4LAB_REEXEC"  # set on the re-run, so a broken venv cannot loop
NEEDED = (("docker", (7, 0)), ("yaml", None), ("rich", None))  # module, least version


def _version(text: str) -> tuple[int, ...]:
    """``"7.1.0"`` -> ``(7, 1, 0)``; each part's leading digits (``"0rc1"`` -> 0)."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def missing_dependency(version: tuple[int, ...] = tuple(sys.version_info[:2])) -> str | None:
    """What this interpreter lacks to run labkit, or None."""
    if version < (3, 11):
        return f"Python {'.'.join(map(str, version))} is older than 3.11"
    for name, least in NEEDED:
        try:
            module = importlib.import_module(name)
        except ImportError:
            return f"{'docker-py' if name == 'docker' else name} is not installed"
        found = str(getattr(module, "__version__", "0"))
        if least is not None and _version(found) < least:
            return f"docker-py {found} is older than {'.'.join(map(str, least))}"
    return None


def launch(
    problem: str | None, executable: str, venv_python: Path, reexeced: bool
) -> tuple[str, str]:
    """Pure: ``("run", "")``, ``("exec", python)`` or ``("fail", one line)``."""
    if problem is None:
        return "run", ""
    if not reexeced and venv_python.is_file() and Path(executable) != venv_python:
        return "exec", str(venv_python)
    where = f"{venv_python} (the project's virtual environment)" if reexeced else executable
    return "fail", (
        f"lab.py: {problem} for {where}; run `make setup` in {HERE} (it makes .venv with "
        "the pinned requirements), then run lab.py again with any Python 3.11+"
    )


def main() -> int:
    action, detail = launch(
        missing_dependency(), sys.executable, VENV_PYTHON, os.environ.get(REEXEC) == "1"
    )
    if action == "exec":
        os.environ[REEXEC] = "1"
        os.execv(detail, [detail, str(Path(__file__).resolve()), *sys.argv[1:]])  # noqa: S606
    if action == "fail":
        print(detail, file=sys.stderr)
        return 2
    from labkit.cli import main as lab_main  # noqa: PLC0415 -- only once the deps are known

    return lab_main()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `python lab.py list | head`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
