"""Configuration: YAML in, frozen dataclasses out.

Parsed once at the edge. Every key has a default except ``tls`` and ``upstreams``;
unknown keys are errors, and every error names the key path so a user can act on it.
This module does no I/O beyond reading the one file in :func:`load_config`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml

# The shared parsers and error, re-exported ("X as X"): the proxy's modules and its
# tests import them from here.
from l4common.addresses import Address as Address  # noqa: PLC0414
from l4common.addresses import parse_address as parse_address  # noqa: PLC0414
from l4common.durations import parse_duration as parse_duration  # noqa: PLC0414
from l4common.errors import ConfigError as ConfigError  # noqa: PLC0414

from .names import Refusal, normalize_identity

IdentitySource = Literal["cn", "san_uri", "san_dns"]
IdentityCharset = Literal["ascii", "unicode"]
OnReload = Literal["keep", "close"]
BalancerName = Literal["least_connections", "round_robin", "power_of_two", "consistent_hash"]
Action = Literal["allow", "deny"]
ProxyProtocol = Literal["none", "v2"]

# The accepted spellings, derived from the types so the two cannot drift apart.
IDENTITY_SOURCES: tuple[IdentitySource, ...] = get_args(IdentitySource)
IDENTITY_CHARSETS: tuple[IdentityCharset, ...] = get_args(IdentityCharset)
ON_RELOAD: tuple[OnReload, ...] = get_args(OnReload)
BALANCERS: tuple[BalancerName, ...] = get_args(BalancerName)
ACTIONS: tuple[Action, ...] = get_args(Action)
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = get_args(ProxyProtocol)
ANY = "*"


@dataclass(frozen=True, slots=True)
class Upstream:
    address: Address
    name: str
    proxy_protocol: ProxyProtocol = "none"  # "v2": a PROXY v2 header starts each connection
    group: str | None = None  # the discovered group this upstream is a member of, if any
    # The canonical ``host:port`` string, as written in logs and rules (made once: every
    # connection's admission, log line and counters ask for it).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", str(self.address))


@dataclass(frozen=True, slots=True)
class Group:
    """``{discover: "tasks.upstream:8000", name: up}``: upstreams found through DNS. Every
    A/AAAA record of ``address.host`` is a member: an upstream at ``ip:port`` named
    ``up@ip`` (:func:`member`), in the pool like any other while the name answers it."""

    name: str
    address: Address  # the name to look up and the members' port
    proxy_protocol: ProxyProtocol = "none"


def member_name(group: str, ip: str) -> str:
    """``up@10.0.1.7``, ``up@[fd00::7]``: a member's name, a function of its address only."""
    return f"{group}@[{ip}]" if ":" in ip else f"{group}@{ip}"


def member(group: Group, ip: str) -> Upstream:
    """The member of ``group`` at ``ip`` (an IP literal, any spelling; ``ValueError`` if
    it is not one): keyed ``ip:port`` like any upstream, named ``group@ip``."""
    canonical = str(ipaddress.ip_address(ip))
    return Upstream(
        Address(canonical, group.address.port),
        member_name(group.name, canonical),
        group.proxy_protocol,
        group.name,
    )


@dataclass(frozen=True, slots=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path
    identity: IdentitySource = "cn"
    # "ascii": identities are ASCII without whitespace or controls, compared case-folded;
    # "unicode": any printable text, NFC-normalized and case-folded (see identity.py).
    identity_charset: IdentityCharset = "ascii"
    # TLS 1.3 session tickets sent after each full handshake (0: none, so no resumption).
    session_tickets: int = 1


MAX_SESSION_TICKETS = 8


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    interval: float = 3.0
    timeout: float = 1.0
    rise: int = 1
    fall: int = 1


@dataclass(frozen=True, slots=True)
class RateLimitConfig:
    enabled: bool = True
    rate: float = 2.0
    burst: int = 4
    cleanup_interval: float = 20.0
    max_concurrent: int = 0


@dataclass(frozen=True, slots=True)
class Rule:
    """One authorization rule. ``clients``/``upstreams`` hold names, or ``*`` for any."""

    clients: tuple[str, ...]
    action: Action
    upstreams: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AuthorizationConfig:
    default: Action = "allow"
    rules: tuple[Rule, ...] = ()
    # "close": a reload closes open connections the new rules (or CA) no longer allow.
    on_reload: OnReload = "keep"


@dataclass(frozen=True, slots=True)
class Timeouts:
    handshake: float = 5.0
    connect: float = 1.0
    idle: float = 300.0  # 0 disables the idle timeout
    drain: float = 30.0  # after SIGTERM, how long open connections may finish; 0: close at once
    close: float = 2.0  # once closing, how long buffered bytes may drain before an abort
    max_lifetime: float = 0.0  # a connection is closed after this long; 0: no limit


DEFAULT_LISTEN = Address("0.0.0.0", 8443)  # noqa: S104 - a proxy listens on all interfaces
DEFAULT_ADMIN = Address("127.0.0.1", 9100)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    listen: Address | None = DEFAULT_ADMIN  # None: no admin listener
    # A second, read-only listener: GET /metrics and /ready only (for a scraper on a
    # network that must not reach /status or POST /reload). None: none.
    metrics_listen: Address | None = None


@dataclass(frozen=True, slots=True)
class Config:
    tls: TlsConfig
    upstreams: tuple[Upstream, ...]  # the fixed ones (``address``); may be empty with groups
    groups: tuple[Group, ...] = ()  # the discovered ones (``discover``)
    listen: Address = DEFAULT_LISTEN
    balancer: BalancerName = "least_connections"
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    authorization: AuthorizationConfig = field(default_factory=AuthorizationConfig)
    timeouts: Timeouts = field(default_factory=Timeouts)
    admin: AdminConfig = field(default_factory=AdminConfig)
    max_connections: int = 0  # open client connections at once, handshakes included; 0: no cap
    max_handshakes: int = 256  # connections still in their TLS handshake; 0: no separate cap
    proxy_protocol: ProxyProtocol = "none"  # the default for upstreams that do not say
    # Worker processes that accept, handshake and forward (1: the proxy is one process;
    # more: a supervisor owns the limits, health and admin, see workers.py).
    workers: int = 1


MAX_WORKERS = 64


def available_cpus() -> int:
    """The CPUs this process may run on (a container's cpuset, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _workers(value: object) -> int:
    """``workers``: a count from 1 to :data:`MAX_WORKERS`, or ``auto`` (one per CPU)."""
    if value == "auto":
        return min(MAX_WORKERS, available_cpus())
    count = _int(value, "workers", 1)
    if count > MAX_WORKERS:
        raise ConfigError("workers", f"must be at most {MAX_WORKERS}, got {count}")
    return count


# --- scalar parsers -------------------------------------------------------------------
# parse_duration and parse_address are l4common's (shared with the lab's services).


def _int(value: object, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be at least {minimum}, got {value}")
    return value


def _number(value: object, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(key, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an integer beyond any float
        raise ConfigError(key, "must be a finite number; this one is too large") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(key, f"must be a positive number, got {value!r}")
    return number


def _bool(value: object, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {value!r}")
    return value


_E = TypeVar("_E", bound=str)


def _choice(value: object, key: str, choices: tuple[_E, ...]) -> _E:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}; got {value!r}")
    return value


def _string(value: object, key: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected a non-empty string, got {value!r}")
    return value.strip()


def _section(
    raw: Mapping[str, Any], key: str, allowed: tuple[str, ...], *, required: tuple[str, ...] = ()
) -> Mapping[str, Any]:
    """Return the mapping at ``raw[key]`` (empty if absent) after checking its keys."""
    value = raw.get(key, {})
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, f"expected a mapping, got {type(value).__name__}")
    _check_keys(value, key, allowed, required)
    return value


def _check_keys(
    mapping: Mapping[Any, Any], where: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()
) -> None:
    for name in mapping:
        if name not in allowed:
            path = f"{where}.{name}" if where else str(name)
            raise ConfigError(path, f"unknown key (allowed here: {', '.join(allowed)})")
    for name in required:
        if name not in mapping:
            path = f"{where}.{name}" if where else name
            raise ConfigError(path, "is required")


_T = TypeVar("_T")


def _opt(section: Mapping[str, Any], name: str, default: _T, parse: Callable[[object], _T]) -> _T:
    return parse(section[name]) if name in section else default


# --- sections --------------------------------------------------------------------------

_TOP_KEYS = (
    "listen",
    "tls",
    "upstreams",
    "balancer",
    "health_check",
    "rate_limit",
    "authorization",
    "timeouts",
    "admin",
    "max_connections",
    "max_handshakes",
    "proxy_protocol",
    "workers",
)


def _parse_tls(raw: Mapping[str, Any], base_dir: Path) -> TlsConfig:
    section = _section(
        raw,
        "tls",
        ("ca", "cert", "key", "identity", "identity_charset", "session_tickets"),
        required=("ca", "cert", "key"),
    )

    def path(name: str) -> Path:
        p = Path(_string(section[name], f"tls.{name}"))
        return p if p.is_absolute() else base_dir / p

    return TlsConfig(
        ca=path("ca"),
        cert=path("cert"),
        key=path("key"),
        identity=_opt(
            section, "identity", "cn", lambda v: _choice(v, "tls.identity", IDENTITY_SOURCES)
        ),
        identity_charset=_opt(
            section,
            "identity_charset",
            "ascii",
            lambda v: _choice(v, "tls.identity_charset", IDENTITY_CHARSETS),
        ),
        session_tickets=_opt(section, "session_tickets", 1, _session_tickets),
    )


def _session_tickets(value: object) -> int:
    count = _int(value, "tls.session_tickets", 0)
    if count > MAX_SESSION_TICKETS:
        raise ConfigError(
            "tls.session_tickets", f"at most {MAX_SESSION_TICKETS} per handshake, got {count}"
        )
    return count


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _parse_upstreams(
    raw: Mapping[str, Any], default_pp: ProxyProtocol
) -> tuple[tuple[Upstream, ...], tuple[Group, ...]]:
    """The fixed upstreams and the discovered groups, each in the order written."""
    value = raw["upstreams"]
    if not isinstance(value, list) or not value:
        raise ConfigError("upstreams", "expected a non-empty list of 'host:port' or mappings")
    entries: list[Upstream | Group] = []
    for i, item in enumerate(value):
        key = f"upstreams[{i}]"
        if not isinstance(item, Mapping):
            address = parse_address(item, key)
            entries.append(Upstream(address, str(address), default_pp))
            continue
        _check_keys(item, key, ("address", "discover", "name", "proxy_protocol"))
        if "address" in item and "discover" in item:
            raise ConfigError(
                f"{key}.discover",
                "give address (one upstream) or discover (the upstreams a DNS name answers), "
                "not both",
            )
        if "address" not in item and "discover" not in item:
            raise ConfigError(
                f"{key}.address",
                "is required (or discover: 'name:port' for upstreams found through DNS)",
            )
        # The address first, then the name, then proxy_protocol (the order errors come in).
        field_name = "discover" if "discover" in item else "address"
        address = parse_address(item[field_name], f"{key}.{field_name}")
        if field_name == "discover" and "name" not in item:
            raise ConfigError(
                f"{key}.name",
                "is required with discover: it names the group (in rules) and its members "
                "(NAME@IP)",
            )
        name = _string(item["name"], f"{key}.name") if "name" in item else str(address)
        if "name" in item and not _NAME.match(name):
            raise ConfigError(
                f"{key}.name",
                f"{name!r}: use letters, digits, '.', '-' and '_' (at most 63 characters)",
            )
        proxy_protocol = default_pp
        if "proxy_protocol" in item:
            proxy_protocol = _choice(
                item["proxy_protocol"], f"{key}.proxy_protocol", PROXY_PROTOCOLS
            )
        if field_name == "discover":
            entries.append(Group(name, address, proxy_protocol))
        else:
            entries.append(Upstream(address, name, proxy_protocol))
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        labels = (
            {entry.key, entry.name}
            if isinstance(entry, Upstream)
            else {entry.name, str(entry.address)}
        )
        for label in labels:
            if label in seen and seen[label] != i:
                raise ConfigError(
                    f"upstreams[{i}]", f"{label!r} is already used by upstreams[{seen[label]}]"
                )
            seen[label] = i
    return (
        tuple(e for e in entries if isinstance(e, Upstream)),
        tuple(e for e in entries if isinstance(e, Group)),
    )


def _parse_health(raw: Mapping[str, Any]) -> HealthCheckConfig:
    section = _section(raw, "health_check", ("interval", "timeout", "rise", "fall"))
    d = HealthCheckConfig()
    return HealthCheckConfig(
        interval=_opt(
            section, "interval", d.interval, lambda v: parse_duration(v, "health_check.interval")
        ),
        timeout=_opt(
            section, "timeout", d.timeout, lambda v: parse_duration(v, "health_check.timeout")
        ),
        rise=_opt(section, "rise", d.rise, lambda v: _int(v, "health_check.rise", 1)),
        fall=_opt(section, "fall", d.fall, lambda v: _int(v, "health_check.fall", 1)),
    )


def _parse_rate_limit(raw: Mapping[str, Any]) -> RateLimitConfig:
    section = _section(
        raw, "rate_limit", ("enabled", "rate", "burst", "cleanup_interval", "max_concurrent")
    )
    d = RateLimitConfig()
    return RateLimitConfig(
        enabled=_opt(section, "enabled", d.enabled, lambda v: _bool(v, "rate_limit.enabled")),
        rate=_opt(section, "rate", d.rate, lambda v: _number(v, "rate_limit.rate")),
        burst=_opt(section, "burst", d.burst, lambda v: _int(v, "rate_limit.burst", 1)),
        cleanup_interval=_opt(
            section,
            "cleanup_interval",
            d.cleanup_interval,
            lambda v: parse_duration(v, "rate_limit.cleanup_interval"),
        ),
        max_concurrent=_opt(
            section,
            "max_concurrent",
            d.max_concurrent,
            lambda v: _int(v, "rate_limit.max_concurrent", 0),
        ),
    )


def _names(value: object, key: str) -> tuple[str, ...]:
    """A rule's client or upstream: one string or a non-empty list of strings."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, "expected a name, '*' or a non-empty list of names")
    return tuple(_string(item, key) for item in items)


def _clients(
    value: object, key: str, charset: IdentityCharset, seen: dict[str, tuple[str, str]]
) -> tuple[str, ...]:
    """A rule's client names, normalized as certificates are (names.normalize_identity).

    ``seen`` maps each identity named so far to its first spelling and key: naming it again
    with the same spelling is fine, with another spelling (``Client.A`` after
    ``client.a``) is an error, as it hides which one the author meant.
    """
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(key, "expected a name, '*' or a non-empty list of names")
    result: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise ConfigError(key, f"expected a non-empty string, got {item!r}")
        if item == ANY:
            result.append(ANY)
            continue
        identity = normalize_identity(item, charset)
        if isinstance(identity, Refusal):
            raise ConfigError(
                key,
                f"{item!r} is not a valid identity with tls.identity_charset {charset} "
                f"({identity.reason}); a certificate naming it would be refused",
            )
        first = seen.setdefault(identity, (item, key))
        if first[0] != item:
            raise ConfigError(
                key,
                f"{item!r} and {first[0]!r} ({first[1]}) are the same identity {identity!r} "
                "after normalization (case, Unicode form); spell it one way",
            )
        result.append(identity)
    return tuple(result)


def _parse_authorization(
    raw: Mapping[str, Any],
    upstreams: tuple[Upstream, ...],
    groups: tuple[Group, ...],
    charset: IdentityCharset,
) -> AuthorizationConfig:
    section = _section(raw, "authorization", ("default", "rules", "on_reload"))
    default: Action = _opt(
        section, "default", "allow", lambda v: _choice(v, "authorization.default", ACTIONS)
    )
    rules_raw = section.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError("authorization.rules", "expected a list of rules")
    known = {u.key for u in upstreams} | {u.name for u in upstreams} | {g.name for g in groups}
    rules: list[Rule] = []
    seen: dict[str, tuple[str, str]] = {}  # identity -> (first spelling, its key)
    for i, item in enumerate(rules_raw):
        key = f"authorization.rules[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(
                key,
                "expected a mapping like {client: client.a, action: deny, upstream: 'host:port'}",
            )
        _check_keys(item, key, ("client", "action", "upstream"), ("client", "action", "upstream"))
        targets = _names(item["upstream"], f"{key}.upstream")
        canonical = tuple(_rule_target(t, f"{key}.upstream", known, groups) for t in targets)
        rules.append(
            Rule(
                clients=_clients(item["client"], f"{key}.client", charset, seen),
                action=_choice(item["action"], f"{key}.action", ACTIONS),
                upstreams=canonical,
            )
        )
    on_reload: OnReload = _opt(
        section, "on_reload", "keep", lambda v: _choice(v, "authorization.on_reload", ON_RELOAD)
    )
    return AuthorizationConfig(default=default, rules=tuple(rules), on_reload=on_reload)


def _rule_target(target: str, key: str, known: set[str], groups: tuple[Group, ...]) -> str:
    """A rule's upstream as stored: ``*``, a configured upstream's address or name, a
    discovered group's name, or one member of a group (which DNS has not named yet):
    ``IP:PORT`` with a group's port, or ``GROUP@IP``. Spellings are made canonical
    (``localhost:08000`` is ``localhost:8000``); anything else is an error."""
    if target == ANY or target in known:
        return target
    try:
        address: Address | None = parse_address(target, key)
    except ConfigError:
        address = None
    if address is not None and str(address) in known:
        return str(address)
    if groups:
        found = _member_target(target, address, groups)
        if found is not None:
            return found
    members = (
        ", or a member of a discovered group ('IP:PORT' with the group's port, or 'GROUP@IP')"
        if groups
        else ""
    )
    raise ConfigError(
        key,
        f"{target!r} is not a configured upstream address or name "
        f"(known: {', '.join(sorted(known))}, or '*'{members})",
    )


def _member_target(target: str, address: Address | None, groups: tuple[Group, ...]) -> str | None:
    """The canonical spelling of ``target`` if it can name a member of one of ``groups``."""
    if address is not None:
        try:
            ip = ipaddress.ip_address(address.host)
        except ValueError:
            return None
        if any(g.address.port == address.port for g in groups):
            return str(Address(str(ip), address.port))
        return None
    name, at, host = target.rpartition("@")
    if not at or name not in {g.name for g in groups}:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if ":" not in host:
            return None
    elif ":" in host:
        return None  # IPv6 is written in brackets, as in the member's name
    try:
        return member_name(name, str(ipaddress.ip_address(host)))
    except ValueError:
        return None


def _parse_timeouts(raw: Mapping[str, Any]) -> Timeouts:
    section = _section(
        raw, "timeouts", ("handshake", "connect", "idle", "drain", "close", "max_lifetime")
    )
    d = Timeouts()
    return Timeouts(
        handshake=_opt(
            section, "handshake", d.handshake, lambda v: parse_duration(v, "timeouts.handshake")
        ),
        connect=_opt(
            section, "connect", d.connect, lambda v: parse_duration(v, "timeouts.connect")
        ),
        idle=_opt(
            section, "idle", d.idle, lambda v: parse_duration(v, "timeouts.idle", allow_zero=True)
        ),
        drain=_opt(
            section,
            "drain",
            d.drain,
            lambda v: parse_duration(v, "timeouts.drain", allow_zero=True),
        ),
        close=_opt(section, "close", d.close, lambda v: parse_duration(v, "timeouts.close")),
        max_lifetime=_opt(
            section,
            "max_lifetime",
            d.max_lifetime,
            lambda v: parse_duration(v, "timeouts.max_lifetime", allow_zero=True),
        ),
    )


def _parse_admin(raw: Mapping[str, Any]) -> AdminConfig:
    section = _section(raw, "admin", ("listen", "metrics_listen"))

    def listener(key: str, default: Address | None) -> Address | None:
        if key not in section:
            return default
        value = section[key]
        if value is None or value == "":
            return None
        return parse_address(value, f"admin.{key}", allow_port_zero=True)

    admin = AdminConfig(
        listen=listener("listen", DEFAULT_ADMIN), metrics_listen=listener("metrics_listen", None)
    )
    metrics = admin.metrics_listen
    if metrics is not None and metrics == admin.listen and metrics.port != 0:
        raise ConfigError("admin.metrics_listen", f"{metrics} is also admin.listen")
    return admin


def parse_config(raw: object, base_dir: Path) -> Config:
    """Validate a decoded YAML document. Relative TLS paths resolve against ``base_dir``."""
    if not isinstance(raw, Mapping):
        raise ConfigError("", "the configuration must be a YAML mapping of keys to values")
    _check_keys(raw, "", _TOP_KEYS, ("tls", "upstreams"))
    proxy_protocol: ProxyProtocol = _opt(
        raw, "proxy_protocol", "none", lambda v: _choice(v, "proxy_protocol", PROXY_PROTOCOLS)
    )
    upstreams, groups = _parse_upstreams(raw, proxy_protocol)
    listen = _opt(
        raw, "listen", DEFAULT_LISTEN, lambda v: parse_address(v, "listen", allow_port_zero=True)
    )
    tls = _parse_tls(raw, base_dir)  # before the rules: they are normalized per its charset
    config = Config(
        listen=listen,
        tls=tls,
        upstreams=upstreams,
        groups=groups,
        balancer=_opt(
            raw, "balancer", "least_connections", lambda v: _choice(v, "balancer", BALANCERS)
        ),
        health_check=_parse_health(raw),
        rate_limit=_parse_rate_limit(raw),
        authorization=_parse_authorization(raw, upstreams, groups, tls.identity_charset),
        timeouts=_parse_timeouts(raw),
        admin=_parse_admin(raw),
        max_connections=_opt(raw, "max_connections", 0, lambda v: _int(v, "max_connections", 0)),
        max_handshakes=_opt(raw, "max_handshakes", 256, lambda v: _int(v, "max_handshakes", 0)),
        proxy_protocol=proxy_protocol,
        workers=_opt(raw, "workers", 1, _workers),
    )
    for key in ("listen", "metrics_listen"):
        admin = getattr(config.admin, key)
        if admin is not None and admin == config.listen and admin.port != 0:
            raise ConfigError(f"admin.{key}", f"{admin} is also the proxy's listen address")
    return config


def load_config(path: Path) -> Config:
    """Read and validate a config file; every problem is a :class:`ConfigError`."""
    return read_config(path)[0]


def read_config(path: Path) -> tuple[Config, str]:
    """:func:`load_config`, plus the SHA-256 of the file's bytes (what ``/status`` shows)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None
    return _parse_text(text, path), hashlib.sha256(data).hexdigest()


def _parse_text(text: str, path: Path) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        raise ConfigError("", f"{path} is not valid YAML{where}") from None
    except (ValueError, OverflowError) as exc:  # a value YAML cannot build, e.g. a date
        raise ConfigError("", f"{path} has a value YAML cannot read: {exc}") from None
    except RecursionError:
        raise ConfigError("", f"{path} is nested too deeply") from None
    return parse_config(raw, path.resolve().parent)


def restart_needed(old: Config, new: Config) -> None:
    """Raise :class:`ConfigError` for a change a reload cannot apply (the listeners and
    the number of worker processes)."""
    if new.workers != old.workers:
        raise ConfigError(
            "workers",
            f"changing the number of workers ({old.workers} -> {new.workers}) needs a restart",
        )
    if new.listen != old.listen:
        raise ConfigError(
            "listen", f"changing the listen address ({old.listen} -> {new.listen}) needs a restart"
        )
    for key in ("listen", "metrics_listen"):
        before, after = getattr(old.admin, key), getattr(new.admin, key)
        if before != after:
            raise ConfigError(
                f"admin.{key}",
                f"changing the admin address ({before} -> {after}) needs a restart",
            )


def check_files(config: Config) -> None:
    """Check that the TLS files exist and are readable (``--check`` and start-up)."""
    for name in ("ca", "cert", "key"):
        p: Path = getattr(config.tls, name)
        if not p.is_file():
            raise ConfigError(f"tls.{name}", f"{p} does not exist or is not a file")
