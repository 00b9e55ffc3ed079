"""Command-line configuration. Pure: :func:`load_configs` turns ``argv`` into one frozen
:class:`Config` per identity (``--id`` may be repeated: several identities in one
process) or raises :class:`ConfigError` (argparse itself exits 2 on bad syntax);
:func:`load_config` is the same for exactly one identity.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

# The shared parsers and error, re-exported ("X as X"): the other modules and the tests
# import them from here.
from l4common.addresses import format_address
from l4common.addresses import parse_address as parse_address  # noqa: PLC0414
from l4common.durations import parse_duration as parse_duration  # noqa: PLC0414
from l4common.errors import ConfigError as ConfigError  # noqa: PLC0414

DEFAULT_CERTS = Path("/certs")
DEFAULT_INTERVAL_MIN = "200ms"
DEFAULT_INTERVAL_MAX = "1s"
DEFAULT_TIMEOUT = "5s"
MAX_IDENTITIES = 1000  # --id given more often than this is a mistake, not a lab


@dataclass(frozen=True, slots=True)
class Config:
    client_id: str
    host: str
    port: int
    certs: Path = DEFAULT_CERTS
    server_name: str = "localhost"
    interval_min: float = 0.2
    interval_max: float = 1.0
    timeout: float = 5.0
    seed: int | None = None
    count: int | None = None
    duration: float | None = None
    burst: bool = False
    concurrency: int = 1
    cert_stem: str | None = None  # None: connect without a client certificate
    transfer_bytes: int | None = None  # transfer mode: stream this many bytes to an echo
    transfer_time: float = 0.0  # transfer mode: pace the bytes over about this long
    # Several identities in one process: wait a random part of interval_max before the
    # first attempt, so that they do not all connect at the same moment.
    stagger: bool = False

    @property
    def transfer(self) -> bool:
        """Transfer mode (``--transfer-bytes``) rather than one request and its reply."""
        return self.transfer_bytes is not None

    @property
    def proxy(self) -> str:
        return format_address(self.host, self.port)

    @property
    def message(self) -> bytes:
        return f"Hello from {self.client_id}\n".encode()


# ASCII digits only (\d would take fullwidth and Arabic-Indic digits), and at most 15
# of them (int() of thousands of digits is slow and then refused).
_SIZE = re.compile(r"^[ \t]*([0-9]{1,15})[ \t]*(|b|k|kib|m|mib|g|gib)[ \t]*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20}
_SIZE_UNITS |= {"g": 1 << 30, "gib": 1 << 30}


def parse_size(text: str, what: str) -> int:
    """``"4194304"``, ``"512KiB"``, ``"4MiB"``, ``"1GiB"`` (``K``/``M``/``G`` are binary
    too) as a number of bytes."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(
            what, f"expected a size such as '65536', '512KiB' or '4MiB', got {text!r}"
        )
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def default_server_name(host: str) -> str:
    """The name to verify when ``--server-name`` is not given: the proxy's host name, or
    ``localhost`` when the proxy is given as an IP address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return "localhost"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Synthetic mTLS client: one connection per attempt, one JSON line each.",
    )
    parser.add_argument(
        "--id",
        action="append",
        help="client name, used in logs and the message (default: the CLIENT_ID environment "
        "variable, e.g. client.{{.Task.Slot}} in a swarm service); repeat it to run several "
        "identities in this process, each with its own DIR/<id>.pem and .key",
    )
    parser.add_argument("--proxy", required=True, help="HOST:PORT of the proxy")
    parser.add_argument(
        "--certs", default=str(DEFAULT_CERTS), help="directory with ca.pem, <id>.pem, <id>.key"
    )
    parser.add_argument(
        "--server-name",
        help="TLS server name to send and verify (default: the proxy host, or localhost if "
        "the proxy is an IP address)",
    )
    parser.add_argument("--interval-min", default=DEFAULT_INTERVAL_MIN, help="default 200ms")
    parser.add_argument("--interval-max", default=DEFAULT_INTERVAL_MAX, help="default 1s")
    parser.add_argument(
        "--timeout",
        default=DEFAULT_TIMEOUT,
        help="per attempt: connect + handshake + reply, or the whole transfer (default 5s)",
    )
    parser.add_argument("--seed", type=int, help="seed for the random intervals")
    parser.add_argument("--count", type=int, help="stop after N attempts")
    parser.add_argument(
        "--duration", help="start no attempt after this long, e.g. 30s (with --count: first wins)"
    )
    parser.add_argument("--burst", action="store_true", help="no interval: attempts back to back")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="attempts in flight at once (default 1)"
    )
    parser.add_argument(
        "--transfer-bytes",
        help="transfer mode: send this many bytes of seeded pseudo-random data (e.g. 4MiB) "
        "to an echo upstream and check the echo byte for byte",
    )
    parser.add_argument(
        "--transfer-time",
        help="transfer mode: pace the bytes evenly over about this long (default: as fast "
        "as possible); --timeout must be longer",
    )
    cert = parser.add_mutually_exclusive_group()
    cert.add_argument("--no-cert", action="store_true", help="present no client certificate")
    cert.add_argument(
        "--cert-stem", help="use DIR/STEM.pem and DIR/STEM.key instead of the --id pair"
    )
    return parser


def _identity(value: object) -> str:
    client_id = str(value)
    if not client_id or not client_id.isprintable() or len(client_id) > 200:
        raise ConfigError("--id", "must be 1..200 printable characters")
    return client_id


def _identities(ids: list[str] | None, env: Mapping[str, str]) -> list[str]:
    """The ``--id`` values (or ``CLIENT_ID``), each checked, none twice."""
    if ids is None:
        if "CLIENT_ID" not in env:
            raise ConfigError("--id", "is required (or CLIENT_ID in the environment)")
        return [_identity(env["CLIENT_ID"])]
    if len(ids) > MAX_IDENTITIES:
        raise ConfigError("--id", f"given {len(ids)} times, at most {MAX_IDENTITIES}")
    found = [_identity(value) for value in ids]
    twice = sorted({i for i in found if found.count(i) > 1})
    if twice:
        raise ConfigError("--id", f"given twice: {', '.join(twice)}")
    return found


def load_configs(
    argv: Sequence[str] | None, environ: Mapping[str, str] | None = None
) -> tuple[Config, ...]:
    """``argv`` (``None``: ``sys.argv[1:]``) and ``environ`` (``None``: ``os.environ``; only
    ``CLIENT_ID`` is read) into one :class:`Config` per identity, in ``--id`` order. With
    several identities each presents its own pair (``--cert-stem`` is refused), identity
    ``i`` (from 0) seeds its intervals with ``--seed`` + ``i``, and each is staggered
    (:attr:`Config.stagger`)."""
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    ids = _identities(args.id, env)
    if len(ids) > 1 and args.cert_stem is not None:
        raise ConfigError("--cert-stem", "names one pair: it cannot serve several --id")
    one = _load_one(args, ids[0])
    if len(ids) == 1:
        return (one,)
    return tuple(
        replace(
            one,
            client_id=client_id,
            cert_stem=None if args.no_cert else client_id,
            seed=None if one.seed is None else one.seed + index,
            stagger=True,
        )
        for index, client_id in enumerate(ids)
    )


def load_config(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> Config:
    """:func:`load_configs` for exactly one identity (``--id`` once, or ``CLIENT_ID``)."""
    configs = load_configs(argv, environ)
    if len(configs) != 1:
        raise ConfigError("--id", f"given {len(configs)} times where one identity is expected")
    return configs[0]


def _load_one(args: argparse.Namespace, client_id: str) -> Config:
    """Every option but the identity, checked once, for ``client_id``."""
    proxy = parse_address(str(args.proxy), "--proxy")  # port 0 is no place to connect to
    interval_min = parse_duration(str(args.interval_min), "--interval-min", allow_zero=True)
    interval_max = parse_duration(str(args.interval_max), "--interval-max", allow_zero=True)
    if interval_min > interval_max:
        raise ConfigError(
            "--interval-min",
            f"{args.interval_min} must not exceed --interval-max ({args.interval_max})",
        )
    timeout = parse_duration(str(args.timeout), "--timeout")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count", f"must be at least 1, got {args.count}")
    duration = None
    if args.duration is not None:
        duration = parse_duration(str(args.duration), "--duration", allow_zero=True)
    if args.concurrency < 1:
        raise ConfigError("--concurrency", f"must be at least 1, got {args.concurrency}")
    cert_stem = None if args.no_cert else str(args.cert_stem or client_id)
    transfer_bytes = None
    if args.transfer_bytes is not None:
        transfer_bytes = parse_size(str(args.transfer_bytes), "--transfer-bytes")
        if transfer_bytes < 1:
            raise ConfigError("--transfer-bytes", "must be at least 1 byte")
    transfer_time = 0.0
    if args.transfer_time is not None:
        if transfer_bytes is None:
            raise ConfigError("--transfer-time", "needs --transfer-bytes")
        transfer_time = parse_duration(str(args.transfer_time), "--transfer-time", allow_zero=True)
        if transfer_time >= timeout:
            raise ConfigError(
                "--timeout",
                f"{args.timeout} must be longer than --transfer-time ({args.transfer_time}): "
                "it bounds the whole transfer",
            )
    return Config(
        client_id=client_id,
        host=proxy.host,
        port=proxy.port,
        certs=Path(args.certs),
        server_name=args.server_name or default_server_name(proxy.host),
        interval_min=interval_min,
        interval_max=interval_max,
        timeout=timeout,
        seed=args.seed,
        count=args.count,
        duration=duration,
        burst=bool(args.burst),
        concurrency=int(args.concurrency),
        cert_stem=cert_stem,
        transfer_bytes=transfer_bytes,
        transfer_time=transfer_time,
    )
