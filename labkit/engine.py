"""A small typed wrapper around the Docker SDK for Python (docker-py 7.x).

docker-py ships no type information, so it is imported in this one module only; the
rest of labkit sees :class:`Engine`, :class:`ContainerSpec` and plain values. Every
SDK or transport error comes out as :class:`EngineError` (:class:`EngineNotFound` for
a missing object) with a message naming what was being done.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import docker  # type: ignore[import-untyped]

from .logs import TailState, tail_reaches

NS = 1_000_000_000  # the engine's durations are nanoseconds


class EngineError(RuntimeError):
    """The Docker engine refused or failed a request."""


class EngineNotFound(EngineError):
    """The container, network, volume or image does not exist."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached at all."""


@contextlib.contextmanager
def _api(what: str) -> Iterator[None]:
    try:
        yield
    except docker.errors.NotFound as exc:
        raise EngineNotFound(f"{what}: {_explain(exc)}") from exc
    except docker.errors.DockerException as exc:
        raise EngineError(f"{what}: {_explain(exc)}") from exc
    except OSError as exc:  # requests' errors are OSErrors: the socket, a timeout
        raise EngineError(f"{what}: {type(exc).__name__}: {exc}") from exc


def _explain(exc: BaseException) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc).strip()


@dataclass(slots=True)
class ContainerSpec:
    """What to create: one container of a run."""

    name: str
    image: str
    labels: dict[str, str]
    command: list[str] | None = None
    entrypoint: list[str] | None = None
    environment: dict[str, str] = field(default_factory=dict)
    network: str | None = None  # a network to attach to (with ``ip`` and ``aliases``)
    network_mode: str | None = None  # e.g. "none" for a container with no network
    ip: str | None = None
    aliases: list[str] = field(default_factory=list)
    volumes: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (path, ro|rw)
    healthcheck: dict[str, Any] | None = None
    sysctls: dict[str, str] | None = None
    cap_add: list[str] | None = None
    cap_drop: list[str] | None = None


# Turns off an image's HEALTHCHECK for one container.
NO_HEALTHCHECK: dict[str, Any] = {"test": ["NONE"]}


def healthcheck(
    test: list[str], *, interval: float, timeout: float, retries: int, start_period: float
) -> dict[str, Any]:
    return {
        "test": ["CMD", *test],
        "interval": int(interval * NS),
        "timeout": int(timeout * NS),
        "retries": retries,
        "start_period": int(start_period * NS),
    }


@dataclass(frozen=True, slots=True)
class Labelled:
    """A container, network or volume found by label."""

    kind: str  # container | network | volume
    id: str
    name: str
    labels: dict[str, str]
    state: str = ""

    def describe(self) -> str:
        state = f" ({self.state})" if self.state else ""
        return f"{self.kind} {self.name}{state}"


class Engine:
    """The engine, through docker-py's low-level API client."""

    def __init__(self, client: Any, timeout: int) -> None:
        self._client = client
        self._api = client.api
        self._timeout = timeout

    @classmethod
    def connect(cls, timeout: int = 60) -> Engine:
        """Connect as the docker CLI would (DOCKER_HOST, ...) and ping the engine."""
        problem = ""
        # docker-py does not close a socket whose connect() failed (e.g. no daemon at
        # the socket path); collect it here, quietly, instead of leaking a
        # ResourceWarning into the caller (pytest runs with warnings as errors).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            client: Any = None
            try:
                client = docker.from_env(timeout=timeout)
                client.ping()
            except (docker.errors.DockerException, OSError) as exc:
                problem = _explain(exc)
                if client is not None:
                    client.close()
                client = None
            if client is None:
                gc.collect()
        if client is None:
            host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock (default)")
            raise EngineUnavailable(
                f"cannot reach the Docker engine at {host}: {problem}. Is the daemon "
                "running, and may this user use it (root or the docker group)?"
            )
        return cls(client, timeout)

    def fresh(self) -> Engine:
        """A new connection: after an interrupt the old one may be mid-request."""
        try:
            return Engine.connect(self._timeout)
        except EngineUnavailable:
            return self

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def version(self) -> str:
        with _api("reading the engine version"):
            return str(self._api.version().get("Version", "?"))

    # --- images -----------------------------------------------------------------------------

    def image_exists(self, ref: str) -> bool:
        try:
            with _api(f"inspecting image {ref}"):
                self._api.inspect_image(ref)
        except EngineNotFound:
            return False
        return True

    def build_image(
        self,
        *,
        context: str,
        dockerfile: str,
        tag: str,
        buildargs: dict[str, str],
        labels: dict[str, str],
        on_line: Callable[[str], None],
    ) -> None:
        """``docker build -f DOCKERFILE --build-arg ... -t TAG CONTEXT`` (never pulls)."""
        with _api(f"building {tag}"):
            for chunk in self._api.build(
                path=context,
                dockerfile=dockerfile,
                tag=tag,
                buildargs=buildargs,
                labels=labels,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
            ):
                if "error" in chunk:
                    detail = chunk.get("errorDetail", {}).get("message") or chunk["error"]
                    raise EngineError(f"building {tag}: {detail}")
                text = str(chunk.get("stream") or chunk.get("status") or "").rstrip()
                if text:
                    on_line(text)

    # --- networks and volumes ---------------------------------------------------------------

    def create_network(
        self,
        name: str,
        labels: dict[str, str],
        *,
        subnet: str | None = None,
        gateway: str | None = None,
        internal: bool = True,
    ) -> str:
        ipam = None
        if subnet is not None:
            pool = docker.types.IPAMPool(subnet=subnet, gateway=gateway)
            ipam = docker.types.IPAMConfig(pool_configs=[pool])
        with _api(f"creating network {name}"):
            result = self._api.create_network(
                name, driver="bridge", internal=internal, labels=labels, ipam=ipam
            )
        return str(result["Id"])

    def network_subnet(self, network_id: str) -> str:
        with _api(f"inspecting network {network_id[:12]}"):
            attrs = self._api.inspect_network(network_id)
        configs = (attrs.get("IPAM") or {}).get("Config") or []
        for config in configs:
            if "." in str(config.get("Subnet", "")):
                return str(config["Subnet"])
        raise EngineError(f"network {attrs.get('Name')} has no IPv4 subnet")

    def remove_network(self, network_id: str) -> None:
        with _api(f"removing network {network_id[:12]}"):
            self._api.remove_network(network_id)

    def connect_network(self, network: str, container: str, ip: str, aliases: list[str]) -> None:
        with _api(f"connecting {container[:12]} to {network}"):
            self._api.connect_container_to_network(
                container, network, ipv4_address=ip, aliases=aliases
            )

    def disconnect_network(self, network: str, container: str) -> None:
        with _api(f"disconnecting {container[:12]} from {network}"):
            self._api.disconnect_container_from_network(container, network, force=True)

    def create_volume(self, name: str, labels: dict[str, str]) -> str:
        with _api(f"creating volume {name}"):
            result = self._api.create_volume(name=name, driver="local", labels=labels)
        return str(result["Name"])

    def remove_volume(self, name: str) -> None:
        with _api(f"removing volume {name}"):
            self._api.remove_volume(name, force=True)

    # --- containers ---------------------------------------------------------------------------

    def create_container(self, spec: ContainerSpec) -> str:
        binds = {vol: {"bind": path, "mode": mode} for vol, (path, mode) in spec.volumes.items()}
        with _api(f"creating container {spec.name}"):
            host_config = self._api.create_host_config(
                binds=binds or None,
                network_mode=spec.network or spec.network_mode,
                sysctls=spec.sysctls,
                cap_add=spec.cap_add,
                cap_drop=spec.cap_drop,
                log_config=docker.types.LogConfig(type="json-file", config={"max-size": "50m"}),
            )
            networking = None
            if spec.network is not None:
                endpoint = self._api.create_endpoint_config(
                    ipv4_address=spec.ip, aliases=spec.aliases or None
                )
                networking = self._api.create_networking_config({spec.network: endpoint})
            result = self._api.create_container(
                spec.image,
                command=spec.command,
                entrypoint=spec.entrypoint,
                name=spec.name,
                environment=spec.environment or None,
                labels=spec.labels,
                host_config=host_config,
                networking_config=networking,
                healthcheck=spec.healthcheck,
                detach=True,
            )
        return str(result["Id"])

    def start(self, container: str) -> None:
        with _api(f"starting {container[:12]}"):
            self._api.start(container)

    def kill(self, container: str, signal: str = "SIGKILL") -> None:
        with _api(f"sending {signal} to {container[:12]}"):
            self._api.kill(container, signal=signal)

    def stop(self, container: str, timeout: int = 10) -> None:
        """``docker stop``: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        with _api(f"stopping {container[:12]}"):
            self._api.stop(container, timeout=timeout)

    def pause(self, container: str) -> None:
        with _api(f"pausing {container[:12]}"):
            self._api.pause(container)

    def unpause(self, container: str) -> None:
        with _api(f"unpausing {container[:12]}"):
            self._api.unpause(container)

    def wait(self, container: str, timeout: float) -> int:
        """Wait for the container to exit; its exit code. EngineError on timeout."""
        with _api(f"waiting for {container[:12]} to exit"):
            result = self._api.wait(container, timeout=timeout)
        return int(result.get("StatusCode", -1))

    def exec_run(self, container: str, command: list[str]) -> tuple[int, str]:
        """``docker exec CONTAINER COMMAND...``: the exit code and stdout + stderr."""
        with _api(f"running {command[:4]} in {container[:12]}"):
            created = self._api.exec_create(container, command, stdout=True, stderr=True)
            output = self._api.exec_start(created["Id"])
            code = self._api.exec_inspect(created["Id"]).get("ExitCode")
        text = bytes(output or b"").decode("utf-8", errors="replace")
        return (-1 if code is None else int(code)), text

    def put_archive(self, container: str, data: bytes) -> None:
        """Extract a tar at ``/`` in a container (created or running)."""
        with _api(f"copying files into {container[:12]}"):
            if not self._api.put_archive(container, "/", data):
                raise EngineError(f"copying files into {container[:12]}: refused")

    def get_archive(self, container: str, path: str) -> bytes:
        """``path`` of a container (running or exited) as a tar."""
        with _api(f"copying {path} out of {container[:12]}"):
            stream, _ = self._api.get_archive(container, path)
            return b"".join(stream)

    def remove_container(self, container: str) -> None:
        with _api(f"removing container {container[:12]}"):
            self._api.remove_container(container, force=True, v=True)

    def state(self, container: str) -> dict[str, Any]:
        with _api(f"inspecting {container[:12]}"):
            attrs = self._api.inspect_container(container)
        return dict(attrs.get("State") or {})

    def addresses(self, container: str) -> dict[str, str]:
        """The container's IPv4 address on each network it is attached to."""
        with _api(f"inspecting {container[:12]}"):
            attrs = self._api.inspect_container(container)
        networks = (attrs.get("NetworkSettings") or {}).get("Networks") or {}
        return {str(name): str(n.get("IPAddress") or "") for name, n in networks.items()}

    def logs(self, container: str, since: float | None, *, tail: int | None = None) -> str:
        """stdout and stderr, each line prefixed with the engine's timestamp: from
        ``since`` on (None: from the start), or the last ``tail`` lines."""
        with _api(f"reading the logs of {container[:12]}"):
            data = self._api.logs(
                container,
                stdout=True,
                stderr=True,
                timestamps=True,
                since=since,
                tail="all" if tail is None else tail,
            )
        return bytes(data).decode("utf-8", errors="replace")

    def logs_after(self, container: str, state: TailState, since: float | None = None) -> str:
        """The end of a log that holds every line ``state`` has not seen (for
        :func:`~labkit.logs.take_new_lines`): the first time, the log from ``since``
        (None: all of it); then its last lines, more of them until they reach back to
        what was seen (:meth:`TailState.tail`: a ``since`` query costs the engine the
        whole log each time, a ``tail`` only the lines it returns)."""
        asked = state.tail()
        if asked is None:
            return self.logs(container, since)
        while True:
            chunk = self.logs(container, None, tail=asked)
            if tail_reaches(chunk, asked, state):
                return chunk
            asked *= 8

    # --- finding things by label ---------------------------------------------------------------

    def labelled(self, label: str) -> list[Labelled]:
        """Every container, network and volume carrying ``label`` (``key`` or ``key=value``)."""
        found: list[Labelled] = []
        with _api(f"listing containers labelled {label}"):
            for item in self._api.containers(all=True, filters={"label": label}):
                names = item.get("Names") or [item["Id"][:12]]
                found.append(
                    Labelled(
                        "container",
                        item["Id"],
                        str(names[0]).lstrip("/"),
                        dict(item.get("Labels") or {}),
                        str(item.get("State", "")),
                    )
                )
        with _api(f"listing networks labelled {label}"):
            for item in self._api.networks(filters={"label": label}):
                found.append(
                    Labelled("network", item["Id"], item["Name"], dict(item.get("Labels") or {}))
                )
        with _api(f"listing volumes labelled {label}"):
            volumes = (self._api.volumes(filters={"label": label}) or {}).get("Volumes") or []
            for item in volumes:
                found.append(
                    Labelled("volume", item["Name"], item["Name"], dict(item.get("Labels") or {}))
                )
        return found

    # --- swarm (labkit.swarm) ---------------------------------------------------------------------

    def swarm_node(self) -> tuple[str, str]:
        """This engine's swarm state (``inactive``, ``active``, ``pending``, ``error``,
        ``locked``) and its node id (``""`` when inactive)."""
        with _api("reading the engine's swarm state"):
            swarm = self._api.info().get("Swarm") or {}
        return str(swarm.get("LocalNodeState") or "inactive"), str(swarm.get("NodeID") or "")

    def swarm_init(self, advertise_addr: str, listen_addr: str) -> None:
        with _api(f"initialising a swarm on {advertise_addr}"):
            self._api.init_swarm(advertise_addr=advertise_addr, listen_addr=listen_addr)

    def swarm_leave(self) -> None:
        with _api("leaving the swarm"):
            self._api.leave_swarm(force=True)

    def node_labels(self, node_id: str) -> dict[str, str]:
        with _api(f"inspecting swarm node {node_id[:12]}"):
            return dict((self._api.inspect_node(node_id).get("Spec") or {}).get("Labels") or {})

    def set_node_labels(self, node_id: str, labels: dict[str, str]) -> None:
        """Replace the node's labels (kept in the swarm itself: they outlive this process
        and vanish with the swarm)."""
        with _api(f"labelling swarm node {node_id[:12]}"):
            attrs = self._api.inspect_node(node_id)
            spec = dict(attrs.get("Spec") or {})
            spec["Labels"] = labels
            self._api.update_node(node_id, attrs["Version"]["Index"], spec)

    def network_drivers(self) -> dict[str, str]:
        """Every network's name and driver (``bridge``, ``overlay``, ...)."""
        with _api("listing networks"):
            return {str(n["Name"]): str(n.get("Driver") or "") for n in self._api.networks()}

    def running_on_networks(self) -> dict[str, list[str]]:
        """Running containers (by name) and the networks each is attached to."""
        with _api("listing running containers"):
            found = self._api.containers()
        return {
            str((item.get("Names") or [item["Id"][:12]])[0]).lstrip("/"): sorted(
                ((item.get("NetworkSettings") or {}).get("Networks") or {}).keys()
            )
            for item in found
        }

    def remove_network_named(self, name: str) -> None:
        with _api(f"removing network {name}"):
            self._api.remove_network(name)

    def services(self, label: str | None = None) -> list[dict[str, Any]]:
        """Swarm services carrying ``label`` (``key`` or ``key=value``; None: all), as
        the engine describes them."""
        with _api(f"listing services labelled {label}"):
            return list(self._api.services(filters={"label": label} if label else None))

    def service_tasks(self, service: str) -> list[dict[str, Any]]:
        with _api(f"listing the tasks of {service}"):
            return list(self._api.tasks(filters={"service": service}))

    def scale_service(self, service: str, replicas: int) -> None:
        """Set a replicated service's replica count and nothing else, as ``docker service
        scale`` does: the current spec goes back unchanged but for the count (any other
        difference, e.g. networks moved by the SDK's spec merging, would make swarm
        replace every task in a rolling update)."""
        with _api(f"scaling {service} to {replicas}"):
            attrs = self._api.inspect_service(service)
            spec = attrs["Spec"]
            self._api.update_service(
                service,
                attrs["Version"]["Index"],
                task_template=spec["TaskTemplate"],
                name=spec["Name"],
                labels=spec.get("Labels"),
                mode={"Replicated": {"Replicas": replicas}},
                update_config=spec.get("UpdateConfig"),
                rollback_config=spec.get("RollbackConfig"),
                endpoint_spec=spec.get("EndpointSpec"),
            )

    def swarm_objects(self, label: str) -> list[Labelled]:
        """Services, secrets and configs carrying ``label`` (swarm mode only: an
        inactive engine has none)."""
        state, _ = self.swarm_node()
        if state != "active":
            return []
        found: list[Labelled] = []
        with _api(f"listing swarm objects labelled {label}"):
            for item in self._api.services(filters={"label": label}):
                spec = item.get("Spec") or {}
                found.append(
                    Labelled("service", item["ID"], spec.get("Name", ""), spec.get("Labels") or {})
                )
            for item in self._api.secrets(filters={"label": label}):
                spec = item.get("Spec") or {}
                found.append(
                    Labelled("secret", item["ID"], spec.get("Name", ""), spec.get("Labels") or {})
                )
            for item in self._api.configs(filters={"label": label}):
                spec = item.get("Spec") or {}
                found.append(
                    Labelled("config", item["ID"], spec.get("Name", ""), spec.get("Labels") or {})
                )
        return found
