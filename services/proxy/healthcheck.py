#!/usr/bin/env python3
"""Container health check for the proxy: ``python3 healthcheck.py [CONFIG]``.

Healthy (exit 0) means: (a) the proxy's listen port accepts a TCP connection, and (b) at
least one upstream named in the config accepts a TCP connection. Anything else exits 1
with one line on stderr saying why. Every connect is bounded by 1 s. The config is read
with PyYAML only to find the addresses; the proxy itself validates it.

Stopgap: the proxy has no admin endpoint yet. When the admin ``/ready`` endpoint lands
(a later issue), the image's HEALTHCHECK calls that instead and this script goes away.
The probe of the listen port is a plain TCP connect that closes before the handshake, so
the proxy logs one ``access`` line per probe (peer 127.0.0.1, decision ``tls_failed``,
reason ``eof_during_handshake``); the upstream probes show up as ``empty`` connections.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

DEFAULT_CONFIG = Path("/etc/l4proxy/config.yaml")
DEFAULT_LISTEN = "0.0.0.0:8443"
CONNECT_TIMEOUT = 1.0
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}  # noqa: S104


def split_address(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); raises ValueError."""
    value = text.strip()
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
    else:
        host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a host:port address: {text!r}")
    return host, int(port)


def addresses(raw: object) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """The address to probe for the listener, and the upstream addresses."""
    if not isinstance(raw, dict):
        raise TypeError("the config is not a YAML mapping")
    host, port = split_address(str(raw.get("listen") or DEFAULT_LISTEN))
    listen = (WILDCARDS.get(host, host), port)
    items = raw.get("upstreams")
    if not isinstance(items, list):
        raise TypeError("the config has no upstreams list")
    upstreams = [
        split_address(str(item["address"] if isinstance(item, dict) else item)) for item in items
    ]
    return listen, upstreams


def can_connect(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=CONNECT_TIMEOUT):
            return True
    except OSError:
        return False


def main(argv: Sequence[str]) -> int:
    path = Path(argv[0]) if argv else DEFAULT_CONFIG
    try:
        listen, upstreams = addresses(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as exc:
        print(f"unhealthy: cannot read {path}: {exc}", file=sys.stderr)
        return 1
    if not can_connect(listen):
        print(f"unhealthy: listen port {listen[0]}:{listen[1]} refuses", file=sys.stderr)
        return 1
    for address in upstreams:
        if can_connect(address):
            print(f"healthy: listening, upstream {address[0]}:{address[1]} reachable")
            return 0
    print(f"unhealthy: none of {len(upstreams)} upstream(s) reachable", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
