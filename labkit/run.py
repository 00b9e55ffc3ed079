"""One lab run: an isolated network, a volume with the run's certificates and proxy
config, and the topology's containers -- every one of them labelled
``layer4lab.run=<run id>`` so that it can always be found and removed.

A :class:`Run` is a context manager: leaving it (normally, on failure, on Ctrl-C or on
SIGTERM) removes everything carrying its label, with those signals held back until
the removal is done. Readiness is never a fixed sleep: :meth:`Run.wait_for` polls the
containers' logs (and state) until a condition holds or its deadline passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from . import topology as topo
from .certs import (
    EXPORT_DIR,
    ISSUE_SCRIPT,
    Certificates,
    check_prepared,
    files_of_archive,
    issue_spec,
    owned_tar,
)
from .engine import (
    NO_HEALTHCHECK,
    ContainerSpec,
    Engine,
    EngineError,
    EngineNotFound,
    Labelled,
    healthcheck,
)
from .faulting import (
    ActiveFault,
    apply_application,
    apply_network,
    clear_network,
    ctl_command,
    remove_network,
)
from .faults import FaultSpec
from .images import image
from .logs import (
    Access,
    Attempt,
    HealthEvent,
    LogLine,
    TailState,
    access_of,
    attempts_of,
    format_ts,
    health_of,
    health_states,
    parse_docker_timestamp,
    take_new_lines,
)
from .progress import Progress

LABEL_RUN = "layer4lab.run"
LABEL_ROLE = "layer4lab.role"
LABEL_NAME = "layer4lab.name"
LABEL_MODE = "layer4lab.mode"  # scenario | up
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"

POLL_INTERVAL = 0.15
# Containers created, filled and started at once. One after another, 24 upstreams took
# 18 s and 10 client containers 11 s (about 0.75 s and 1.1 s each, on fuse-overlayfs);
# the engine does several at a time well, a few more than the cores it has.
START_WORKERS = 6
STATE_CHECK_EVERY = 1.0  # seconds between checks that waited-on containers still run
CERTGEN_TIMEOUT = 90.0
PROXY_NAME = "proxy"  # the proxy's alias on the front network, and a name in its certificate

T = TypeVar("T")
R = TypeVar("R")


def in_parallel(
    work: Callable[[T], R], items: Sequence[T], workers: int = START_WORKERS
) -> list[R]:
    """``work`` on each item, ``workers`` at a time; the results in the items' order. The
    first failure is raised once every item has been tried (what was created carries
    the run's labels, so the run's removal finds it)."""
    if len(items) <= 1:
        return [work(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as pool:
        futures = [pool.submit(work, item) for item in items]
        return [future.result() for future in futures]


class LabError(RuntimeError):
    """The lab could not do what it was asked; ``evidence`` holds the relevant log lines."""

    def __init__(self, message: str, evidence: Iterable[str] = ()) -> None:
        super().__init__(message)
        self.evidence = list(evidence)


class LabTimeout(LabError):
    """A condition did not hold before its deadline."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP: handled like Ctrl-C (clean up, exit 130)."""


def new_run_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP back (they are delivered afterwards): a second
    Ctrl-C must not cut the cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While inside, SIGINT raises KeyboardInterrupt -- even where the parent started
    us with SIGINT ignored, as a shell does for a background job -- and SIGTERM and
    SIGHUP raise :class:`Interrupted`, so ``finally`` blocks run and clean up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def remove_labelled(
    engine: Engine, label: str, progress: Progress | None = None, *, rounds: int = 3
) -> list[Labelled]:
    """Remove every container, then network, then volume carrying ``label``. Several
    rounds, so that something created while the first round ran is caught too.
    Raises LabError naming whatever is still there at the end."""
    removed: list[Labelled] = []
    errors: list[str] = []
    order = {"container": 0, "network": 1, "volume": 2}

    def remove(item: Labelled) -> str | None:
        """None once it is gone, else why not."""
        try:
            if item.kind == "container":
                engine.remove_container(item.id)
            elif item.kind == "network":
                engine.remove_network(item.id)
            else:
                engine.remove_volume(item.id)
        except EngineNotFound:
            pass
        except EngineError as exc:
            return str(exc)
        return None

    for _ in range(rounds):
        found = sorted(engine.labelled(label), key=lambda item: order[item.kind])
        if not found:
            break
        # Containers at once (one after another, 35 took 10 s), then what they used.
        for kind in ("container", "network", "volume"):
            items = [item for item in found if item.kind == kind]
            for item, problem in zip(items, in_parallel(remove, items), strict=True):
                if problem is not None:
                    errors.append(problem)
                    continue
                removed.append(item)
                if progress is not None:
                    progress.say(f"  removed {item.describe()}")
    left = engine.labelled(label)
    if left:
        raise LabError(
            f"could not remove everything labelled {label}: "
            + ", ".join(item.describe() for item in left),
            errors,
        )
    return removed


@dataclass(slots=True)
class Member:
    """One container of the run and what has been read of its log."""

    name: str  # short name: proxy, u1, client.b
    role: str  # proxy | upstream | client
    container: str  # id
    spec: ContainerSpec
    expect_running: bool = True
    state: TailState = field(default_factory=TailState)
    lines: list[LogLine] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    at: float  # epoch seconds
    kind: str  # phase | fault | recover | health | first_reply | last_reply
    detail: str
    upstream: str | None = None
    state: str | None = None  # health: the state entered (unknown, up, down)

    def to_json(self, origin: float) -> dict[str, Any]:
        return {
            "t": round(self.at - origin, 3),
            "ts": format_ts(self.at),
            "kind": self.kind,
            "upstream": self.upstream,
            "state": self.state,
            "detail": self.detail,
        }


def issue_certificates(
    engine: Engine, name: str, labels: dict[str, str], spec: dict[str, object]
) -> tuple[Certificates, list[str]]:
    """certgen in a container of its own (no network, no volume) issues what ``spec``
    (:func:`~labkit.certs.issue_spec`) asks for; everything but the CA's key is read
    back, and the CA dies with the container. Returns the files and the names created."""
    container = engine.create_container(
        ContainerSpec(
            name=name,
            image=image("certgen"),
            labels=labels,
            entrypoint=["python3", "-c", ISSUE_SCRIPT],
            command=[],
            environment={"LAB_SPEC": json.dumps(spec)},
            network_mode="none",
        )
    )
    try:
        engine.start(container)
        try:
            code = engine.wait(container, CERTGEN_TIMEOUT)
        except EngineError as exc:
            raise LabError(f"certgen did not finish within {CERTGEN_TIMEOUT:.0f}s: {exc}") from exc
        output = take_new_lines(engine.logs(container, None), "certgen", TailState())
        evidence = [line.evidence() for line in output]
        if code != 0:
            raise LabError(f"certgen exited {code}", evidence)
        prepared = next((line.record for line in output if line.event == "prepared"), None)
        if prepared is None:
            raise LabError("certgen printed no summary", evidence)
        problems = check_prepared(prepared.get("files") or {})
        if problems:
            raise LabError("the run's certificates have the wrong modes or owner", problems)
        files = files_of_archive(engine.get_archive(container, EXPORT_DIR))
    finally:
        engine.remove_container(container)
    return Certificates(files), [str(c) for c in prepared.get("created") or []]


def brief(names: Sequence[str], shown: int = 6) -> str:
    """``a, b, c`` -- or, for many, the first few, the last and how many in all."""
    if len(names) <= shown:
        return ", ".join(names)
    return f"{', '.join(names[: shown - 1])}, ..., {names[-1]} ({len(names)} in all)"


def config_text(run_id: str, config: Mapping[str, Any]) -> str:
    """A run's proxy config file: a comment naming the run, then the YAML."""
    return f"# generated by labkit for run {run_id}\n" + yaml.safe_dump(
        dict(config), sort_keys=False
    )


class Run:
    """A topology started on its own network; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
        topology: topo.Topology,
        progress: Progress,
        *,
        run_id: str | None = None,
        mode: str = "scenario",
        keep: bool = False,
        reference: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.topology = topology
        self.progress = progress
        self.id = run_id or new_run_id(topology.name)
        self.mode = mode
        self.keep = keep
        self.reference = reference if reference is not None else topo.load_reference_config()
        self.front = f"l4l-{self.id}-front"  # clients and the proxy
        self.back = f"l4l-{self.id}-back"  # the proxy and the upstreams
        self.certificates: Certificates | None = None
        self.members: dict[str, Member] = {}
        # Client identities by the container (member) that runs them; an identity that
        # has a container of its own is that member, by the same name.
        self.hosts: dict[str, str] = {}
        self._identity_lines: dict[str, list[LogLine]] = {}  # of identities in shared ones
        # Attempts parsed so far, by name: (lines read, attempts). Lines only grow, so
        # each is parsed once (re-parsing every poll cost ~35 ms per 3,000 attempts).
        self._parsed: dict[str, tuple[int, list[Attempt]]] = {}
        self.timeline: list[TimelineEvent] = []
        self.origin = time.time()
        self.config: dict[str, Any] = {}
        self.addresses: topo.Addresses | None = None
        self.closed = False
        self.removed: list[Labelled] = []
        self._faults = 0  # helpers started, for their names
        self.active_faults: dict[str, list[ActiveFault]] = {}  # by target
        self.fault_log: dict[str, list[dict[str, Any]]] = {}  # what helpers said, by target

    # --- context manager: always clean up --------------------------------------------

    def __enter__(self) -> Run:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        interrupted = isinstance(exc, KeyboardInterrupt)
        if self.keep and not interrupted:
            self.progress.say(
                f"--keep: run {self.id} left running; remove it with: python lab.py clean"
            )
            return
        self.close()

    def close(self) -> None:
        """Remove everything labelled with this run's id (signals held meanwhile)."""
        if self.closed:
            return
        with signals_deferred():
            engine = self.engine.fresh()  # an interrupt may have cut a request short
            try:
                with self.progress.step(f"removing run {self.id}"):
                    self.removed = remove_labelled(engine, f"{LABEL_RUN}={self.id}")
                    self.progress.say(f"  removed {len(self.removed)} labelled object(s)")
            finally:
                if engine is not self.engine:
                    engine.close()
            self.closed = True

    # --- naming ----------------------------------------------------------------------

    def labels(self, role: str, name: str) -> dict[str, str]:
        return {
            LABEL_RUN: self.id,
            LABEL_ROLE: role,
            LABEL_NAME: name,
            LABEL_MODE: self.mode,
            "layer4lab.topology": self.topology.name,
            # Images built by `docker compose build` carry the compose project's labels,
            # and containers inherit them: without this, `docker compose down
            # --remove-orphans` (make down) would take a run's containers for orphans.
            COMPOSE_PROJECT_LABEL: "",
        }

    def container_name(self, name: str) -> str:
        return f"l4l-{self.id}-{name}"

    def mark(
        self, kind: str, detail: str, upstream: str | None = None, at: float | None = None
    ) -> float:
        moment = time.time() if at is None else at
        self.timeline.append(TimelineEvent(moment, kind, detail, upstream))
        return moment

    # --- start-up --------------------------------------------------------------------

    def start(self, *, clients: bool = True) -> None:
        """Network, volume (certificates + proxy config), upstreams, proxy, clients."""
        containers = len(self.topology.containers())
        shared = "" if containers == len(self.topology.clients) else f" in {containers} containers"
        self.progress.say(
            f"run {self.id}: topology {self.topology.name} "
            f"({len(self.topology.upstreams)} upstreams, {len(self.topology.clients)} clients"
            f"{shared})"
        )
        with self.progress.step("creating the run's networks (front and back)"):
            self._create_networks()
        with self.progress.step("issuing certificates (certgen)"):
            self._issue_certificates()
        assert self.addresses is not None
        upstreams = {
            name: f"{ip}:{topo.UPSTREAM_PORT}" for name, ip in self.addresses.upstreams.items()
        }
        self.config = topo.proxy_config(self.reference, self.topology, upstreams)
        self._start_upstreams()
        self._start_proxy()
        if clients:
            self.start_clients([c.id for c in self.topology.clients if c.autostart])

    def _create_network(self, name: str, role: str) -> str:
        """Create an internal network on a subnet the engine picks; its subnet."""
        labels = self.labels("network", role)
        last: Exception | None = None
        for attempt in range(3):
            # Let the engine pick a free subnet (its pools know the host's routes), then
            # create the real network with that subnet given, so addresses can be fixed.
            probe = self.engine.create_network(f"{name}-probe{attempt}", labels)
            try:
                subnet = self.engine.network_subnet(probe)
            finally:
                self.engine.remove_network(probe)
            try:
                self.engine.create_network(
                    name, labels, subnet=subnet, gateway=topo.gateway(subnet)
                )
            except EngineError as exc:  # e.g. another network took that subnet meanwhile
                last = exc
                continue
            return subnet
        raise LabError(f"cannot create network {name}: {last}")

    def _create_networks(self) -> None:
        front = self._create_network(self.front, "front")
        back = self._create_network(self.back, "back")
        self.addresses = topo.assign_addresses(
            front,
            back,
            self.topology.upstream_names(),
            [c.name for c in self.topology.containers()],
        )
        self.progress.say(
            f"  networks {self.front} {front} (clients, proxy) and {self.back} {back} "
            "(proxy, upstreams), both internal"
        )

    def _issue_certificates(self) -> None:
        """certgen in a container of its own: what the topology needs."""
        spec = issue_spec(
            self.topology.own_cert_clients(),
            list(self.topology.expired),
            list(self.topology.other_ca),
        )
        self.certificates, created = issue_certificates(
            self.engine, self.container_name("certgen"), self.labels("certgen", "certgen"), spec
        )
        self.progress.say(
            f"  issued {brief(created)} "
            f"+ expired {list(self.topology.expired)} + other CA {list(self.topology.other_ca)}; "
            "each container gets only its own pairs (keys 0600, uid 10001)"
        )

    @staticmethod
    def _config_archive(text: str) -> bytes:
        # Owned by root, 0644: the proxy (uid 10001) reads its config and cannot change it.
        return owned_tar({topo.PROXY_CONFIG_PATH: (text.encode("utf-8"), 0o644)}, uid=0)

    def write_proxy_config(self, config: Mapping[str, Any], why: str) -> str:
        """Replace the proxy's config file (inside its container) without telling the
        proxy. Returns the SHA-256 of the file's bytes, which the proxy logs when it
        loads it."""
        text = config_text(self.id, config)
        with self.progress.step(f"writing the proxy config: {why}"):
            self.engine.put_archive(self.members["proxy"].container, self._config_archive(text))
        self.mark("phase", f"proxy config written: {why}")
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def exec(self, name: str, command: list[str]) -> tuple[int, str]:
        """``docker exec`` in a member's container: the exit code and the output."""
        return self.engine.exec_run(self.members[name].container, command)

    def adminctl(self, command: str) -> tuple[int, str]:
        """``python3 -m l4proxy.adminctl ready|status|metrics|reload`` in the proxy."""
        return self.exec(
            "proxy",
            topo.adminctl(command),
        )

    def _add(
        self,
        name: str,
        role: str,
        spec: ContainerSpec,
        files: Mapping[str, tuple[bytes, int]] | None = None,
        *,
        also: tuple[str, str] | None = None,
        before_start: Callable[[str], None] | None = None,
    ) -> Member:
        """Create, copy ``files`` in (owned by the services' uid), connect to the second
        network ``also`` (name, ip) if any, then start."""
        member = self._create(name, role, spec, files, also=also, before_start=before_start)
        self.members[name] = member
        return member

    def _add_all(
        self, items: Sequence[tuple[str, str, ContainerSpec, Mapping[str, tuple[bytes, int]]]]
    ) -> list[Member]:
        """:meth:`_add` for several (name, role, spec, files) at once."""
        members = in_parallel(lambda item: self._create(*item), items)
        for member in members:
            self.members[member.name] = member
        return members

    def _create(
        self,
        name: str,
        role: str,
        spec: ContainerSpec,
        files: Mapping[str, tuple[bytes, int]] | None = None,
        *,
        also: tuple[str, str] | None = None,
        before_start: Callable[[str], None] | None = None,
    ) -> Member:
        container = self.engine.create_container(spec)
        member = Member(name, role, container, spec)
        if files:
            self.engine.put_archive(container, owned_tar(files))
        if also is not None:
            self.engine.connect_network(also[0], container, also[1], spec.aliases)
        if before_start is not None:
            before_start(container)
        self.engine.start(container)
        return member

    def _start_upstreams(self) -> None:
        assert self.addresses is not None
        names = self.topology.upstream_names()
        items: list[tuple[str, str, ContainerSpec, Mapping[str, tuple[bytes, int]]]] = []
        for upstream in self.topology.upstreams:
            sysctls = None
            if upstream.somaxconn is not None:
                sysctls = {"net.core.somaxconn": str(upstream.somaxconn)}
            spec = ContainerSpec(
                name=self.container_name(upstream.name),
                image=image("upstream"),
                labels=self.labels("upstream", upstream.name),
                environment=upstream.environment(
                    topo.upstream_proxy_protocol(self.config, upstream.name),
                    trusted_proxy=self.addresses.proxy_back,
                ),
                network=self.back,
                ip=self.addresses.upstreams[upstream.name],
                aliases=[upstream.name],
                sysctls=sysctls,
                # Nothing here reads an upstream's container health (the run waits for
                # its `listening` line, the proxy checks it), and the image's check
                # starts a Python every 5 s: at 24 upstreams that was most of their CPU.
                healthcheck=NO_HEALTHCHECK,
            )
            items.append((upstream.name, "upstream", spec, {}))
        with self.progress.step(f"starting upstreams {brief(names, 12)}"):
            self._add_all(items)
        self.wait_for(
            "every upstream to log 'listening'",
            lambda: all(self.events(n, "listening") for n in names) or None,
            timeout=30,
            sources=names,
        )

    def _start_proxy(self) -> None:
        assert self.addresses is not None
        assert self.certificates is not None
        config = self._config_archive(config_text(self.id, self.config))
        with self.progress.step("starting the proxy (front and back)"):
            self._add(
                "proxy",
                "proxy",
                ContainerSpec(
                    name=self.container_name("proxy"),
                    image=image("proxy"),
                    labels=self.labels("proxy", "proxy"),
                    command=["--config", topo.PROXY_CONFIG_PATH],
                    network=self.front,
                    ip=self.addresses.proxy_front,
                    aliases=["proxy"],
                    # /ready every second, from a bare Python (not the image's adminctl,
                    # which reads the config: 7 times the CPU, and the run is long).
                    healthcheck=healthcheck(
                        topo.ready_probe(self.config),
                        interval=1.0,
                        timeout=3.0,
                        retries=3,
                        start_period=20.0,
                    ),
                ),
                self.certificates.for_proxy(),
                also=(self.back, self.addresses.proxy_back),
                before_start=lambda container: self.engine.put_archive(container, config),
            )
        names = self.topology.upstream_names()
        self.wait_for(
            "the proxy to log 'listening'",
            lambda: self.events("proxy", "listening") or None,
            timeout=30,
            sources=["proxy"],
        )
        self.wait_for(
            f"the proxy's first health checks to mark {', '.join(names)} up",
            lambda: all(self.health_state(n) == "up" for n in names) or None,
            timeout=15,
            sources=["proxy"],
        )
        self.wait_for(
            "the proxy container's health status 'healthy'",
            lambda: self.container_health("proxy") == "healthy" or None,
            timeout=30,
            sources=["proxy"],
        )
        self.mark("phase", "proxy ready: every upstream up")

    def start_clients(self, ids: Sequence[str] | None = None) -> None:
        """Start the containers of the identities ``ids`` (all by default; whole
        containers only), each with the pairs of its identities, and wait until every
        identity has logged 'started'."""
        assert self.addresses is not None
        assert self.certificates is not None
        try:
            containers = self.topology.containers(ids)
        except topo.TopologyError as exc:
            raise LabError(str(exc)) from None
        if not containers:
            return
        # By address: a name would cost a look-up in the engine's DNS per attempt
        # (1.4 ms and ~0.3 ms of the engine's CPU each; 200 identities make ~130 a
        # second). The proxy's certificate is still verified against its name.
        proxy = f"{self.addresses.proxy_front}:{topo.PROXY_PORT}"
        began = time.time()
        names = [i for container in containers for i in container.ids]
        items = [
            (
                container.name,
                "client",
                ContainerSpec(
                    name=self.container_name(container.name),
                    image=image("client"),
                    labels=self.labels("client", container.name),
                    command=container.command(proxy, server_name=PROXY_NAME),
                    network=self.front,
                    ip=self.addresses.clients[container.name],
                ),
                self.certificates.for_clients(container.cert_stems),
            )
            for container in containers
        ]
        with self.progress.step(f"starting clients {brief(names)}"):
            for container, member in zip(containers, self._add_all(items), strict=True):
                member.expect_running = not container.finite
                for client_id in container.ids:
                    self.hosts[client_id] = container.name
        self.wait_for(
            "every client to log 'started'",
            lambda: all(self.events(n, "started") for n in names) or None,
            timeout=30,
            sources=names,
        )
        self.mark("phase", f"clients started: {brief(names)}", at=began)

    # --- logs ------------------------------------------------------------------------

    def member_names(self, names: Iterable[str]) -> list[str]:
        """The members (containers) behind ``names``: members or client identities."""
        return list(dict.fromkeys(self.hosts.get(name, name) for name in names))

    def poll(self, names: Iterable[str] | None = None) -> None:
        """Read what the containers (of ``names``: members or identities) logged since
        the last poll; a shared client container's lines are also filed by identity."""
        for name in self.members if names is None else self.member_names(names):
            member = self.members[name]
            try:
                chunk = self.engine.logs_after(member.container, member.state)
            except EngineNotFound:
                continue
            fresh = take_new_lines(chunk, name, member.state)
            member.lines.extend(fresh)
            if member.role == "client":
                self._file_by_identity(name, fresh)

    def _file_by_identity(self, container: str, fresh: list[LogLine]) -> None:
        for line in fresh:
            client = line.record.get("client") if line.record else None
            if (
                isinstance(client, str)
                and client != container
                and self.hosts.get(client) == container
            ):
                self._identity_lines.setdefault(client, []).append(line)

    def lines(self, name: str) -> list[LogLine]:
        """A member's lines, or a client identity's (its lines in a shared container)."""
        member = self.members.get(name)
        if member is not None:
            return member.lines
        return self._identity_lines.get(name, [])

    def events(self, name: str, event: str, since: float | None = None) -> list[LogLine]:
        return [
            line
            for line in self.lines(name)
            if line.event == event and (since is None or line.ts >= since)
        ]

    def topology_client_ids(self) -> list[str]:
        return [c.id for c in self.topology.clients]

    def client_names(self) -> list[str]:
        """The client identities started so far (in the topology's order)."""
        return [c.id for c in self.topology.clients if c.id in self.hosts]

    def attempts(self, clients: Iterable[str] | None = None) -> list[Attempt]:
        """The attempts of ``clients`` (identities; all by default), by when they ended."""
        names = self.client_names() if clients is None else list(clients)
        found: list[Attempt] = []
        for name in names:
            found.extend(self._attempts_of(name))
        return sorted(found, key=lambda a: a.end)

    def _attempts_of(self, name: str) -> list[Attempt]:
        lines = self.lines(name)
        done, parsed = self._parsed.get(name, (0, []))
        if done < len(lines):
            parsed = parsed + attempts_of(lines[done:])
            self._parsed[name] = (len(lines), parsed)
        return parsed

    def access(self) -> list[Access]:
        return access_of(self.lines("proxy"))

    def health(self) -> list[HealthEvent]:
        return health_of(self.lines("proxy"))

    def health_state(self, upstream: str) -> str | None:
        return health_states(self.health()).get(upstream)

    def tail(self, name: str, count: int = 8) -> list[str]:
        return [line.evidence() for line in self.lines(name)[-count:]]

    def container_health(self, name: str) -> str | None:
        health = self.engine.state(self.members[name].container).get("Health") or {}
        status = health.get("Status")
        return str(status) if status else None

    # --- waiting ---------------------------------------------------------------------

    def wait_for(
        self,
        what: str,
        probe: Callable[[], T | None],
        *,
        timeout: float,
        sources: Sequence[str] | None = None,
        evidence: Callable[[], list[str]] | None = None,
        quiet: bool = False,
    ) -> T:
        """Poll ``sources``' logs until ``probe()`` returns something other than None
        (returned), or raise LabTimeout after ``timeout`` seconds with evidence. A
        waited-on container that stops unexpectedly fails the wait at once."""
        if not quiet:
            self.progress.say(f"waiting for {what} (deadline {timeout:.0f}s)")
        began = time.monotonic()
        deadline = began + timeout
        next_state_check = began + STATE_CHECK_EVERY
        names = list(self.members) if sources is None else list(sources)
        while True:
            self.poll(names)
            value = probe()
            now = time.monotonic()
            if value is not None:
                if not quiet:
                    self.progress.say(f"  ok after {now - began:.2f}s: {what}")
                return value
            if now >= deadline:
                shown = evidence() if evidence is not None else self._evidence(names)
                raise LabTimeout(f"timed out after {timeout:.1f}s waiting for {what}", shown)
            if now >= next_state_check:
                next_state_check = now + STATE_CHECK_EVERY
                self._check_running(names)
            time.sleep(POLL_INTERVAL)

    def _evidence(self, names: Sequence[str]) -> list[str]:
        shown: list[str] = []
        for name in names:
            shown.extend(self.tail(name, 6))
        return shown

    def _check_running(self, names: Sequence[str]) -> None:
        for name in self.member_names(names):
            member = self.members.get(name)
            if member is None or not member.expect_running:
                continue
            state = self.engine.state(member.container)
            if not state.get("Running"):
                self.poll([name])
                raise LabError(
                    f"{name} stopped unexpectedly (status {state.get('Status')}, "
                    f"exit code {state.get('ExitCode')})",
                    self.tail(name, 12),
                )

    # --- faults ----------------------------------------------------------------------

    def _fault(self, kind: str, name: str, what: str, action: Callable[[str], None]) -> float:
        member = self.members[name]
        at = time.time()
        action(member.container)
        self.progress.say(f"{kind.upper()}: {what} {name}")
        return self.mark(kind, f"{what} {name}", upstream=name, at=at)

    def kill(self, name: str) -> float:
        self.members[name].expect_running = False
        return self._fault("fault", name, "docker kill (SIGKILL)", self.engine.kill)

    def stop(self, name: str) -> float:
        """``docker stop``: the process gets SIGTERM and exits by itself (or is killed
        10 s later)."""
        self.members[name].expect_running = False
        return self._fault("fault", name, "docker stop (SIGTERM)", self.engine.stop)

    def restart(self, name: str) -> float:
        at = self._fault("recover", name, "docker start", self.engine.start)
        self.members[name].expect_running = True
        return at

    def pause(self, name: str) -> float:
        return self._fault("fault", name, "docker pause", self.engine.pause)

    def signal(self, name: str, signal_name: str, *, stops: bool = False) -> float:
        """``docker kill --signal``; ``stops``: the container is expected to exit."""
        if stops:
            self.members[name].expect_running = False
        return self._fault(
            "fault",
            name,
            f"docker kill --signal {signal_name}",
            lambda container: self.engine.kill(container, signal_name),
        )

    def wait_exit(self, name: str, timeout: float) -> tuple[int, float | None]:
        """Wait for a member's container to exit: its exit code and when it exited
        (epoch seconds, from the engine). LabTimeout if it is still running."""
        member = self.members[name]
        member.expect_running = False
        try:
            code = self.engine.wait(member.container, timeout)
        except EngineError as exc:
            self.poll([name])
            raise LabTimeout(
                f"{name} did not exit within {timeout:.1f}s: {exc}", self.tail(name, 12)
            ) from exc
        finished = str(self.engine.state(member.container).get("FinishedAt") or "")
        try:
            at: float | None = parse_docker_timestamp(finished) / 1e9
        except ValueError:
            at = None
        return code, at

    def unpause(self, name: str) -> float:
        return self._fault("recover", name, "docker unpause", self.engine.unpause)

    def disconnect(self, name: str) -> float:
        return self._fault(
            "fault",
            name,
            f"docker network disconnect {self.back}",
            lambda container: self.engine.disconnect_network(self.back, container),
        )

    def reconnect(self, name: str) -> float:
        member = self.members[name]
        ip = member.spec.ip or ""
        return self._fault(
            "recover",
            name,
            f"docker network connect --ip {ip} {self.back}",
            lambda container: self.engine.connect_network(
                self.back, container, ip, member.spec.aliases
            ),
        )

    # --- faults in the shared vocabulary (labkit.faults) ------------------------------

    def apply_fault(self, target: str, spec: FaultSpec) -> ActiveFault:
        """Apply ``spec`` to member ``target``: a network fault through a helper in its
        namespace, an application fault through its control socket, an engine fault
        through the engine. On the timeline as a fault; :meth:`clear_fault` undoes it."""
        member = self.members[target]
        if spec.family == "network":
            self._faults += 1
            with self.progress.step(f"FAULT: {spec.describe()} on {target}"):
                active = apply_network(
                    self.engine,
                    member.container,
                    target,
                    spec,
                    labels=self.labels("fault", f"fault-{self._faults}"),
                    name=self.container_name(f"fault-{self._faults}"),
                )
        elif spec.family == "application":
            with self.progress.step(f"FAULT: {spec.describe()} on {target} (upstream.ctl)"):
                active = apply_application(lambda command: self.exec(target, command), target, spec)
        else:
            inject = {"kill": self.kill, "stop": self.stop, "pause": self.pause}
            done = inject.get(spec.kind, self.disconnect)(target)
            return ActiveFault(target, spec.describe(), "engine", done, None, kind=spec.kind)
        self.mark("fault", f"{spec.describe()} on {target}", upstream=target, at=active.applied)
        self.active_faults.setdefault(target, []).append(active)
        return active

    def clear_faults(self, target: str) -> float:
        """Undo every fault :meth:`apply_fault` applied to ``target``; when (epoch s)."""
        at = time.time()
        for active in self.active_faults.pop(target, []):
            at = self.clear_fault(active)
        return at

    def clear_fault(self, active: ActiveFault) -> float:
        """Undo a fault :meth:`apply_fault` applied (a no-op for one whose time is up,
        but still on the timeline)."""
        target = active.target
        if active.family == "network" and active.helper is not None:
            with self.progress.step(f"removing {active.description} from {target}"):
                said = remove_network(self.engine, active.helper)
                if said is not None:  # when the rules were gone, by the helper's clock
                    self.fault_log.setdefault(target, []).extend(said)
                    for line in said:
                        if line.get("event") == "flap":
                            kind = "fault" if line.get("state") == "on" else "recover"
                            self.mark(kind, f"flap {line.get('state')}", target, line["ts"])
                    at = float(said[-1].get("ts") or time.time())
                    return self.mark("recover", f"{active.description} removed", target, at)
                # The helper could not say: clear by other means.
                self._faults += 1
                clear_network(
                    self.engine,
                    self.members[target].container,
                    self.labels("fault", f"fault-{self._faults}"),
                    self.container_name(f"fault-{self._faults}"),
                )
        elif active.family == "application":
            self.exec(target, ctl_command(None, "clear"))
        else:
            recover = {"kill": self.restart, "stop": self.restart, "pause": self.unpause}
            return recover.get(active.kind, self.reconnect)(target)
        return self.mark("recover", f"{active.description} removed from {target}", target)

    # --- stopping --------------------------------------------------------------------

    def stop_clients(self, grace: float = 8.0, names: Iterable[str] | None = None) -> None:
        """SIGTERM to every client (or those ``names``) still running (attempts in flight
        finish), then wait for each to exit and read its last lines (the summary). A
        container running several identities is stopped as a whole (``names`` must name
        all of them)."""
        if names is not None:
            names = list(names)
            try:  # whole containers only
                self.topology.containers([n for n in names if n in self.hosts])
            except topo.TopologyError as exc:
                raise LabError(str(exc)) from None
        wanted = None if names is None else set(self.member_names(names))
        members = [
            m
            for m in self.members.values()
            if m.role == "client" and (wanted is None or m.name in wanted)
        ]
        if not members:
            return
        with self.progress.step("stopping the clients (SIGTERM; attempts in flight finish)"):
            for member in members:
                member.expect_running = False
                with contextlib.suppress(EngineError):  # already exited (--count, --duration)
                    self.engine.kill(member.container, "SIGTERM")
            for member in members:
                try:
                    self.engine.wait(member.container, grace)
                except EngineError:
                    with contextlib.suppress(EngineError):
                        self.engine.kill(member.container)
            self.poll()
