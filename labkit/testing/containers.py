"""The lab's four images as testcontainers-python containers.

* :class:`CertgenContainer` runs certgen once and hands out :class:`Certificates`: the
  issued files, held in memory, without the CA's key (it never leaves the container);
* :class:`UpstreamContainer`, :class:`ProxyContainer` and :class:`ClientContainer` are
  the services; each gets only the files it needs, copied in before it starts and owned
  by the services' uid (keys 0600): the proxy its certificate, key and the CA
  certificate, a client its own pair and the CA certificate, an upstream nothing;
* :class:`LabNetwork` is testcontainers' ``Network``, internal and labelled.

Every class is a testcontainers builder (``with_*`` methods return the container) and a
context manager. Images come from the local build (``scripts/setup`` or
:func:`labkit.ensure_images`); a missing one is an error naming the fix, never a pull.
Readiness is a wait strategy: a log line for upstreams and clients, ``adminctl ready``
(the proxy's ``/ready`` answering 200) for the proxy.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import docker  # type: ignore[import-untyped]
import yaml
from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.transferable import Transferable
from testcontainers.core.wait_strategies import ExecWaitStrategy, LogMessageWaitStrategy

from ..certs import (
    EXPORT_DIR,
    ISSUE_SCRIPT,
    SERVICE_UID,
    Certificates,
    check_prepared,
    files_of_archive,
    issue_spec,
    owned_tar,
)
from ..images import image
from ..logs import (
    Access,
    Attempt,
    HealthEvent,
    LogLine,
    TailState,
    access_of,
    attempts_of,
    health_of,
    health_states,
    take_new_lines,
)
from ..topology import (
    PROXY_PORT,
    UPSTREAM_PORT,
    ClientSpec,
    UpstreamSpec,
    deep_merge,
    load_reference_config,
)
from ..waiting import POLL, wait_until
from .session import Session, current_session

T = TypeVar("T")

CONFIG_PATH = "/etc/l4proxy/config.yaml"
DEFAULT_CLIENTS = ("client.a", "client.b", "client.c", "client.d", "client.e")


class ImageMissing(RuntimeError):
    """A lab image is not on the engine (and is never pulled)."""


def require_image(client: Any, ref: str) -> None:
    try:
        client.images.get(ref)
    except docker.errors.ImageNotFound:
        raise ImageMissing(
            f"{ref} is not on this Docker engine and the lab never pulls: build the images "
            "with scripts/setup (or labkit.ensure_images)"
        ) from None


# --- the base: labels, files, logs, faults --------------------------------------------


class LabContainer(DockerContainer):
    """What every lab container shares (see the module docstring)."""

    service: ClassVar[str]
    ready_event: ClassVar[str | None] = None

    def __init__(
        self,
        name: str,
        *,
        network: Network | None = None,
        image_ref: str | None = None,
        session: Session | None = None,
    ) -> None:
        super().__init__(image_ref or image(self.service))
        self.lab_name = name
        self.session = session or current_session()
        self._files: dict[str, tuple[bytes, int]] = {}
        self._tail = TailState()
        self._lines: list[LogLine] = []
        if network is not None:
            self.with_network(network).with_network_aliases(name)

    # --- builders -----------------------------------------------------------------------

    def with_file(self, path: str, data: bytes, mode: int = 0o644) -> Self:
        """Copy ``data`` to ``path`` before the container starts (owned by the service)."""
        self._files[path] = (data, mode)
        return self

    def with_files(self, files: Mapping[str, tuple[bytes, int]]) -> Self:
        self._files.update(files)
        return self

    def _prepare(self) -> None:
        """Subclasses set command, environment and files here, just before start."""

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        self.session.begin()
        docker_client = self.get_docker_client().client
        require_image(docker_client, self.image)
        self._prepare()
        labels = {
            **self._kwargs.get("labels", {}),
            **self.session.labels(self.service, self.lab_name),
        }
        self._kwargs = {**self._kwargs, "labels": labels}
        if self._name is None:
            self.with_name(f"l4tc-{self.session.id}-{self.lab_name}-{secrets.token_hex(2)}")
        for path, (data, mode) in self._files.items():
            self.with_copy_into_container(data, path, mode)
        return super().start()

    def _transfer_into_container(
        self, transferable: Transferable, destination_in_container: str, mode: int
    ) -> None:
        # testcontainers' own tar leaves files owned by root; the services run as 10001
        # and their keys must be 0600, so the files are given to the service's uid.
        if isinstance(transferable, Path) and transferable.is_dir():
            super()._transfer_into_container(transferable, destination_in_container, mode)
            return
        data = transferable if isinstance(transferable, bytes) else transferable.read_bytes()
        archive = owned_tar({destination_in_container: (data, mode)})
        if not self.get_wrapped_container().put_archive(path="/", data=archive):
            raise OSError(f"could not copy {destination_in_container} into {self.lab_name}")

    # --- state and faults ---------------------------------------------------------------

    @property
    def container_id(self) -> str:
        return str(self.get_wrapped_container().id)

    def state(self) -> dict[str, Any]:
        container = self.get_wrapped_container()
        container.reload()
        return dict(container.attrs.get("State") or {})

    @property
    def running(self) -> bool:
        return bool(self.state().get("Running"))

    def kill(self, signal: str = "SIGKILL") -> float:
        """``docker kill``; returns when (epoch seconds) the signal was sent."""
        at = time.time()
        self.get_wrapped_container().kill(signal=signal)
        return at

    def pause(self) -> float:
        at = time.time()
        self.get_wrapped_container().pause()
        return at

    def unpause(self) -> float:
        at = time.time()
        self.get_wrapped_container().unpause()
        return at

    def restart(self, timeout: float = 30.0) -> float:
        """Start it again (after a kill) or restart it; waits until it is ready again."""
        seen = len(self.events(self.ready_event)) if self.ready_event else 0
        at = time.time()
        container = self.get_wrapped_container()
        if self.running:
            container.restart(timeout=5)
        else:
            container.start()
        if self.ready_event is not None:
            event = self.ready_event
            self.wait_for(
                f"{self.lab_name} to log '{event}' again",
                lambda: len(self.events(event)) > seen or None,
                timeout=timeout,
            )
        return at

    def wait_exit(self, timeout: float) -> int:
        """Wait for the container to exit; its exit code. TimeoutError if it still runs."""
        try:
            result = self.get_wrapped_container().wait(timeout=timeout)
        except OSError as exc:  # requests' ReadTimeout and ConnectionError are OSErrors
            raise TimeoutError(
                f"{self.lab_name} still runs after {timeout:.0f}s:\n" + self.tail()
            ) from exc
        return int(result.get("StatusCode", -1))

    # --- logs ---------------------------------------------------------------------------

    def lines(self) -> list[LogLine]:
        """Every line the container logged so far (read incrementally)."""
        raw = self.get_wrapped_container().logs(
            stdout=True, stderr=True, timestamps=True, since=self._tail.since()
        )
        text = bytes(raw).decode("utf-8", errors="replace")
        self._lines.extend(take_new_lines(text, self.lab_name, self._tail))
        return list(self._lines)

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON records of one ``event``."""
        return [line.record for line in self.lines() if line.event == event and line.record]

    def tail(self, count: int = 15) -> str:
        return "\n".join(line.evidence() for line in self.lines()[-count:])

    def wait_for(self, what: str, probe: Callable[[], T | None], *, timeout: float) -> T:
        """:func:`wait_until`, with this container's last lines as the evidence."""
        return wait_until(what, probe, timeout=timeout, evidence=self.tail)


def _log_event(event: str, timeout: float) -> LogMessageWaitStrategy:
    strategy = LogMessageWaitStrategy(re.compile(rf'"event": ?"{re.escape(event)}"'))
    return strategy.with_startup_timeout(int(timeout)).with_poll_interval(POLL)


# --- certgen ------------------------------------------------------------------------------


class CertgenContainer(LabContainer):
    """certgen, run once: a CA, the server certificate and the clients' pairs; optionally
    pairs issued already expired, or by a second CA the proxy does not trust.

    ``start()`` returns once certgen has exited; :attr:`certificates` then holds every
    issued file except ``ca.key``. The container has no network."""

    service = "certgen"
    timeout = 90.0

    def __init__(self, *, session: Session | None = None) -> None:
        super().__init__("certgen", session=session)
        self._clients: list[str] = list(DEFAULT_CLIENTS)
        self._expired: list[str] = []
        self._other_ca: list[str] = []
        self._certificates: Certificates | None = None
        self.with_kwargs(network_mode="none", entrypoint=["python3", "-c", ISSUE_SCRIPT])

    def with_clients(self, *names: str) -> Self:
        """Client identities to issue from the CA (replaces the default client.a..e)."""
        self._clients = list(names)
        return self

    def with_expired(self, *names: str) -> Self:
        self._expired += names
        return self

    def with_other_ca(self, *names: str) -> Self:
        self._other_ca += names
        return self

    def _prepare(self) -> None:
        spec = issue_spec(self._clients, self._expired, self._other_ca)
        self.with_env("LAB_SPEC", json.dumps(spec)).with_command([])

    def start(self) -> Self:
        super().start()
        code = self.wait_exit(self.timeout)
        prepared = self.events("prepared")
        if code != 0 or not prepared:
            raise RuntimeError(f"certgen exited {code}:\n{self.tail()}")
        problems = check_prepared(prepared[-1].get("files") or {}, SERVICE_UID)
        if problems:
            raise RuntimeError(
                "certgen's files have the wrong modes or owner: " + "; ".join(problems)
            )
        # Everything but the CA's key, which stays in certgen's container.
        stream, _ = self.get_wrapped_container().get_archive(EXPORT_DIR)
        self._certificates = Certificates(files_of_archive(b"".join(stream)))
        return self

    @property
    def certificates(self) -> Certificates:
        if self._certificates is None:
            raise RuntimeError("certgen has not run: start the container first")
        return self._certificates


def issue_certificates(
    clients: Sequence[str] = DEFAULT_CLIENTS,
    *,
    expired: Sequence[str] = (),
    other_ca: Sequence[str] = (),
    session: Session | None = None,
) -> Certificates:
    """Run certgen once and return what it issued (its container is removed)."""
    certgen = CertgenContainer(session=session).with_clients(*clients)
    with certgen.with_expired(*expired).with_other_ca(*other_ca):
        return certgen.certificates


# --- upstream -----------------------------------------------------------------------------


class UpstreamContainer(LabContainer):
    """The lab's TCP upstream (``reply``, ``echo`` or ``sink``), reachable on the network
    by its name (port 8000). Ready when it logs ``listening``."""

    service = "upstream"
    ready_event = "listening"

    def __init__(
        self,
        name: str = "u1",
        *,
        network: Network | None = None,
        mode: str = "reply",
        session: Session | None = None,
    ) -> None:
        super().__init__(name, network=network, session=session)
        self.spec = UpstreamSpec(name, mode=mode)
        self.proxy_protocol = "none"
        self.trusted: tuple[str, ...] = ()
        self.waiting_for(_log_event("listening", 30))

    def with_mode(self, mode: str) -> Self:
        self.spec = replace(self.spec, mode=mode)
        return self

    def with_delay(self, delay: str) -> Self:
        """Wait this long (``250ms``, ``2s``) before the first response action."""
        self.spec = replace(self.spec, delay=delay)
        return self

    def with_fault(self, fault: str) -> Self:
        """``close`` (FIN without a byte) or ``reset`` (RST) instead of a response."""
        self.spec = replace(self.spec, fault=fault)
        return self

    def with_proxy_protocol(self, version: str = "v2") -> Self:
        """Expect a PROXY protocol header (``v2``) on every connection, or ``none``."""
        self.proxy_protocol = version
        return self

    def with_trusted_proxy(self, *peers: str) -> Self:
        """Believe PROXY headers only from these peers (names, addresses, CIDRs; e.g.
        ``proxy``); anyone else is cut off (``untrusted_proxy``). Needs v2."""
        self.trusted = peers
        return self

    def with_backlog(self, somaxconn: int) -> Self:
        """Cap the listen backlog (``net.core.somaxconn``): a paused upstream then fails
        health checks once its queue is full."""
        self.spec = replace(self.spec, somaxconn=somaxconn)
        return self

    def _prepare(self) -> None:
        self.env.update(self.spec.environment(self.proxy_protocol, ",".join(self.trusted)))
        if self.spec.somaxconn is not None:
            sysctls = {"net.core.somaxconn": str(self.spec.somaxconn)}
            self._kwargs = {**self._kwargs, "sysctls": sysctls}

    @property
    def address(self) -> str:
        return f"{self.lab_name}:{UPSTREAM_PORT}"

    def connections(self) -> list[dict[str, Any]]:
        """Its ``connection`` lines that carried bytes (health checks excluded)."""
        return [r for r in self.events("connection") if r.get("outcome") != "empty"]

    def identities(self) -> set[str]:
        """Client identities it learned from PROXY v2 headers."""
        return {
            str(r["identity"])
            for r in self.connections()
            if r.get("proxy_protocol") == "v2-proxy" and r.get("identity")
        }


# --- proxy --------------------------------------------------------------------------------


def proxy_config(
    upstreams: Sequence[UpstreamContainer],
    overrides: Mapping[str, Any] | None = None,
    *,
    reference: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The lab's reference proxy config (``lab/proxy.yaml``) with ``overrides`` merged in
    (mappings deeply, lists replaced) and ``upstreams`` as its upstream list, each with
    the PROXY protocol setting its container expects."""
    config = deep_merge(reference or load_reference_config(), overrides or {})
    config["upstreams"] = [
        {"address": u.address, "name": u.lab_name, "proxy_protocol": u.proxy_protocol}
        for u in upstreams
    ]
    return config


class ProxyContainer(LabContainer):
    """The proxy with a config (a mapping, or a file's path) at
    ``/etc/l4proxy/config.yaml`` and the server's certificate, key and the CA
    certificate under /certs. Reachable on ``network`` as ``proxy:8443``. Ready when
    ``python3 -m l4proxy.adminctl ready`` succeeds: ``/ready`` answers 200 (listening,
    not draining, at least one upstream up).

    With ``upstream_network`` the lab is segmented as it should be: the proxy starts on
    that (back) network, where its upstreams are, and joins ``network`` (front, its
    clients') once ready; no client shares a network with an upstream."""

    service = "proxy"
    ready_event = "listening"

    def __init__(
        self,
        certificates: Certificates,
        config: Mapping[str, Any] | Path,
        *,
        network: Network | None = None,
        upstream_network: Network | None = None,
        name: str = "proxy",
        session: Session | None = None,
    ) -> None:
        first = upstream_network if upstream_network is not None else network
        super().__init__(name, network=first, session=session)
        self.front = network if upstream_network is not None else None
        self.certificates = certificates
        self.config: Mapping[str, Any] | Path = config
        self.with_command(["--config", CONFIG_PATH])
        ready = ExecWaitStrategy(self._adminctl_command("ready"))
        self.waiting_for(ready.with_startup_timeout(60).with_poll_interval(0.25))

    def with_config(self, config: Mapping[str, Any] | Path) -> Self:
        self.config = config
        return self

    def start(self) -> Self:
        super().start()
        if self.front is not None:
            self.front.connect(self.container_id, [self.lab_name])
        return self

    @staticmethod
    def _config_bytes(config: Mapping[str, Any] | Path) -> bytes:
        if isinstance(config, Path):
            return config.read_bytes()
        return yaml.safe_dump(dict(config), sort_keys=False).encode("utf-8")

    def _prepare(self) -> None:
        self.with_files(self.certificates.for_proxy())
        self.with_file(CONFIG_PATH, self._config_bytes(self.config), 0o644)

    @property
    def address(self) -> str:
        return f"{self.lab_name}:{PROXY_PORT}"

    @staticmethod
    def _adminctl_command(command: str) -> list[str]:
        return ["python3", "-m", "l4proxy.adminctl", "--config", CONFIG_PATH, command]

    def adminctl(self, command: str) -> tuple[int, str]:
        """``python3 -m l4proxy.adminctl COMMAND`` inside: exit code and output."""
        result = self.exec(self._adminctl_command(command))
        return int(result.exit_code or 0), result.output.decode("utf-8", errors="replace")

    def admin_status(self) -> dict[str, Any]:
        """``GET /status`` as JSON."""
        code, output = self.adminctl("status")
        if code != 0:
            raise RuntimeError(f"adminctl status exited {code}: {output.strip()}")
        value = json.loads(output)
        if not isinstance(value, dict):
            raise TypeError(f"adminctl status printed no JSON object: {output[:200]}")
        return value

    def reload_config(self, config: Mapping[str, Any] | Path | None = None) -> tuple[int, str]:
        """Replace the config file (if given), then ``POST /reload``: (exit code, output);
        exit code 0 when the proxy took the new config."""
        if config is not None:
            self.config = config
            self.copy_into_container(self._config_bytes(config), CONFIG_PATH, 0o644)
        return self.adminctl("reload")

    def access(self) -> list[Access]:
        """One value per connection that ended (the access log)."""
        return access_of(self.lines())

    def health(self) -> list[HealthEvent]:
        return health_of(self.lines())

    def health_state(self, upstream: str) -> str | None:
        return health_states(self.health()).get(upstream)


# --- client -------------------------------------------------------------------------------


class ClientContainer(LabContainer):
    """The lab's synthetic mTLS client: one connection per attempt, one ``attempt`` line
    each. Ready when it logs ``started``; :meth:`attempts` parses what it logged."""

    service = "client"
    ready_event = "started"

    def __init__(
        self,
        client_id: str,
        certificates: Certificates,
        *,
        network: Network | None = None,
        proxy: str = f"proxy:{PROXY_PORT}",
        session: Session | None = None,
    ) -> None:
        super().__init__(client_id, network=network, session=session)
        self.certificates = certificates
        self.proxy = proxy
        # 0.5-1 s between attempts: under the reference rate limit (2/s) by default.
        self.spec = ClientSpec(client_id, interval_min="500ms", interval_max="1s")
        self.waiting_for(_log_event("started", 30))

    def with_interval(self, low: str, high: str) -> Self:
        self.spec = replace(self.spec, interval_min=low, interval_max=high)
        return self

    def with_count(self, count: int) -> Self:
        self.spec = replace(self.spec, count=count)
        return self

    def with_duration(self, duration: str) -> Self:
        self.spec = replace(self.spec, duration=duration)
        return self

    def with_burst(self, concurrency: int = 1) -> Self:
        """Attempts back to back (``concurrency`` in flight at once)."""
        self.spec = replace(self.spec, burst=True, concurrency=concurrency)
        return self

    def with_timeout(self, timeout: str) -> Self:
        self.spec = replace(self.spec, timeout=timeout)
        return self

    def with_seed(self, seed: int) -> Self:
        self.spec = replace(self.spec, seed=seed)
        return self

    def with_transfer(self, size: str, pace: str | None = None) -> Self:
        """Transfer mode: stream ``size`` bytes (``4MiB``) to an echo upstream per
        attempt, paced over ``pace``, checked byte-exact."""
        self.spec = replace(self.spec, transfer_bytes=size, transfer_time=pace)
        return self

    def with_certificate(self, stem: str) -> Self:
        """Present ``<stem>.pem``/``<stem>.key`` (e.g. an expired one, or ``server``)."""
        self.spec = replace(self.spec, cert_stem=stem, no_cert=False)
        return self

    def without_certificate(self) -> Self:
        self.spec = replace(self.spec, no_cert=True, cert_stem=None)
        return self

    def _prepare(self) -> None:
        self.with_files(self.certificates.for_client(self.spec.cert_file_stem))
        self.with_command(self.spec.command(self.proxy))

    def attempts(self) -> list[Attempt]:
        return attempts_of(self.lines())

    def wait_attempts(self, count: int, timeout: float) -> list[Attempt]:
        """Wait until it has logged at least ``count`` attempts; all of them."""
        return self.wait_for(
            f"{count} attempts of {self.lab_name}",
            lambda: found if len(found := self.attempts()) >= count else None,
            timeout=timeout,
        )

    def finish(self, timeout: float = 15.0) -> list[Attempt]:
        """Wait for a finite client (``with_count``, ``with_duration``) to stop by itself;
        send any other SIGTERM (attempts in flight finish). Then wait for it to exit and
        return every attempt it logged."""
        if not self.spec.finite and self.running:
            self.kill("SIGTERM")
        code = self.wait_exit(timeout)
        if code != 0:
            raise RuntimeError(f"{self.lab_name} exited {code}:\n{self.tail()}")
        return self.attempts()


# --- network ------------------------------------------------------------------------------


class LabNetwork(Network):
    """testcontainers' ``Network``: a bridge network, internal (nothing outside the
    host's containers is reachable), labelled with the session."""

    def __init__(self, name: str = "lab", *, session: Session | None = None) -> None:
        self.session = session or current_session()
        super().__init__(
            docker_network_kw={
                "driver": "bridge",
                "internal": True,
                "labels": self.session.labels("network", name),
            }
        )
        self.name = f"l4tc-{self.session.id}-{name}-{secrets.token_hex(2)}"

    def create(self) -> Self:
        self.session.begin()
        return super().create()
