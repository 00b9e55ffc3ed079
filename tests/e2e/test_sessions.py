"""Clean-up without Ryuk: a session killed with SIGKILL leaves its containers and
network behind; the next session removes them before it starts, and says so. The
README's example of the module in another project's suite runs too, as that project
would run it. Both use child processes (multiprocessing, spawned): a test cannot
SIGKILL its own process, and the example must run in a session of its own.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import signal
import threading
import traceback
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any

import pytest

from labkit.engine import Engine
from labkit.testing import LabNetwork, UpstreamContainer, current_session
from labkit.testing.session import LABEL_SESSION, Session, describe_reaped

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "testcontainers"


def _start_then_wait_to_be_killed(report: Queue[Any]) -> None:
    """Child: a network and a running upstream, then wait (bounded) for SIGKILL."""
    try:
        network = LabNetwork("killed").create()
        upstream = UpstreamContainer("u1", network=network).start()
        report.put((current_session().id, upstream.container_id, network.name))
    except BaseException:
        report.put(("error", traceback.format_exc(), ""))
        raise
    threading.Event().wait(120)


def _next_session(report: Queue[Any]) -> None:
    """Child: what a new session says when it begins."""
    try:
        session = Session()
        reaped = session.begin()
        report.put((session.id, [item.id for item in reaped], describe_reaped(reaped)))
        session.end()
    except BaseException:
        report.put(("error", traceback.format_exc(), ""))
        raise


def _reported(report: Queue[Any], what: str) -> tuple[Any, Any, Any]:
    try:
        first, second, third = report.get(timeout=90)
    except queue.Empty:
        pytest.fail(f"{what}: the child process reported nothing within 90 s", pytrace=False)
    if first == "error":
        pytest.fail(f"{what} failed in the child process:\n{second}", pytrace=False)
    return first, second, third


def _run_pytest(folder: str) -> None:
    os.chdir(folder)
    raise SystemExit(pytest.main([folder, "-q", "-p", "no:cacheprovider"]))


def test_a_killed_session_is_removed_by_the_next_one(
    lab_images: None, lab_session: Session
) -> None:
    spawn = multiprocessing.get_context("spawn")
    report: Queue[Any] = spawn.Queue()
    child = spawn.Process(target=_start_then_wait_to_be_killed, args=(report,))
    child.start()
    try:
        killed, container, network = _reported(report, "starting a session to kill")
    finally:
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
    assert child.exitcode == -signal.SIGKILL

    engine = Engine.connect()
    try:
        left = {item.id: item for item in engine.labelled(f"{LABEL_SESSION}={killed}")}
        assert container in left, "the killed session's upstream should still be there"
        assert {item.kind for item in left.values()} >= {"container", "network", "volume"}

        # A queue of its own: the killed child may have died holding the first one's lock.
        second: Queue[Any] = spawn.Queue()
        nxt = spawn.Process(target=_next_session, args=(second,))
        nxt.start()
        _, reaped, said = _reported(second, "beginning the next session")
        nxt.join(30)
        assert nxt.exitcode == 0
        assert set(left) <= set(reaped), (left, reaped)
        assert f"removed leftovers of killed test sessions of session(s) {killed}" in said
        assert engine.labelled(f"{LABEL_SESSION}={killed}") == []
        assert network not in {item.name for item in engine.labelled(LABEL_SESSION)}
        # This (live) session was left alone.
        assert engine.labelled(f"{LABEL_SESSION}={lab_session.id}")
    finally:
        engine.close()


def test_the_readme_example_passes_in_a_project_of_its_own(
    lab_images: None, lab_session: Session, tmp_path: Path
) -> None:
    for name in ("conftest.py", "test_proxy_example.py"):
        shutil.copy(EXAMPLE / name, tmp_path / name)
    spawn = multiprocessing.get_context("spawn")
    child = spawn.Process(target=_run_pytest, args=(str(tmp_path),))
    child.start()
    child.join(180)
    if child.is_alive():
        child.kill()
        child.join()
    assert child.exitcode == 0, f"the example's pytest run exited {child.exitcode}"
    # Its session ended and removed what it started.
    engine = Engine.connect()
    try:
        mine = lab_session.id
        others = [i for i in engine.labelled(LABEL_SESSION) if i.labels[LABEL_SESSION] != mine]
        assert others == [], [i.describe() for i in others]
    finally:
        engine.close()
