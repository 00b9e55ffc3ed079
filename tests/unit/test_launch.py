"""lab.py as the user types it: any Python 3.11+ runs it; without labkit's dependencies
it runs itself again in the project's virtual environment, or says in one line how to
make that environment (issue 16, part 4)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("lab_launcher", ROOT / "lab.py")
assert SPEC is not None
assert SPEC.loader is not None
lab = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lab)


def test_the_decision(tmp_path: Path) -> None:
    venv = tmp_path / ".venv" / "bin" / "python"
    assert lab.launch(None, "/usr/bin/python3", venv, reexeced=False) == ("run", "")
    # No venv: one line naming the command that makes it.
    action, line = lab.launch("docker-py is not installed", "/usr/bin/python3", venv, False)
    assert action == "fail"
    assert "make setup" in line
    assert "/usr/bin/python3" in line
    assert "\n" not in line
    venv.parent.mkdir(parents=True)
    venv.write_text("")
    assert lab.launch("docker-py is not installed", "/usr/bin/python3", venv, False) == (
        "exec",
        str(venv),
    )
    # Already the venv's interpreter, or already re-run: say so instead of looping.
    assert lab.launch("x", str(venv), venv, False)[0] == "fail"
    action, line = lab.launch("docker-py 5.0.3 is older than 7.0", "/usr/bin/python3", venv, True)
    assert action == "fail"
    assert "virtual environment" in line


def test_what_counts_as_missing() -> None:
    assert lab.missing_dependency() is None  # this suite runs in the project's venv
    assert lab.missing_dependency((3, 10)) == "Python 3.10 is older than 3.11"
    assert lab._version("7.1.0") == (7, 1, 0)
    assert lab._version("5.0.3") < (7, 0)
    assert lab._version("7.0.0rc1") == (7, 0, 0)


@pytest.mark.skipif(not Path("/usr/bin/python3").is_file(), reason="no system python3")
def test_the_system_python_without_site_packages_runs_lab_py_through_the_venv() -> None:
    """``-S``: an interpreter that sees no docker-py at all."""
    if not (ROOT / ".venv" / "bin" / "python").is_file():
        pytest.skip("no .venv in this checkout")
    done = subprocess.run(
        ["/usr/bin/python3", "-S", str(ROOT / "lab.py"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert "scenarios:" in done.stdout
    assert "failover" in done.stdout


def test_the_venv_python_without_site_packages_fails_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-S", str(ROOT / "lab.py"), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "make setup" in done.stderr
