"""Topologies: small YAML files in ``lab/topologies/`` (parsed here, pure).

A topology says how many upstreams and which clients a run starts, how each client
behaves, which overrides apply to the reference proxy configuration (``lab/proxy.yaml``)
and which extra (bad) certificates the run needs. Example::

    description: three upstreams, four steady clients, fast health checks
    upstreams: [u1, u2, u3]            # or a mapping per upstream: {name: u1, mode: echo}
    upstream_defaults: {somaxconn: 4}  # listen backlog cap inside each upstream
    client_defaults: {interval: [100ms, 300ms], timeout: 2s}
    clients:
      - id: client.a                   # a container of its own, named client.a
      - {id: client.nocert, no_cert: true, expect: peer_did_not_return_a_certificate}
      - {id: client.t1, transfer_bytes: 4MiB, transfer_time: 4s, timeout: 10s}  # to an echo
      - {id: client.late, autostart: false}   # started by the scenario, not by Run.start
    certs: {expired: [client.expired], other_ca: [client.otherca]}
    proxy:                             # merged over lab/proxy.yaml (mappings deep, lists replaced)
      health_check: {interval: 500ms, timeout: 300ms}

Sizes: names may be numbered ranges (:mod:`labkit.ranges`: ``client.{001..200}``,
``u{01..24}``; quote them in YAML: a brace opens a flow mapping), and one client
container may run several identities::

    upstreams: "u{1..24}"              # or 24 (the same: u1..u24), or a list of patterns
    clients:
      - {ids: "client.{001..200}", container: pool, per_container: 20}   # pool-01..pool-10
      - {ids: [ops.1, ops.2], container: ops}                          # both in "ops"
      - {ids: "svc.{1..3}"}                                            # one container each
    proxy:
      authorization:                   # rule clients and upstreams may be ranges too
        rules: [{client: "client.{181..200}", action: deny, upstream: "*"}]

``ids`` is shorthand for one entry per identity with the same options. ``container``
names the container they run in (default: each its own, named by its identity);
``per_container: N`` splits them into containers of N, named ``<container>-<k>``
(``k`` zero-padded to the width of the count). Identities sharing a container share
every option (it is one client process: ``--id`` repeated) and present their own
certificates (no ``cert_stem``); each container gets only its identities' pairs. A
container's name must not be an upstream's or ``proxy``, nor an identity unless the
container runs that identity alone.

A topology is structure only: what a scenario does to it (which upstream a fault hits,
what a reload changes) is the scenario's, derived from the run's config
(:mod:`labkit.needs`).

The proxy's ``upstreams`` list is always generated from the run (one entry per upstream,
by address, name and, if the upstream says, ``proxy_protocol``); every other key comes
from ``lab/proxy.yaml`` plus ``proxy:``. Each upstream container is started with the
PROXY protocol the proxy will speak to it (:func:`upstream_proxy_protocol`).
"""

from __future__ import annotations

import copy
import ipaddress
import re
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .ranges import RangeError, expand_all

ROOT = Path(__file__).resolve().parent.parent
# The services' shared package (durations): labkit runs on the host from the repository
# root (python lab.py, the pytest plugin), where services/common is not on the path.
if str(ROOT / "services" / "common") not in sys.path:
    sys.path.append(str(ROOT / "services" / "common"))

from l4common.addresses import parse_address, reachable_host  # noqa: E402
from l4common.durations import parse_duration as _parse_duration  # noqa: E402
from l4common.errors import ConfigError  # noqa: E402

TOPOLOGY_DIR = ROOT / "lab" / "topologies"
REFERENCE_PROXY_CONFIG = ROOT / "lab" / "proxy.yaml"

CERTS_DIR = "/certs"  # where each container finds its own certificate material
PROXY_CONFIG_PATH = "/etc/l4proxy/config.yaml"  # the run's proxy config, in the proxy only
PROXY_PORT = 8443
UPSTREAM_PORT = 8000


def adminctl(command: str, config: str = PROXY_CONFIG_PATH) -> list[str]:
    """The command line, inside a proxy container, of ``python3 -m l4proxy.adminctl``
    (``ready``, ``status``, ``metrics``, ``reload``) for the config at ``config``."""
    return ["python3", "-m", "l4proxy.adminctl", "--config", config, command]


# GET /ready on the admin listener, exit 0 on 200: the run's container health check.
# Python without site packages and a socket only (about 15 ms a start, where adminctl,
# which reads the config, takes about 110): it runs every second for a whole run.
READY_PROBE = (
    "import socket,sys\n"
    "with socket.create_connection((sys.argv[1],int(sys.argv[2])),3) as s:\n"
    " s.sendall(b'GET /ready HTTP/1.1\\r\\nHost: l4proxy\\r\\nConnection: close\\r\\n\\r\\n')\n"
    " head=b''\n"
    " while len(head)<12 and (chunk:=s.recv(64)):\n"
    "  head+=chunk\n"
    "sys.exit(0 if head.startswith(b'HTTP/1.1 200') else 1)\n"
)


def ready_probe(config: Mapping[str, Any]) -> list[str]:
    """The command line, inside the proxy container, that asks the admin listener of
    ``config`` for ``/ready``; adminctl's when the config has no admin listener."""
    listen = str((config.get("admin") or {}).get("listen", "127.0.0.1:9100") or "")
    if not listen:
        return adminctl("ready")
    address = parse_address(listen, "admin.listen")
    host = reachable_host(address.host)
    return ["python3", "-I", "-S", "-c", READY_PROBE, host, str(address.port)]


class TopologyError(ValueError):
    """A topology file is missing or malformed; the message names the file and key."""


def parse_duration(value: object, key: str = "duration") -> float:
    """``"500ms"``, ``"2s"``, ``"1m"`` or a number of seconds -> float seconds (0 too),
    read exactly as the services read it (:mod:`l4common.durations`)."""
    try:
        return _parse_duration(value, key, allow_zero=True)
    except ConfigError as exc:
        raise TopologyError(str(exc)) from None


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _name(value: object, key: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise TopologyError(f"{key}: expected a name of letters, digits, '.', '-', '_': {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class UpstreamSpec:
    name: str
    mode: str = "reply"
    delay: str | None = None
    fault: str | None = None
    somaxconn: int | None = None  # net.core.somaxconn in the container (caps its backlog)
    proxy_protocol: str | None = None  # none | v2; None: the proxy config's global setting

    def environment(
        self, proxy_protocol: str = "none", trusted_proxy: str | None = None
    ) -> dict[str, str]:
        """The container's environment; ``proxy_protocol`` is what the proxy will send
        it (see :func:`upstream_proxy_protocol`), and with ``v2`` only ``trusted_proxy``
        (the proxy's address or name) may send it headers."""
        env = {
            "UPSTREAM_NAME": self.name,
            "UPSTREAM_LISTEN": f"0.0.0.0:{UPSTREAM_PORT}",
            "UPSTREAM_MODE": self.mode,
            "UPSTREAM_PROXY_PROTOCOL": proxy_protocol,
        }
        if proxy_protocol == "v2" and trusted_proxy:
            env["UPSTREAM_TRUSTED_PROXIES"] = trusted_proxy
        if self.delay:
            env["UPSTREAM_DELAY"] = self.delay
        if self.fault:
            env["UPSTREAM_FAULT"] = self.fault
        return env


@dataclass(frozen=True, slots=True)
class ClientSpec:
    id: str
    cert_stem: str | None = None  # None: the client's own pair, <id>.pem / <id>.key
    no_cert: bool = False
    interval_min: str = "100ms"
    interval_max: str = "300ms"
    burst: bool = False
    concurrency: int = 1
    count: int | None = None
    duration: str | None = None
    timeout: str = "2s"
    seed: int | None = None
    expect: str | None = None  # mtls: the proxy's expected tls_failed reason
    transfer_bytes: str | None = None  # transfer mode (an echo upstream): bytes per attempt
    transfer_time: str | None = None  # transfer mode: pace each transfer over this long
    autostart: bool = True  # started by Run.start (False: the scenario starts it)
    container: str | None = None  # the container it runs in; None: its own, named by its id

    @property
    def container_name(self) -> str:
        return self.container or self.id

    def command(self, proxy: str, server_name: str | None = None) -> list[str]:
        """The client container's arguments (after ``python3 -m client``); with
        ``server_name``, the name to verify the proxy's certificate against (when
        ``proxy`` is an address)."""
        args = ["--id", self.id, "--proxy", proxy, "--certs", CERTS_DIR]
        if server_name is not None:
            args += ["--server-name", server_name]
        args += ["--interval-min", self.interval_min, "--interval-max", self.interval_max]
        args += ["--timeout", self.timeout]
        if self.burst:
            args.append("--burst")
        if self.concurrency != 1:
            args += ["--concurrency", str(self.concurrency)]
        if self.count is not None:
            args += ["--count", str(self.count)]
        if self.duration is not None:
            args += ["--duration", self.duration]
        if self.seed is not None:
            args += ["--seed", str(self.seed)]
        if self.transfer_bytes is not None:
            args += ["--transfer-bytes", self.transfer_bytes]
        if self.transfer_time is not None:
            args += ["--transfer-time", self.transfer_time]
        if self.no_cert:
            args.append("--no-cert")
        elif self.cert_stem:
            args += ["--cert-stem", self.cert_stem]
        return args

    @property
    def cert_file_stem(self) -> str | None:
        """The pair this client presents (None: no certificate at all)."""
        return None if self.no_cert else (self.cert_stem or self.id)

    @property
    def finite(self) -> bool:
        """Does this client stop by itself (``--count`` or ``--duration``)?"""
        return self.count is not None or self.duration is not None

    @property
    def transfer(self) -> bool:
        return self.transfer_bytes is not None


@dataclass(frozen=True, slots=True)
class ClientContainer:
    """One client container and the identities it runs (one process, ``--id`` each)."""

    name: str
    clients: tuple[ClientSpec, ...]

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.clients]

    @property
    def finite(self) -> bool:
        """Does the container exit by itself (every identity stops by itself)?"""
        return all(c.finite for c in self.clients)

    @property
    def cert_stems(self) -> list[str]:
        """The pairs it needs (``ca.pem`` aside): its identities' own, or a stem."""
        return [stem for c in self.clients if (stem := c.cert_file_stem) is not None]

    def command(self, proxy: str, server_name: str | None = None) -> list[str]:
        """The container's arguments: the first identity's, with ``--id`` for each."""
        first = self.clients[0].command(proxy, server_name)
        assert first[:2] == ["--id", self.clients[0].id]
        return [arg for c in self.clients for arg in ("--id", c.id)] + first[2:]


@dataclass(frozen=True, slots=True)
class Topology:
    name: str
    description: str
    upstreams: tuple[UpstreamSpec, ...]
    clients: tuple[ClientSpec, ...]
    proxy: Mapping[str, Any] = field(default_factory=dict)
    expired: tuple[str, ...] = ()  # client certs to issue already expired
    other_ca: tuple[str, ...] = ()  # client certs to issue from a second, unknown CA

    def upstream_names(self) -> list[str]:
        return [u.name for u in self.upstreams]

    def client(self, client_id: str) -> ClientSpec:
        for spec in self.clients:
            if spec.id == client_id:
                return spec
        raise KeyError(client_id)

    def containers(self, ids: Sequence[str] | None = None) -> list[ClientContainer]:
        """The client containers (in the order their first identity appears), of every
        identity or of those ``ids`` (which must be whole containers: a container is one
        process, started and stopped as one)."""
        groups: dict[str, list[ClientSpec]] = {}
        for spec in self.clients:
            groups.setdefault(spec.container_name, []).append(spec)
        found = [ClientContainer(name, tuple(specs)) for name, specs in groups.items()]
        if ids is None:
            return found
        wanted = set(ids)
        unknown = sorted(wanted - {c.id for c in self.clients})
        if unknown:
            raise TopologyError(f"topology {self.name}: no client {', '.join(unknown)}")
        chosen = [c for c in found if wanted & set(c.ids)]
        for container in chosen:
            left = [i for i in container.ids if i not in wanted]
            if left:
                raise TopologyError(
                    f"topology {self.name}: container {container.name} runs "
                    f"{', '.join(container.ids)}; {', '.join(left)} would have to start or stop "
                    "with the others"
                )
        return chosen

    def own_cert_clients(self) -> list[str]:
        """Clients whose normal certificate certgen must issue from the run's CA."""
        special = set(self.expired) | set(self.other_ca)
        return [
            c.id for c in self.clients if not c.no_cert and not c.cert_stem and c.id not in special
        ]


_CLIENT_KEYS = {
    "id",
    "cert_stem",
    "no_cert",
    "interval",
    "interval_min",
    "interval_max",
    "burst",
    "concurrency",
    "count",
    "duration",
    "timeout",
    "seed",
    "expect",
    "transfer_bytes",
    "transfer_time",
    "autostart",
    "ids",
    "container",
    "per_container",
}
_UPSTREAM_KEYS = {"name", "mode", "delay", "fault", "somaxconn", "proxy_protocol"}
PROXY_PROTOCOLS = ("none", "v2")
_TOP_KEYS = {
    "description",
    "upstreams",
    "upstream_defaults",
    "clients",
    "client_defaults",
    "proxy",
    "certs",
}


def _mapping(value: object, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TopologyError(f"{key}: expected a mapping, got {type(value).__name__}")
    return dict(value)


def _check_keys(item: Mapping[str, Any], allowed: set[str], key: str) -> None:
    unknown = sorted(set(item) - allowed)
    if unknown:
        raise TopologyError(f"{key}: unknown key(s) {', '.join(unknown)}")


def _duration_text(value: object, key: str) -> str:
    seconds = parse_duration(value, key)
    return value if isinstance(value, str) else f"{seconds:g}s"


_SIZE = re.compile(r"^\s*\d+\s*(|b|k|kib|m|mib|g|gib)\s*$", re.IGNORECASE)


def _size_text(value: object, key: str) -> str:
    """A byte count for the client's ``--transfer-bytes``: ``4194304`` or ``'4MiB'``."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return str(value)
    if (
        isinstance(value, str)
        and _SIZE.match(value)
        and any(c != "0" for c in value if c.isdigit())
    ):
        return value.strip()
    raise TopologyError(f"{key}: expected a size such as 65536, '512KiB' or '4MiB', got {value!r}")


def _int(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TopologyError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def _parse_upstream(raw: object, defaults: Mapping[str, Any], key: str) -> UpstreamSpec:
    item = dict(defaults)
    item.update({"name": raw} if isinstance(raw, str) else _mapping(raw, key))
    _check_keys(item, _UPSTREAM_KEYS, key)
    somaxconn = item.get("somaxconn")
    proxy_protocol = item.get("proxy_protocol")
    if proxy_protocol is not None and proxy_protocol not in PROXY_PROTOCOLS:
        raise TopologyError(
            f"{key}.proxy_protocol: expected one of {', '.join(PROXY_PROTOCOLS)}, "
            f"got {proxy_protocol!r}"
        )
    return UpstreamSpec(
        name=_name(item.get("name"), f"{key}.name"),
        mode=str(item.get("mode", "reply")),
        delay=_duration_text(item["delay"], f"{key}.delay") if "delay" in item else None,
        fault=str(item["fault"]) if "fault" in item else None,
        somaxconn=None if somaxconn is None else _int(somaxconn, f"{key}.somaxconn", 0),
        proxy_protocol=None if proxy_protocol is None else str(proxy_protocol),
    )


def _parse_client(raw: object, defaults: Mapping[str, Any], key: str) -> ClientSpec:
    item = dict(defaults)
    item.update(_mapping(raw, key))
    _check_keys(item, _CLIENT_KEYS, key)
    interval = item.pop("interval", None)
    if interval is not None:
        if not isinstance(interval, list) or len(interval) != 2:
            raise TopologyError(f"{key}.interval: expected [min, max], got {interval!r}")
        item.setdefault("interval_min", interval[0])
        item.setdefault("interval_max", interval[1])
    spec = ClientSpec(
        id=_name(item.get("id"), f"{key}.id"),
        cert_stem=_name(item["cert_stem"], f"{key}.cert_stem") if "cert_stem" in item else None,
        no_cert=bool(item.get("no_cert", False)),
        interval_min=_duration_text(item.get("interval_min", "100ms"), f"{key}.interval_min"),
        interval_max=_duration_text(item.get("interval_max", "300ms"), f"{key}.interval_max"),
        burst=bool(item.get("burst", False)),
        concurrency=_int(item.get("concurrency", 1), f"{key}.concurrency", 1),
        count=_int(item["count"], f"{key}.count", 1) if "count" in item else None,
        duration=_duration_text(item["duration"], f"{key}.duration")
        if "duration" in item
        else None,
        timeout=_duration_text(item.get("timeout", "2s"), f"{key}.timeout"),
        seed=_int(item["seed"], f"{key}.seed", 0) if "seed" in item else None,
        expect=str(item["expect"]) if "expect" in item else None,
        transfer_bytes=_size_text(item["transfer_bytes"], f"{key}.transfer_bytes")
        if "transfer_bytes" in item
        else None,
        transfer_time=_duration_text(item["transfer_time"], f"{key}.transfer_time")
        if "transfer_time" in item
        else None,
        autostart=bool(item.get("autostart", True)),
        container=_name(item["container"], f"{key}.container") if "container" in item else None,
    )
    if parse_duration(spec.interval_min) > parse_duration(spec.interval_max):
        raise TopologyError(f"{key}: interval_min is greater than interval_max")
    if spec.transfer_time is not None:
        if spec.transfer_bytes is None:
            raise TopologyError(f"{key}: transfer_time needs transfer_bytes")
        if parse_duration(spec.transfer_time) >= parse_duration(spec.timeout):
            raise TopologyError(
                f"{key}: timeout ({spec.timeout}) must be longer than transfer_time "
                f"({spec.transfer_time}): it bounds the whole transfer"
            )
    return spec


def _names(value: object, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TopologyError(f"{key}: expected a list of names")
    return tuple(_name(item, key) for item in value)


def _twice(names: Sequence[str]) -> set[str]:
    return {name for name, count in Counter(names).items() if count > 1}


def _patterns(value: object, key: str) -> list[str] | None:
    try:
        return expand_all(value, key)
    except RangeError as exc:
        raise TopologyError(str(exc)) from None


def _parse_upstreams(
    raw: object, defaults: Mapping[str, Any], key: str
) -> tuple[UpstreamSpec, ...]:
    """A count (``u1``..``uN``), a pattern (``u{01..24}``) or a list of names, patterns
    or mappings (whose ``name`` may be a pattern too)."""
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 1:
        raw = [f"u{i}" for i in range(1, raw + 1)]
    elif isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise TopologyError(f"{key}: expected a count, a name pattern or a non-empty list")
    found: list[UpstreamSpec] = []
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            names = _patterns(item["name"], f"{where}.name") or []
            found += [_parse_upstream({**item, "name": n}, defaults, where) for n in names]
        elif isinstance(item, str):
            found += [_parse_upstream(n, defaults, where) for n in _patterns(item, where) or []]
        else:
            found.append(_parse_upstream(item, defaults, where))
    return tuple(found)


def _parse_client_entry(raw: object, defaults: Mapping[str, Any], key: str) -> list[ClientSpec]:
    """One entry of ``clients``: one identity (``id``) or several (``ids``), placed in
    containers by ``container`` and ``per_container`` (see the module docstring)."""
    item = _mapping(raw, key)
    if "ids" not in item:
        if "per_container" in item:
            raise TopologyError(f"{key}: per_container needs ids (several identities)")
        return [_parse_client(item, defaults, key)]
    if "id" in item:
        raise TopologyError(f"{key}: give id (one identity) or ids (several), not both")
    ids = _patterns(item.pop("ids"), f"{key}.ids")
    if not ids:
        raise TopologyError(f"{key}.ids: expected a name pattern or a non-empty list of them")
    per = item.pop("per_container", None)
    prefix = item.pop("container", None)
    if per is not None:
        per = _int(per, f"{key}.per_container", 1)
        if prefix is None:
            raise TopologyError(
                f"{key}: per_container needs container: the prefix of the containers' names"
            )
    specs: list[ClientSpec] = []
    count = 1 if per is None else -(-len(ids) // per)
    width = len(str(count))
    for index, client_id in enumerate(ids):
        entry = {**item, "id": client_id}
        if prefix is not None:
            entry["container"] = prefix if per is None else f"{prefix}-{index // per + 1:0{width}d}"
        specs.append(_parse_client(entry, defaults, f"{key} ({client_id})"))
    return specs


def _check_containers(clients: Sequence[ClientSpec], upstreams: Sequence[str], where: str) -> None:
    """Identities sharing a container share every option and present their own pairs;
    a container's name is no upstream, not proxy, and an identity's only if it runs that
    identity alone (the run reads a member's lines and an identity's by the same name)."""
    groups: dict[str, list[ClientSpec]] = {}
    for spec in clients:
        groups.setdefault(spec.container_name, []).append(spec)
    owner = {c.id: c.container_name for c in clients}
    for name, specs in groups.items():
        if name in upstreams or name == "proxy":
            raise TopologyError(f"{where}: container name {name} is taken by an upstream or proxy")
        if name in owner and [s.id for s in specs] != [name]:
            raise TopologyError(
                f"{where}: container name {name} is also an identity (in container "
                f"{owner[name]}); a container named like an identity runs that one alone"
            )
        if len(specs) == 1:
            continue
        stems = [s.id for s in specs if s.cert_stem is not None]
        if stems:
            raise TopologyError(
                f"{where}: container {name} runs several identities, so each presents its own "
                f"pair: no cert_stem ({', '.join(stems)})"
            )
        first = replace(specs[0], id="", container=None)
        for spec in specs[1:]:
            other = replace(spec, id="", container=None)
            if other != first:
                differ = [
                    f.name
                    for f in fields(ClientSpec)
                    if getattr(first, f.name) != getattr(other, f.name)
                ]
                raise TopologyError(
                    f"{where}: container {name} is one client process, but {specs[0].id} and "
                    f"{spec.id} differ in {', '.join(differ)}"
                )


_RULE_NAMES = ("client", "upstream")


def _expand_rules(proxy: dict[str, Any], where: str) -> dict[str, Any]:
    """``proxy.authorization.rules``: each rule's ``client`` and ``upstream`` patterns
    (``client.{181..200}``) as the lists of names they stand for."""
    authorization = proxy.get("authorization")
    if not isinstance(authorization, Mapping):
        return proxy
    rules = authorization.get("rules")
    if not isinstance(rules, list):
        return proxy
    expanded: list[Any] = []
    for i, rule in enumerate(rules):
        if not isinstance(rule, Mapping):
            expanded.append(rule)  # the proxy's own parser names what is wrong
            continue
        new = dict(rule)
        for field_name in _RULE_NAMES:
            value = rule.get(field_name)
            names = _patterns(value, f"{where}.authorization.rules[{i}].{field_name}")
            if names is not None and names != value:
                new[field_name] = names if len(names) > 1 or isinstance(value, list) else names[0]
        expanded.append(new)
    return {**proxy, "authorization": {**authorization, "rules": expanded}}


def parse_topology(raw: object, name: str) -> Topology:
    """Validate a decoded topology document."""
    where = f"topology {name}"
    doc = _mapping(raw, where)
    _check_keys(doc, _TOP_KEYS, where)
    up_defaults = _mapping(doc.get("upstream_defaults"), f"{where}: upstream_defaults")
    cl_defaults = _mapping(doc.get("client_defaults"), f"{where}: client_defaults")
    upstreams = _parse_upstreams(doc.get("upstreams"), up_defaults, f"{where}: upstreams")
    raw_clients = doc.get("clients") or []
    if not isinstance(raw_clients, list):
        raise TopologyError(f"{where}: clients: expected a list")
    clients = tuple(
        spec
        for i, item in enumerate(raw_clients)
        for spec in _parse_client_entry(item, cl_defaults, f"{where}: clients[{i}]")
    )
    for label, names in (
        ("upstream", [u.name for u in upstreams]),
        ("client", [c.id for c in clients]),
    ):
        duplicates = sorted(_twice(names))
        if duplicates:
            raise TopologyError(f"{where}: {label} names used twice: {', '.join(duplicates)}")
    _check_containers(clients, [u.name for u in upstreams], where)
    certs = _mapping(doc.get("certs"), f"{where}: certs")
    _check_keys(certs, {"expired", "other_ca"}, f"{where}: certs")
    return Topology(
        name=name,
        description=str(doc.get("description", "")),
        upstreams=upstreams,
        clients=clients,
        proxy=_expand_rules(_mapping(doc.get("proxy"), f"{where}: proxy"), f"{where}: proxy"),
        expired=_names(certs.get("expired"), f"{where}: certs.expired"),
        other_ca=_names(certs.get("other_ca"), f"{where}: certs.other_ca"),
    )


def topology_path(name: str, directory: Path = TOPOLOGY_DIR) -> Path:
    return directory / f"{name}.yaml"


def list_topologies(directory: Path = TOPOLOGY_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml"))


def load_topology(name: str, directory: Path = TOPOLOGY_DIR) -> Topology:
    """A topology by name (``lab/topologies/NAME.yaml``) or by a file's path."""
    given = Path(name)
    if given.suffix in (".yaml", ".yml") or given.parent != Path("."):
        directory, name = given.parent, given.stem
        path = given
    else:
        path = topology_path(name, directory)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        known = ", ".join(list_topologies(directory)) or "none"
        raise TopologyError(
            f"cannot read topology {path}: {exc.strerror} (known: {known})"
        ) from None
    except yaml.YAMLError as exc:
        raise TopologyError(f"topology {path} is not valid YAML: {exc}") from None
    return parse_topology(raw, name)


# --- the proxy configuration of a run -----------------------------------------------


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge recursively, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            merged[key] = deep_merge(old, value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_reference_config(path: Path = REFERENCE_PROXY_CONFIG) -> dict[str, Any]:
    """The reference settings for runs and test containers: the file without
    ``admin.metrics_listen``, the compose lab's listener for its Prometheus (no run or
    test container has the network whose name it binds to)."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise TopologyError(f"{path} is not a YAML mapping")
    admin = raw.get("admin")
    if isinstance(admin, dict):
        raw["admin"] = {k: v for k, v in admin.items() if k != "metrics_listen"}
    return raw


def proxy_config(
    reference: Mapping[str, Any], topology: Topology, addresses: Mapping[str, str]
) -> dict[str, Any]:
    """The run's proxy config: the reference, the topology's overrides, and the run's
    upstreams (``addresses`` maps each upstream name to its ``ip:port``)."""
    config = deep_merge(reference, topology.proxy)
    upstreams: list[dict[str, Any]] = []
    for u in topology.upstreams:
        entry: dict[str, Any] = {"address": addresses[u.name], "name": u.name}
        if u.proxy_protocol is not None:
            entry["proxy_protocol"] = u.proxy_protocol
        upstreams.append(entry)
    config["upstreams"] = upstreams
    config.setdefault("listen", f"0.0.0.0:{PROXY_PORT}")
    tls = dict(config.get("tls") or {})
    tls.setdefault("ca", f"{CERTS_DIR}/ca.pem")
    tls.setdefault("cert", f"{CERTS_DIR}/server.pem")
    tls.setdefault("key", f"{CERTS_DIR}/server.key")
    config["tls"] = tls
    return config


def nominal_config(reference: Mapping[str, Any], topology: Topology) -> dict[str, Any]:
    """The run's proxy config before a run exists: upstreams at ``name:8000`` (rules
    name upstreams, so what they allow does not depend on the addresses)."""
    names = {u.name: f"{u.name}:{UPSTREAM_PORT}" for u in topology.upstreams}
    return proxy_config(reference, topology, names)


def upstream_proxy_protocol(config: Mapping[str, Any], name: str) -> str:
    """What the proxy configured by ``config`` sends the upstream ``name`` first: its
    entry's ``proxy_protocol``, else the global ``proxy_protocol``, else ``none``. The
    upstream must expect exactly that (``UPSTREAM_PROXY_PROTOCOL``)."""
    default = str(config.get("proxy_protocol") or "none")
    for entry in config.get("upstreams") or []:
        if isinstance(entry, Mapping) and entry.get("name") == name:
            return str(entry.get("proxy_protocol") or default)
    return default


def drain_grace(config: Mapping[str, Any]) -> float:
    """``timeouts.drain`` of a proxy config, with the proxy's default (30s)."""
    timeouts = config.get("timeouts") or {}
    return parse_duration(timeouts.get("drain", "30s"), "timeouts.drain")


@dataclass(frozen=True, slots=True)
class Timing:
    """The proxy's health-check timing, and the window after which a dead upstream must
    be out of rotation: interval + timeout + margin."""

    interval: float
    timeout: float
    fall: int
    rise: int
    connect: float

    def window(self, margin: float) -> float:
        return self.interval * self.fall + self.timeout + margin


def timing(config: Mapping[str, Any]) -> Timing:
    health = config.get("health_check") or {}
    timeouts = config.get("timeouts") or {}
    return Timing(
        interval=parse_duration(health.get("interval", "3s"), "health_check.interval"),
        timeout=parse_duration(health.get("timeout", "1s"), "health_check.timeout"),
        fall=int(health.get("fall", 1)),
        rise=int(health.get("rise", 1)),
        connect=parse_duration(timeouts.get("connect", "1s"), "timeouts.connect"),
    )


def rate_limit(config: Mapping[str, Any]) -> tuple[bool, float, int]:
    """(enabled, rate, burst) of a proxy config, with the proxy's defaults."""
    section = config.get("rate_limit") or {}
    return (
        bool(section.get("enabled", True)),
        float(section.get("rate", 2)),
        int(section.get("burst", 4)),
    )


# --- addresses ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Addresses:
    """Static addresses on a run's two networks: *front* (clients and the proxy) and
    *back* (the proxy and the upstreams). No client shares a network with an upstream.

    Upstreams are addressed by IP in the proxy config so that no DNS lookup is ever
    made for them: on an internal network the engine's resolver takes ~10 s to give
    up on the name of a stopped or disconnected container, and it would try outside."""

    front: str  # subnet
    back: str  # subnet
    proxy_front: str
    proxy_back: str
    upstreams: dict[str, str]
    clients: dict[str, str]


def _hosts(subnet: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    net = ipaddress.ip_network(subnet, strict=False)
    if net.num_addresses < 256:
        raise ValueError(f"subnet {subnet} is too small for a lab run (need a /24 or larger)")
    return net


def gateway(subnet: str) -> str:
    """Host .1 of a subnet: the network's gateway."""
    return str(_hosts(subnet).network_address + 1)


def assign_addresses(
    front: str, back: str, upstreams: Sequence[str], clients: Sequence[str]
) -> Addresses:
    """Fixed host numbers: gateway .1 and the proxy .10 on both networks; upstreams from
    .20 on the back one, clients from .100 on the front one."""
    front_net, back_net = _hosts(front), _hosts(back)
    if len(upstreams) > 70 or len(clients) > 150:
        raise ValueError("at most 70 upstreams and 150 clients per run")
    return Addresses(
        front=str(front_net),
        back=str(back_net),
        proxy_front=str(front_net.network_address + 10),
        proxy_back=str(back_net.network_address + 10),
        upstreams={
            name: str(back_net.network_address + 20 + i) for i, name in enumerate(upstreams)
        },
        clients={name: str(front_net.network_address + 100 + i) for i, name in enumerate(clients)},
    )
