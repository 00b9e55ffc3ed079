"""One test session's containers, networks and volumes: labelled, removed at the end,
and removed by the next session if this one was killed.

testcontainers-python normally relies on Ryuk, a reaper container that removes what a
session left behind once the session's socket to it closes. Ryuk is an image from a
registry, and the lab works on engines without one, so a :class:`Session` takes its
place:

* every object this package creates carries ``layer4lab.testing.session=<id>`` plus the
  creating process's host name and pid; a compose project is named
  ``l4tc-<session id>-<n>``, and a small marker volume records the session so that its
  projects can be found even when nothing else of it is left;
* :meth:`Session.end` (the pytest finaliser, and an ``atexit`` hook) removes everything
  of this session;
* :meth:`Session.begin` first removes every *stale* session's objects: those created on
  this host by a process that no longer runs (a run killed with SIGKILL), and reports
  what it removed. Sessions of live processes, or of other hosts sharing the engine, are
  left alone.
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from testcontainers.core.config import testcontainers_config

from ..engine import Engine, Labelled
from ..run import remove_labelled

LABEL_SESSION = "layer4lab.testing.session"
LABEL_HOST = "layer4lab.testing.host"
LABEL_PID = "layer4lab.testing.pid"
LABEL_ROLE = "layer4lab.testing.role"
LABEL_NAME = "layer4lab.testing.name"
COMPOSE_PROJECT = "com.docker.compose.project"
PROJECT_PREFIX = "l4tc-"


def disable_reaper() -> None:
    """Turn testcontainers' Ryuk off for this process (it needs a registry image); the
    session's labels and finaliser do its job."""
    os.environ["TESTCONTAINERS_RYUK_DISABLED"] = "true"
    testcontainers_config.ryuk_disabled = True


def process_alive(pid: int) -> bool:
    """Does a process with this pid run on this host (as far as this process can see)?"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


@dataclass(frozen=True, slots=True)
class Owner:
    """Who created a labelled object: a session, on a host, in a process."""

    session: str
    host: str
    pid: int

    @classmethod
    def of(cls, item: Labelled) -> Owner | None:
        labels = item.labels
        session = labels.get(LABEL_SESSION)
        if not session:
            return None
        try:
            pid = int(labels.get(LABEL_PID, ""))
        except ValueError:
            pid = 0
        return cls(session, labels.get(LABEL_HOST, ""), pid)


def stale_sessions(
    items: list[Labelled], *, current: str, host: str, alive: Callable[[int], bool]
) -> set[str]:
    """Sessions among ``items`` created on ``host`` by a process that is gone (pure)."""
    stale: set[str] = set()
    for item in items:
        owner = Owner.of(item)
        if owner is None or owner.session == current or owner.host != host:
            continue
        if not alive(owner.pid):
            stale.add(owner.session)
    return stale


def session_of_project(project: str) -> str | None:
    """``l4tc-<session>-<n>`` -> ``<session>``; None for any other project name."""
    if not project.startswith(PROJECT_PREFIX):
        return None
    session, _, number = project[len(PROJECT_PREFIX) :].rpartition("-")
    return session if session and number.isdigit() else None


@dataclass
class Session:
    """This process's test session (see the module docstring)."""

    id: str = field(default_factory=lambda: secrets.token_hex(6))
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    begun: bool = False
    ended: bool = False
    reaped: list[Labelled] = field(default_factory=list)
    _projects: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def labels(self, role: str, name: str) -> dict[str, str]:
        return {
            LABEL_SESSION: self.id,
            LABEL_HOST: self.host,
            LABEL_PID: str(self.pid),
            LABEL_ROLE: role,
            LABEL_NAME: name,
        }

    @property
    def marker(self) -> str:
        return f"{PROJECT_PREFIX}{self.id}-session"

    def next_project(self) -> str:
        with self._lock:
            self._projects += 1
            return f"{PROJECT_PREFIX}{self.id}-{self._projects}"

    # --- lifecycle ----------------------------------------------------------------------

    def begin(self) -> list[Labelled]:
        """Disable Ryuk, remove stale sessions' objects (returned), create the marker.
        Idempotent: later calls return what the first one removed."""
        with self._lock:
            if self.begun:
                return self.reaped
            disable_reaper()
            engine = Engine.connect()
            try:
                self.reaped = reap_stale(engine, current=self.id, host=self.host)
                engine.create_volume(self.marker, self.labels("marker", "session"))
            finally:
                engine.close()
            self.begun = True
            atexit.register(self.end)
            return self.reaped

    def end(self) -> list[Labelled]:
        """Remove every container, network and volume of this session; what was removed."""
        with self._lock:
            if self.ended or not self.begun:
                return []
            self.ended = True
        engine = Engine.connect()
        try:
            return remove_session(engine, self.id)
        finally:
            engine.close()


def remove_session(engine: Engine, session: str) -> list[Labelled]:
    """Everything labelled with ``session``, and its compose projects' objects."""
    removed: list[Labelled] = []
    for project in sorted(_projects_of(engine, session)):
        removed += remove_labelled(engine, f"{COMPOSE_PROJECT}={project}")
    removed += remove_labelled(engine, f"{LABEL_SESSION}={session}")
    return removed


def _projects_of(engine: Engine, session: str) -> set[str]:
    return {
        project
        for item in engine.labelled(COMPOSE_PROJECT)
        if session_of_project(project := item.labels.get(COMPOSE_PROJECT, "")) == session
    }


def reap_stale(engine: Engine, *, current: str, host: str) -> list[Labelled]:
    """Remove the objects of every stale session (see :func:`stale_sessions`)."""
    items = engine.labelled(LABEL_SESSION)
    stale = stale_sessions(items, current=current, host=host, alive=process_alive)
    # A compose project whose session left no marker (killed between the two) is stale
    # too when no live session of this host claims it.
    live = {o.session for i in items if (o := Owner.of(i)) is not None} - stale
    for item in engine.labelled(COMPOSE_PROJECT):
        session = session_of_project(item.labels.get(COMPOSE_PROJECT, ""))
        if session is not None and session != current and session not in live:
            stale.add(session)
    removed: list[Labelled] = []
    for session in sorted(stale):
        removed += remove_session(engine, session)
    return removed


_current: Session | None = None
_current_lock = threading.Lock()


def current_session() -> Session:
    """The process-wide session (created on first use)."""
    global _current  # noqa: PLW0603 -- one session per process, by design
    with _current_lock:
        if _current is None or _current.pid != os.getpid():
            _current = Session()
        return _current


def describe_reaped(items: list[Labelled]) -> str:
    """One line for the report: what a session removed of earlier, killed runs."""
    if not items:
        return "no leftovers of earlier test sessions"
    sessions = sorted({o.session for i in items if (o := Owner.of(i)) is not None})
    kinds: dict[str, int] = {}
    for item in items:
        kinds[item.kind] = kinds.get(item.kind, 0) + 1
    counted = ", ".join(f"{n} {kind}(s)" for kind, n in sorted(kinds.items()))
    which = f" of session(s) {', '.join(sessions)}" if sessions else ""
    return f"removed leftovers of killed test sessions{which}: {counted}"


__all__ = [
    "LABEL_SESSION",
    "Session",
    "current_session",
    "describe_reaped",
    "disable_reaper",
    "reap_stale",
    "stale_sessions",
]
