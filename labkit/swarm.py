"""The lab on Docker Swarm: a single-node swarm when the engine has none, the stack
derived from compose.yaml (:mod:`labkit.stack`) deployed with ``docker stack deploy``,
waiting until it serves, scaling, and removal that leaves the engine as it was found.

Whether this code created the swarm (and ``docker_gwbridge``, which a swarm brings) is
written into the swarm node's own labels, so ``lab.py swarm down`` in another process
knows it, and the knowledge vanishes with the swarm. A swarm that was there before is
never left; a ``docker_gwbridge`` that was there before is never removed.

The Docker SDK does everything but the stack itself: it has no stack API, and the
issue is exactly that the compose file deploys through ``docker stack deploy``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .certs import Certificates, issue_spec
from .engine import Engine, EngineError, EngineNotFound
from .logs import LogLine, TailState, parse_record, take_new_lines
from .progress import Progress
from .run import LabError, issue_certificates
from .stack import NAMESPACE_LABEL, PROXY_CONFIG_TARGET, STACK_LABEL, Shape, stack_file
from .topology import adminctl
from .waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
SWARM_PROXY_CONFIG = ROOT / "lab" / "swarm" / "proxy.yaml"
CREATED_SWARM = "layer4lab.created-swarm"
CREATED_GWBRIDGE = "layer4lab.created-gwbridge"
GWBRIDGE = "docker_gwbridge"
ADVERTISE = "127.0.0.1"  # a single-node lab swarm: nothing listens beyond loopback
SWARM_PORT = 2377
CLI_TIMEOUT = 120.0
SERVICE_LABEL = "com.docker.swarm.service.name"


@dataclass(frozen=True, slots=True)
class EngineState:
    """What the swarm path must leave as it found it: the swarm state, and the networks
    a swarm brings (``ingress``, ``docker_gwbridge``) or a stack leaves (overlays).
    Bridge networks are not compared: other labs may come and go meanwhile."""

    swarm: str
    networks: frozenset[str]

    def differences(self, now: EngineState) -> list[str]:
        out = []
        if now.swarm != self.swarm:
            out.append(f"swarm {self.swarm} before, {now.swarm} now")
        if added := sorted(now.networks - self.networks):
            out.append(f"networks added: {', '.join(added)}")
        if gone := sorted(self.networks - now.networks):
            out.append(f"networks gone: {', '.join(gone)}")
        return out


def engine_state(engine: Engine) -> EngineState:
    state, _ = engine.swarm_node()
    networks = engine.network_drivers()
    swarmish = {n for n, driver in networks.items() if driver == "overlay" or n == GWBRIDGE}
    return EngineState(state, frozenset(swarmish))


LEAVE_BUG = "moby/moby#45144"


def names_at_risk(engine: Engine) -> list[str]:
    """Running containers that leaving a swarm would hurt: on Docker 20.10 (and later,
    as of :data:`LEAVE_BUG`), ``docker swarm leave`` drops the embedded-DNS names of
    every container that exists on a user-defined bridge network at that moment -- they
    can no longer resolve each other (measured here: ``getaddrinfo`` fails after 10 s,
    for good). Such containers are another lab's (compose, ``lab.py up``), never ours:
    a stack's tasks are on overlay networks."""
    return on_user_bridges(engine.network_drivers(), engine.running_on_networks())


def on_user_bridges(drivers: Mapping[str, str], running: Mapping[str, Sequence[str]]) -> list[str]:
    """The containers of ``running`` (name -> its networks) attached to a user-defined
    bridge network (``drivers``: network -> driver): not the default ``bridge``, which
    has no embedded DNS, nor ``docker_gwbridge``, a swarm's own egress."""
    user_bridges = {
        name
        for name, driver in drivers.items()
        if driver == "bridge" and name not in ("bridge", GWBRIDGE)
    }
    return sorted(name for name, networks in running.items() if user_bridges.intersection(networks))


def at_risk_message(names: list[str]) -> str:
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return (
        f"{len(names)} running container(s) on bridge networks ({shown}) would lose "
        f"their names for good when the swarm is left ({LEAVE_BUG})"
    )


def ensure_swarm(engine: Engine, progress: Progress, advertise: str = ADVERTISE) -> bool:
    """A swarm on this engine: True if this call created it, False if one was active
    already. It advertises and listens on ``advertise`` (default loopback: a single-node
    swarm reachable from nowhere else; give a host address to let other hosts join)."""
    state, _ = engine.swarm_node()
    if state == "active":
        return False
    if state != "inactive":
        raise LabError(
            f"the engine's swarm is {state!r}: neither active nor inactive; "
            "fix it (docker swarm leave --force) and try again"
        )
    at_risk = names_at_risk(engine)
    if at_risk:
        raise LabError(
            "not making this engine a swarm node: " + at_risk_message(at_risk) + ". Stop "
            "them first (make down, python lab.py down), or init a swarm yourself (then it "
            "is yours and stays)"
        )
    had_gwbridge = GWBRIDGE in engine.network_drivers()
    with progress.step(f"docker swarm init --advertise-addr {advertise}"):
        engine.swarm_init(advertise, f"{advertise}:{SWARM_PORT}")
        _, node = engine.swarm_node()
        labels = engine.node_labels(node)
        labels[CREATED_SWARM] = "1"
        if not had_gwbridge:
            labels[CREATED_GWBRIDGE] = "1"
        engine.set_node_labels(node, labels)
    return True


def leave_if_created(engine: Engine, progress: Progress) -> str:
    """Leave the swarm if :func:`ensure_swarm` created it and no service is left in it
    (someone else's work is not ours to end); remove ``docker_gwbridge`` if the swarm
    brought it. Says what it did."""
    state, node = engine.swarm_node()
    if state != "active":
        return "no swarm"
    labels = engine.node_labels(node)
    if CREATED_SWARM not in labels:
        return "the swarm was there before layer4lab: kept"
    others = engine.services()
    if others:
        names = ", ".join(sorted(str((s.get("Spec") or {}).get("Name")) for s in others))
        return f"the swarm still runs services ({names}): kept"
    at_risk = names_at_risk(engine)
    if at_risk:
        return (
            f"the swarm was kept: {at_risk_message(at_risk)}; run python lab.py swarm "
            "down again once they are gone"
        )
    with progress.step("docker swarm leave --force"):
        engine.swarm_leave()
        wait_until(
            "the engine to leave the swarm",
            lambda: True if engine.swarm_node()[0] == "inactive" else None,
            timeout=30,
        )
    if CREATED_GWBRIDGE in labels:
        with progress.step(f"removing {GWBRIDGE}"):
            wait_until(f"{GWBRIDGE} to be removable", lambda: _remove_gwbridge(engine), timeout=30)
    return "left the swarm it had created"


def _remove_gwbridge(engine: Engine) -> bool | None:
    try:
        engine.remove_network_named(GWBRIDGE)
    except EngineNotFound:
        return True
    except EngineError:  # endpoints still going away
        return None
    return True


def docker_cli(args: list[str], timeout: float = CLI_TIMEOUT) -> str:
    """Run the ``docker`` CLI (``stack`` has no SDK API); its output, or a LabError."""
    docker = shutil.which("docker")
    if docker is None:
        raise LabError("the docker CLI is not on PATH: `docker stack deploy` needs it")
    try:
        done = subprocess.run(  # noqa: S603 -- fixed program, arguments from this module
            [docker, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"docker {' '.join(args[:2])} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        raise LabError(
            f"docker {' '.join(args[:2])} exited {done.returncode}",
            (done.stderr or done.stdout).strip().splitlines()[-8:],
        )
    return done.stdout


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


class Stack:
    """One deployed stack (``docker stack deploy``), read and changed through the SDK."""

    def __init__(self, engine: Engine, name: str, progress: Progress) -> None:
        self.engine = engine
        self.name = name
        self.progress = progress
        self.certificates: Certificates | None = None
        self._tails: dict[str, TailState] = {}
        self._lines: dict[str, list[LogLine]] = {}

    def service(self, short: str) -> str:
        """``upstream`` -> ``layer4lab_upstream``: the name swarm gives a stack's service."""
        return f"{self.name}_{short}"

    # --- deploy and remove ---------------------------------------------------------------------

    def deploy(self, shape: Shape, *, proxy_config: Path = SWARM_PROXY_CONFIG) -> None:
        """Issue the certificates (certgen in a container of its own: the CA key never
        leaves it), write them and the stack into a private temporary directory, deploy,
        and delete the directory (the swarm keeps the secrets, encrypted in its store)."""
        compose = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
        labels = {STACK_LABEL: self.name, "layer4lab.role": "certgen"}
        spec = issue_spec(shape.client_ids())
        with self.progress.step(f"issuing server and {len(shape.client_ids())} client pairs"):
            self.certificates, _ = issue_certificates(
                self.engine, f"{self.name}-certgen", labels, spec
            )
        with tempfile.TemporaryDirectory(prefix="layer4lab-stack-") as tmp:
            directory = Path(tmp)
            directory.chmod(0o700)
            paths: dict[str, str] = {}
            for file_name, data in self.certificates.files.items():
                _write(directory / file_name, data)
                paths[file_name] = str(directory / file_name)
            document = stack_file(
                compose,
                shape,
                name=self.name,
                files=paths,
                proxy_config=str(proxy_config.resolve()),
            )
            stack_path = directory / "stack.yaml"
            _write(stack_path, yaml.safe_dump(document, sort_keys=False).encode("utf-8"))
            with self.progress.step(
                f"docker stack deploy {self.name}: {shape.upstreams} upstreams, "
                f"{shape.clients} clients"
            ):
                docker_cli(
                    [
                        "stack",
                        "deploy",
                        "--compose-file",
                        str(stack_path),
                        "--resolve-image",
                        "never",  # no registry: the images are local
                        "--detach=true",
                        self.name,
                    ]
                )

    def remove(self, timeout: float = 60.0) -> None:
        """``docker stack rm``, then wait until none of its services, containers,
        networks, secrets or configs is left."""
        if self.engine.swarm_node()[0] != "active":
            return
        with self.progress.step(f"docker stack rm {self.name}"):
            docker_cli(["stack", "rm", self.name])
            wait_until(
                f"stack {self.name} to be gone",
                lambda: True if not self.leftovers() else None,
                timeout=timeout,
                evidence=lambda: "\n".join(self.leftovers()),
            )

    def tasks_exist(self) -> bool:
        """Is a stack of this name deployed (any of its services)?"""
        if self.engine.swarm_node()[0] != "active":
            return False
        return bool(self.engine.services(f"{NAMESPACE_LABEL}={self.name}"))

    def leftovers(self) -> list[str]:
        label = f"{NAMESPACE_LABEL}={self.name}"
        found = self.engine.labelled(label) + self.engine.swarm_objects(label)
        return [item.describe() for item in found]

    # --- state -----------------------------------------------------------------------------

    def tasks(self, short: str) -> list[dict[str, Any]]:
        return self.engine.service_tasks(self.service(short))

    def running(self, short: str) -> list[dict[str, Any]]:
        """Tasks that run and are meant to."""
        return [
            t
            for t in self.tasks(short)
            if t.get("DesiredState") == "running"
            and (t.get("Status") or {}).get("State") == "running"
        ]

    def containers(self, short: str) -> list[str]:
        """This engine's containers of a service (running or not), oldest first."""
        found = self.engine.labelled(f"{SERVICE_LABEL}={self.service(short)}")
        return [item.id for item in found if item.kind == "container"]

    def proxy_container(self) -> str | None:
        for task in self.running("proxy"):
            container = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
            if container:
                return str(container)
        return None

    def proxy_healthy(self) -> bool:
        container = self.proxy_container()
        if container is None:
            return False
        try:
            health = (self.engine.state(container).get("Health") or {}).get("Status")
        except EngineNotFound:  # the task's container is being replaced
            return False
        return health == "healthy"

    def wait_ready(self, shape: Shape, timeout: float = 90.0) -> float:
        """Until the proxy is healthy and ``shape.upstreams`` upstreams run; seconds taken."""
        began = time.monotonic()

        def ready() -> bool | None:
            if len(self.running("upstream")) != shape.upstreams:
                return None
            return True if self.proxy_healthy() else None

        with self.progress.step("waiting for the proxy to be healthy and the upstreams to run"):
            wait_until(
                f"stack {self.name} to be ready",
                ready,
                timeout=timeout,
                evidence=self.describe,
            )
        return time.monotonic() - began

    def scale(self, short: str, replicas: int) -> float:
        """Set a service's replicas; the wall time (epoch) it was asked."""
        when = time.time()
        with self.progress.step(f"scaling {short} to {replicas}"):
            self.engine.scale_service(self.service(short), replicas)
        return when

    def wait_running(self, short: str, count: int, timeout: float = 60.0) -> None:
        wait_until(
            f"{count} running task(s) of {short}",
            lambda: True if len(self.running(short)) == count else None,
            timeout=timeout,
            evidence=self.describe,
        )

    def wait_gone(self, short: str, count: int, timeout: float = 60.0) -> None:
        """Until no more than ``count`` containers of ``short`` are left running."""

        def running(container: str) -> bool:
            try:
                return self.engine.state(container).get("Status") == "running"
            except EngineNotFound:  # swarm removed it between the listing and now
                return False

        def few() -> bool | None:
            live = [c for c in self.containers(short) if running(c)]
            return True if len(live) <= count else None

        wait_until(f"{short} down to {count}", few, timeout=timeout, evidence=self.describe)

    def describe(self) -> str:
        lines = []
        for short in ("proxy", "upstream", "client"):
            try:
                tasks = self.tasks(short)
            except EngineError as exc:
                lines.append(f"{short}: {exc}")
                continue
            states: dict[str, int] = {}
            for task in tasks:
                status = task.get("Status") or {}
                key = f"{status.get('State')}->{task.get('DesiredState')}"
                if status.get("Err"):
                    key += f" ({status['Err']})"
                states[key] = states.get(key, 0) + 1
            lines.append(f"{short}: {states}")
        return "\n".join(lines)

    # --- logs and admin ----------------------------------------------------------------------

    def poll(self, short: str) -> list[LogLine]:
        """Every JSON line of a service's containers on this engine so far (new lines are
        appended; a container that swarm removed keeps the lines already read)."""
        lines = self._lines.setdefault(short, [])
        for container in self.containers(short):
            tail = self._tails.setdefault(container, TailState())
            try:
                chunk = self.engine.logs_after(container, tail)
            except EngineNotFound:
                continue
            lines.extend(take_new_lines(chunk, f"{short}/{container[:12]}", tail))
        return lines

    def status(self) -> dict[str, Any] | None:
        """The proxy's ``/status`` (None when it cannot be read)."""
        code, text = self.adminctl("status")
        return parse_record(text) if code == 0 else None

    def adminctl(self, command: str) -> tuple[int, str]:
        container = self.proxy_container()
        if container is None:
            raise LabError("no running proxy task", [self.describe()])
        return self.engine.exec_run(
            container,
            adminctl(command, PROXY_CONFIG_TARGET),
        )


def with_stack(
    engine: Engine,
    name: str,
    progress: Progress,
    body: Callable[[Stack], None],
) -> str:
    """Init a swarm if needed, run ``body`` with a fresh :class:`Stack` (``body``
    deploys it), then remove the stack and leave the swarm if it was created here --
    also when ``body`` fails or is interrupted. Returns what became of the swarm; the
    caller compares :func:`engine_state` before and after, which holds when ``body``
    raised too."""
    stack = Stack(engine, name, progress)
    ensure_swarm(engine, progress)
    note = ""
    try:
        body(stack)
    finally:
        fresh = engine.fresh()
        stack.engine = fresh
        try:
            stack.remove()
        finally:
            note = leave_if_created(fresh, progress)
    return note
