"""``python lab.py watch``: a live view of a running lab (``lab.py up`` or, with
``--compose``, the compose lab), redrawn twice a second with rich; ``q`` or Ctrl-C
quits. ``--once`` (or stdout that is not a terminal) prints one plain-text frame.

The data are the proxy's ``/status`` (``adminctl status`` in its container, once a
second) and every member's log lines (the Docker SDK, twice a second), the fault
helpers' included; :mod:`labkit.watch_model` turns them into a frame. Nothing new is
asked of the services.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from typing import Any

from .engine import Engine, EngineError, EngineNotFound
from .fault_cli import Lab, NoLab, locate
from .faulting import LABEL_FAULT
from .logs import LogLine, TailState, parse_record, take_new_lines
from .topology import adminctl
from .watch_model import (
    CLIENT_COLUMNS,
    UPSTREAM_COLUMNS,
    WINDOW,
    Frame,
    as_text,
    build,
    client_cells,
    event_cells,
    header,
    upstream_cells,
)

REFRESH = 0.5  # seconds between frames (at most twice a second)
STATUS_EVERY = 1.0
KEEP = 120.0  # seconds of lines kept for the event feed and "changed"


def add_parser(sub: Any) -> None:
    w = sub.add_parser("watch", help="a live view of a running lab (q or Ctrl-C quits)")
    w.add_argument("--run", help="which `lab.py up` run (when several run)")
    w.add_argument("--compose", action="store_true", help="the compose lab (make up)")
    w.add_argument("--project", default="layer4lab", help="its compose project")
    w.add_argument("--once", action="store_true", help="print one frame as text and exit")
    w.add_argument(
        "--window", type=float, default=WINDOW, help=f"seconds counted (default {WINDOW:g})"
    )


class Source:
    """A lab's lines and status, read incrementally (by one thread: :meth:`follow`),
    and frames built from a consistent copy of them (by another: :meth:`frame`)."""

    def __init__(self, engine: Engine, lab: Lab) -> None:
        self.engine = engine
        self.lab = lab
        self.lines: list[LogLine] = []
        self.tails: dict[str, TailState] = {}
        self.status: dict[str, Any] | None = None
        self._status_at = 0.0
        self.polled_at = 0.0  # when the last complete read began: frames end there
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def follow(self, window: float) -> None:
        """Read until :attr:`stop` is set (a thread's target): the view never waits on
        the engine, however slow ``docker exec`` is on a loaded machine."""
        while not self.stop.wait(REFRESH):
            now = time.time()
            with contextlib.suppress(EngineError):
                self.poll(now, since=now - window - 1)

    def containers(self) -> dict[str, str]:
        found = dict(self.lab.members)
        for item in self.engine.labelled(self.lab.selector):
            if item.kind == "container" and LABEL_FAULT in item.labels:
                found[item.name] = item.id
        return found

    def poll(self, now: float, since: float) -> None:
        fresh: list[LogLine] = []
        for name, container in self.containers().items():
            tail = self.tails.setdefault(container, TailState())
            try:
                chunk = self.engine.logs_after(container, tail, since)
            except EngineNotFound:
                continue
            source = "fault" if name.startswith(self.lab.prefix) else name
            fresh.extend(take_new_lines(chunk, source, tail))
        status = self.status
        if now - self._status_at >= STATUS_EVERY and "proxy" in self.lab.members:
            self._status_at = now
            status = self._read_status()
        with self._lock:
            self.lines = [line for line in self.lines + fresh if line.ts > now - KEEP]
            self.status = status
            self.polled_at = now

    def _read_status(self) -> dict[str, Any] | None:
        try:
            code, out = self.engine.exec_run(
                self.lab.members["proxy"],
                adminctl("status"),
            )
        except EngineError:
            return None
        return parse_record(out) if code == 0 else None

    def frame(self, window: float) -> Frame:
        """The window ending when the last read began: every line up to then is in,
        so the counts are those of the logs over that window, however slow a read."""
        with self._lock:
            lines, status, now = list(self.lines), self.status, self.polled_at
        return build(lines, status, now, title=self.lab.description, window=window)


def renderable(frame: Frame) -> Any:
    from rich.console import Group  # noqa: PLC0415 -- rich is needed by watch alone
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    colours = {"up": "green", "down": "red", "unknown": "yellow"}
    upstreams = Table(*UPSTREAM_COLUMNS, expand=False, title="upstreams", title_justify="left")
    for cells in upstream_cells(frame):
        colour = colours.get(cells[1], "")
        upstreams.add_row(cells[0], Text(cells[1], style=colour), *cells[2:])
    clients = Table(*CLIENT_COLUMNS, expand=False, title="clients", title_justify="left")
    for cells in client_cells(frame):
        clients.add_row(*cells)
    events = Text("\n".join(event_cells(frame)) or "(none yet)")
    # The hint shares the first line: a frame taller than the terminal loses its end.
    return Group(
        Text.assemble((header(frame), "bold"), ("   q or Ctrl-C quits", "dim")),
        Text(frame.topology),
        upstreams,
        clients,
        Text("events", style="bold"),
        events,
    )


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """stdin in cbreak mode (single keys, no echo) while it is a terminal."""
    if not sys.stdin.isatty():
        yield None
        return
    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, timeout: float) -> bool:
    if fd is None:
        time.sleep(timeout)
        return False
    ready, _, _ = select.select([fd], [], [], timeout)
    return bool(ready) and os.read(fd, 32).lower().startswith(b"q")


def main(args: argparse.Namespace, engine: Engine) -> int:
    try:
        lab = locate(engine, args)
    except NoLab as exc:
        print(f"lab.py watch: {exc}", file=sys.stderr)
        return 2
    source = Source(engine, lab)
    began = time.time()
    source.poll(began, since=began - KEEP)  # health changes before the window count too
    if args.once or not sys.stdout.isatty():
        sys.stdout.write(as_text(source.frame(args.window)))
        return 0
    from rich.live import Live  # noqa: PLC0415 -- rich is needed by watch alone

    reader = threading.Thread(target=source.follow, args=(args.window,), daemon=True)
    reader.start()
    try:
        with (
            _keys() as fd,
            Live(
                renderable(source.frame(args.window)),
                refresh_per_second=2,
                screen=True,
                auto_refresh=False,
            ) as live,
        ):
            while not _quit_pressed(fd, REFRESH):
                live.update(renderable(source.frame(args.window)), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        source.stop.set()
        reader.join(timeout=5)
    return 0
