"""The control client: switch the running upstream's faults (``docker exec``).

    python3 -m upstream.ctl set hang --for 10s
    python3 -m upstream.ctl set drip 16 100ms
    python3 -m upstream.ctl set delay 2s
    python3 -m upstream.ctl clear
    python3 -m upstream.ctl show

Prints the upstream's one-line JSON answer; exits 0 when it says ok, 1 when it refused
the request, 2 when there is no control socket to talk to.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence

from .config import ENV_CONTROL
from .faults import KINDS

TIMEOUT = 5.0


def request_of(args: argparse.Namespace) -> dict[str, object]:
    if args.op != "set":
        return {"op": args.op}
    request: dict[str, object] = {"op": "set", "fault": args.kind, "params": args.params}
    if args.lasting is not None:
        request["for"] = args.lasting
    return request


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m upstream.ctl", description=__doc__)
    parser.add_argument("--control", default=os.environ.get(ENV_CONTROL), help="socket path")
    ops = parser.add_subparsers(dest="op", required=True)
    put = ops.add_parser("set", help="switch a fault on (replacing the one in force)")
    put.add_argument("kind", choices=KINDS)
    put.add_argument("params", nargs="*")
    put.add_argument("--for", dest="lasting", help="how long (e.g. 10s); default: until cleared")
    ops.add_parser("clear", help="switch the fault off")
    ops.add_parser("show", help="the fault in force and its time left")
    args = parser.parse_args(argv)
    if not args.control:
        print(f"upstream.ctl: no control socket (--control or {ENV_CONTROL})", file=sys.stderr)
        return 2
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(args.control)
            sock.sendall(json.dumps(request_of(args)).encode() + b"\n")
            answer = sock.makefile("rb").readline()
    except OSError as exc:
        print(f"upstream.ctl: cannot talk to {args.control}: {exc}", file=sys.stderr)
        return 2
    text = answer.decode("utf-8", errors="replace").strip()
    print(text)
    try:
        return 0 if json.loads(text).get("ok") else 1
    except (ValueError, AttributeError):
        return 1


if __name__ == "__main__":
    sys.exit(main())
