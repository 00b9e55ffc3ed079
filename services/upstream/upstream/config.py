"""Start-up configuration: command line over environment over built-in defaults.

Pure: :func:`load_config` takes ``argv`` and an environment mapping and returns a frozen
:class:`Config` or raises :class:`ConfigError` (argparse itself exits 2 on bad syntax).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast, get_args

# The shared parsers and error, re-exported ("X as X"): the other modules and the tests
# import them from here.
from l4common.addresses import format_address as format_address  # noqa: PLC0414
from l4common.addresses import parse_address as parse_address  # noqa: PLC0414
from l4common.durations import parse_duration as parse_duration  # noqa: PLC0414
from l4common.errors import ConfigError as ConfigError  # noqa: PLC0414

from .trust import TrustError, TrustSpec, parse_trusted

Mode = Literal["reply", "echo", "sink"]
Fault = Literal["none", "close", "reset"]
ProxyProtocol = Literal["none", "v2"]

MODES: tuple[Mode, ...] = get_args(Mode)
FAULTS: tuple[Fault, ...] = get_args(Fault)
PROXY_PROTOCOLS: tuple[ProxyProtocol, ...] = get_args(ProxyProtocol)

DEFAULT_LISTEN = "0.0.0.0:8000"
DEFAULT_EMPTY_LOG_INTERVAL = 1.0
DEFAULT_IDLE_TIMEOUT = 300.0

ENV_LISTEN = "UPSTREAM_LISTEN"
ENV_NAME = "UPSTREAM_NAME"
ENV_MODE = "UPSTREAM_MODE"
ENV_DELAY = "UPSTREAM_DELAY"
ENV_FAULT = "UPSTREAM_FAULT"
ENV_PROXY_PROTOCOL = "UPSTREAM_PROXY_PROTOCOL"
ENV_TRUSTED_PROXIES = "UPSTREAM_TRUSTED_PROXIES"
ENV_CONTROL = "UPSTREAM_CONTROL"
NO_TRUST_LIST = TrustSpec()


@dataclass(frozen=True, slots=True)
class Config:
    host: str
    port: int
    name: str
    mode: Mode = "reply"
    delay: float = 0.0  # seconds before the first response action (reply, echo, fault, close)
    fault: Fault = "none"
    empty_log_interval: float = DEFAULT_EMPTY_LOG_INTERVAL  # 0 logs every empty connection
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT  # 0 disables it
    proxy_protocol: ProxyProtocol = "none"  # v2: every connection starts with a PROXY v2 header
    trusted_proxies: TrustSpec = NO_TRUST_LIST  # empty: a header is believed from anyone
    control: str | None = None  # path of the control socket (run-time faults); None: none

    @property
    def listen(self) -> str:
        return format_address(self.host, self.port)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m upstream",
        description="A TCP upstream for the layer4lab: reply, echo or sink, with fault knobs.",
    )
    parser.add_argument(
        "--listen",
        default=environ.get(ENV_LISTEN, DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (env {ENV_LISTEN}; default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--name",
        default=environ.get(ENV_NAME),
        help=f"name used in replies and logs (env {ENV_NAME}; default: the listen address)",
    )
    parser.add_argument(
        "--mode",
        default=environ.get(ENV_MODE, "reply"),
        help=f"reply, echo or sink (env {ENV_MODE}; default reply)",
    )
    parser.add_argument(
        "--delay",
        default=environ.get(ENV_DELAY, "0"),
        help=f"wait this long before responding, e.g. 2s, 250ms (env {ENV_DELAY}; default 0)",
    )
    parser.add_argument(
        "--fault",
        default=environ.get(ENV_FAULT, "none"),
        help=f"none, close or reset (env {ENV_FAULT}; default none)",
    )
    parser.add_argument(
        "--proxy-protocol",
        default=environ.get(ENV_PROXY_PROTOCOL, "none"),
        help=(
            "none or v2: with v2 every connection must start with a PROXY protocol v2 "
            "header (client address and identity from the proxy; connections without one "
            f"are closed) (env {ENV_PROXY_PROTOCOL}; default none)"
        ),
    )
    parser.add_argument(
        "--trusted-proxy",
        dest="trusted_proxies",
        action="append",
        default=None,
        metavar="ADDR|CIDR|NAME",
        help=(
            "with --proxy-protocol v2: serve only connections from this peer (repeatable; "
            "names are looked up when a peer matches nothing); anyone else is cut off "
            f"with outcome untrusted_proxy (env {ENV_TRUSTED_PROXIES}, comma-separated; "
            "default: anyone)"
        ),
    )
    parser.add_argument(
        "--empty-log-interval",
        default=str(DEFAULT_EMPTY_LOG_INTERVAL),
        help="log empty connections at most once per this interval (0 = all; default 1s)",
    )
    parser.add_argument(
        "--idle-timeout",
        default=str(DEFAULT_IDLE_TIMEOUT),
        help="close a connection idle this long (0 = never; default 300s)",
    )
    parser.add_argument(
        "--control",
        default=environ.get(ENV_CONTROL) or None,
        help=(
            "a Unix socket path for run-time faults (python3 -m upstream.ctl; mode 0600, "
            f"no network reaches it) (env {ENV_CONTROL}; default: none)"
        ),
    )
    return parser


def _choice(value: str, choices: Sequence[str], what: str) -> str:
    text = value.strip().lower()
    if text not in choices:
        raise ConfigError(what, f"expected one of {', '.join(choices)}, got {value!r}")
    return text


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Config:
    args = build_parser(environ).parse_args(argv)
    # Port 0: the kernel picks a free port (the listening line says which).
    listen = parse_address(str(args.listen), f"--listen/{ENV_LISTEN}", allow_port_zero=True)
    name = str(args.name) if args.name else str(args.listen).strip()
    if len(name) > 200 or not name.isprintable():
        raise ConfigError(f"--name/{ENV_NAME}", "must be printable and at most 200 characters")
    mode = cast(Mode, _choice(str(args.mode), MODES, f"--mode/{ENV_MODE}"))
    fault = cast(Fault, _choice(str(args.fault), FAULTS, f"--fault/{ENV_FAULT}"))
    proxy_protocol = cast(
        ProxyProtocol,
        _choice(
            str(args.proxy_protocol), PROXY_PROTOCOLS, f"--proxy-protocol/{ENV_PROXY_PROTOCOL}"
        ),
    )
    entries = args.trusted_proxies
    if entries is None:
        entries = environ.get(ENV_TRUSTED_PROXIES, "").replace(",", " ").split()
    try:
        trusted = parse_trusted(entries)
    except TrustError as exc:
        raise ConfigError(f"--trusted-proxy/{ENV_TRUSTED_PROXIES}", str(exc)) from exc
    if trusted.enabled and proxy_protocol != "v2":
        raise ConfigError(
            f"--trusted-proxy/{ENV_TRUSTED_PROXIES}",
            "only with --proxy-protocol v2 (without PROXY headers there is nothing to trust)",
        )
    return Config(
        host=listen.host,
        port=listen.port,
        name=name,
        mode=mode,
        delay=parse_duration(str(args.delay), f"--delay/{ENV_DELAY}", allow_zero=True),
        fault=fault,
        empty_log_interval=parse_duration(
            str(args.empty_log_interval), "--empty-log-interval", allow_zero=True
        ),
        idle_timeout=parse_duration(str(args.idle_timeout), "--idle-timeout", allow_zero=True),
        proxy_protocol=proxy_protocol,
        trusted_proxies=trusted,
        control=str(args.control) if args.control else None,
    )
