"""lab.py watch on a running `lab.py up`: one frame agrees with the containers' own logs
over the same 10 s, and the live view draws in a real terminal (tmux) and quits on q
and on Ctrl-C. About 40 s."""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator

import pytest

from labkit import Engine
from labkit.logs import TailState, parse_ts, take_new_lines
from labkit.run import LABEL_NAME, LABEL_RUN
from labkit.waiting import wait_until
from tests.lab.helpers import ROOT, in_ci, lab

pytestmark = pytest.mark.lab

HEADER = re.compile(r"^run (\S+) \| proxy (\w+) \| last 10s to (\S+)(   q or Ctrl-C quits)?$")


@pytest.fixture(scope="module")
def running(engine: Engine) -> Iterator[str]:
    up = lab("up", timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    found = re.search(r"run (up-[0-9a-f]+) is up", up.stdout)
    assert found is not None, up.stdout
    run = found.group(1)
    try:
        yield run
    finally:
        lab("down", "--run", run)


# upstream health changed(2 words: "since start", "12s ago") active replies share bytes
REPLIES = 5


def table(text: str) -> dict[str, list[str]]:
    """Rows of the text frame by their first word (u1.., client.a..)."""
    return {
        line.split()[0]: line.split()
        for line in text.splitlines()[1:]
        if re.match(r"^(u\d+|client\.\w+) ", line)
    }


def frame(run: str) -> str:
    done = lab("watch", "--once", "--run", run, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_one_frame_matches_the_logs_of_the_same_ten_seconds(engine: Engine, running: str) -> None:
    def served_by_all() -> str | None:
        text = frame(running)
        rows = table(text)
        replies = [int(rows[u][REPLIES]) for u in ("u1", "u2", "u3") if u in rows]
        return text if len(replies) == 3 and min(replies) > 0 else None

    text = wait_until("a frame with replies from u1, u2 and u3", served_by_all, timeout=60)
    lines = text.splitlines()
    head = HEADER.match(lines[0])
    assert head is not None, lines[0]
    assert head.group(1) == running
    assert head.group(2) == "serving"
    end = parse_ts(head.group(3))
    assert end is not None
    rows = table(text)
    assert {"u1", "u2", "u3"} <= set(rows)
    clients = {f"client.{c}" for c in "abcde"}
    assert clients <= set(rows)

    # The same window, from the containers' own logs.
    replies: Counter[str] = Counter()
    outcomes: dict[str, Counter[str]] = {c: Counter() for c in clients}
    for item in engine.labelled(f"{LABEL_RUN}={running}"):
        name = item.labels.get(LABEL_NAME, "")
        if item.kind != "container" or name not in clients:
            continue
        for line in take_new_lines(engine.logs(item.id, None), name, TailState()):
            rec = line.record or {}
            if rec.get("event") != "attempt" or not end - 10 < line.ts <= end:
                continue
            outcome = rec.get("outcome")
            outcomes[name]["ok" if outcome == "ok" else "other"] += 1
            if outcome == "ok":
                replies[str(rec.get("upstream"))] += 1
    for upstream in ("u1", "u2", "u3"):
        assert int(rows[upstream][REPLIES]) == replies[upstream], (upstream, rows[upstream])
    for client in clients:
        assert int(rows[client][1]) == outcomes[client]["ok"], (client, rows[client])
        assert int(rows[client][2]) + int(rows[client][3]) == outcomes[client]["other"]


@pytest.mark.skipif(shutil.which("tmux") is None and not in_ci(), reason="tmux not installed")
@pytest.mark.parametrize("key", ["q", "C-c"])
def test_the_live_view_draws_in_a_terminal_and_quits(running: str, key: str) -> None:
    session = f"l4l-watch-{uuid.uuid4().hex[:8]}"
    python = shutil.which("python3") or "python3"
    # COLUMNS and LINES leak into the pane from pytest's environment (80x24), and rich,
    # like shutil, would believe them over the terminal.
    command = (
        f"cd {ROOT} && env -u COLUMNS -u LINES {python} lab.py watch --run {running}; "
        "echo EXITED rc=$?; sleep 60"
    )
    tmux = ["tmux", "-L", session]
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "110", "-y", "40", command], check=True
    )

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", session],
            capture_output=True,
            text=True,
            check=False,
        ).stdout

    try:
        first = wait_until(
            "the live view's first frame",
            lambda: s if "│ u3" in (s := screen()) and "│ client.e" in s else None,
            timeout=60,
            evidence=screen,
        )
        stamp = HEADER.match(first.splitlines()[0])
        assert stamp is not None, first
        assert stamp.group(4)  # the hint, on the first line
        wait_until(
            "a newer frame",
            lambda: (
                True
                if (m := HEADER.match(screen().splitlines()[0])) and m.group(3) > stamp.group(3)
                else None
            ),
            timeout=30,
            evidence=screen,
        )
        subprocess.run([*tmux, "send-keys", "-t", session, key], check=True)
        after = wait_until(
            "watch to exit", lambda: s if "EXITED" in (s := screen()) else None, timeout=15
        )
        assert "EXITED rc=0" in after
        assert "Traceback" not in after
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, check=False)
