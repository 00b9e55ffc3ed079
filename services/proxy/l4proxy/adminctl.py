"""``python -m l4proxy.adminctl [--config PATH] ready|status|metrics|reload``.

A small client for the admin listener, for the container's HEALTHCHECK and for
operators inside the container (``docker exec <proxy> python3 -m l4proxy.adminctl
status``). It finds the admin address in the proxy's config file (a wildcard address
is reached over loopback), prints the response body and exits 0 on a 2xx answer, 1 on
any other answer or when the listener cannot be reached, 2 on a usage or config error.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from l4common.addresses import format_address, reachable_host

from .config import ConfigError, load_config

DEFAULT_CONFIG = Path("/etc/l4proxy/config.yaml")
# Sent with every request: the listener refuses POST /reload without it (a browser page
# cannot add it without a CORS preflight). The same name as admin.ADMIN_HEADER, which
# is not imported so that the HEALTHCHECK does not load prometheus_client.
ADMIN_HEADERS = {"X-L4proxy-Admin": "1"}
TIMEOUT = 5.0
COMMANDS = {
    "ready": ("GET", "/ready"),
    "status": ("GET", "/status"),
    "metrics": ("GET", "/metrics"),
    "reload": ("POST", "/reload"),
}


def request(host: str, port: int, method: str, path: str) -> tuple[int, bytes]:
    """One request to our own admin listener, which answers with ``Content-Length`` and
    closes (``Connection: close``). A plain socket, not http.client: this runs as the
    HEALTHCHECK every few seconds, and http.client's imports cost a third of its start."""
    authority = format_address(host, port)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {authority}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in ADMIN_HEADERS.items())
        + "Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(head.encode("ascii"))
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = b"".join(chunks)
    status_line, _, rest = response.partition(b"\r\n")
    fields, _, body = rest.partition(b"\r\n\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise OSError(f"not an HTTP response: {status_line[:80]!r}")
    for line in fields.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            body = body[: int(value.strip())]
    return int(parts[1]), body


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m l4proxy.adminctl", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("command", choices=sorted(COMMANDS))
    args = parser.parse_args(argv)
    try:
        listen = load_config(args.config).admin.listen
    except ConfigError as exc:
        print(f"adminctl: {args.config}: {exc}", file=sys.stderr)
        return 2
    if listen is None:
        print(f"adminctl: {args.config} turns the admin listener off", file=sys.stderr)
        return 2
    host = reachable_host(listen.host)
    method, path = COMMANDS[args.command]
    try:
        status, body = request(host, listen.port, method, path)
    except OSError as exc:
        print(f"adminctl: cannot reach the admin listener at {listen}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(body.decode("utf-8", errors="replace"))
    return 0 if 200 <= status < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
