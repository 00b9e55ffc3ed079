"""``python lab.py swarm up|down|status``: the compose lab as a swarm stack.

    python lab.py swarm up [--upstreams N] [--clients M] [--identities K] [--name NAME]
                           [--advertise ADDR] [--rebuild]
    python lab.py swarm down [--name NAME]
    python lab.py swarm status [--name NAME]

``up`` inits a single-node swarm when the engine has none (advertised on loopback
unless ``--advertise`` names a host address), deploys the stack derived from
compose.yaml and waits until the proxy is healthy and the upstreams run. ``down``
removes the stack and leaves the swarm only if ``up`` created it (and removes the
``docker_gwbridge`` the swarm brought).
"""

from __future__ import annotations

import argparse
from typing import Any

from .engine import Engine, EngineError
from .images import ensure_images, image_tag
from .progress import Progress
from .run import LabError
from .stack import Shape
from .swarm import ADVERTISE, Stack, engine_state, ensure_swarm, leave_if_created

DEFAULT_NAME = "layer4lab"


def add_parser(sub: Any) -> None:
    sw = sub.add_parser("swarm", help="the lab as a swarm stack (up, down, status)")
    commands = sw.add_subparsers(dest="swarm_command", required=True, metavar="up|down|status")
    up = commands.add_parser("up", help="init a swarm if none, deploy the stack, wait")
    up.add_argument("--upstreams", type=int, default=3, help="upstream replicas (default 3)")
    up.add_argument("--clients", type=int, default=5, help="client replicas (default 5)")
    up.add_argument(
        "--identities",
        type=int,
        default=0,
        help="client pairs to issue, client.1..client.K (default: --clients; issue more to "
        "scale the clients up later)",
    )
    up.add_argument(
        "--advertise",
        default=ADVERTISE,
        metavar="ADDR",
        help="address a new swarm advertises and listens on (default 127.0.0.1: this "
        "host only; a host address lets other hosts join)",
    )
    up.add_argument("--rebuild", action="store_true", help="rebuild the service images first")
    for name, text in (("up", None), ("down", "remove the stack"), ("status", "show it")):
        parser = up if name == "up" else commands.add_parser(name, help=text)
        parser.add_argument(
            "--name", default=DEFAULT_NAME, help=f"the stack's name (default {DEFAULT_NAME})"
        )


def main(args: argparse.Namespace, engine: Engine, progress: Progress) -> int:
    stack = Stack(engine, args.name, progress)
    if args.swarm_command == "up":
        return _up(args, engine, stack, progress)
    if args.swarm_command == "down":
        stack.remove()
        print(f"stack {args.name} removed; {leave_if_created(engine, progress)}")
        return 0
    state = engine_state(engine)
    print(f"swarm: {state.swarm}")
    if state.swarm == "active":
        print(stack.describe())
    return 0


def _up(args: argparse.Namespace, engine: Engine, stack: Stack, progress: Progress) -> int:
    if min(args.upstreams, args.clients, args.identities) < 0:
        print("lab.py swarm up: counts must not be negative")
        return 2
    # Clients start once the proxy serves (a swarm has no depends_on): deployed at 0.
    shape = Shape(
        upstreams=args.upstreams,
        clients=0,
        identities=max(args.identities, args.clients),
        image_tag=image_tag(),
    )
    ensure_images(engine, progress, rebuild=args.rebuild)
    if stack.tasks_exist():
        raise LabError(f"a stack named {args.name} is deployed already: lab.py swarm down first")
    ensure_swarm(engine, progress, args.advertise)
    try:
        stack.deploy(shape)
        took = stack.wait_ready(shape)
        if args.clients:
            stack.scale("client", args.clients)
            stack.wait_running("client", args.clients)
    except (LabError, EngineError, TimeoutError, KeyboardInterrupt):
        stack.remove()
        leave_if_created(engine.fresh(), progress)
        raise
    name = args.name
    print(
        f"stack {name} is up in {took:.1f}s: {shape.upstreams} upstreams (u1..), "
        f"{args.clients} clients (client.1..), the proxy; overlay networks "
        f"{name}_front and {name}_back, both internal"
    )
    print(f"  docker service logs -f {name}_client        one JSON line per attempt")
    print(f"  docker service scale {name}_upstream=8      the proxy finds them through DNS")
    print(f"  python lab.py swarm status --name {name}")
    print(
        f"  python lab.py swarm down --name {name}      removes it (and the swarm, if up made it)"
    )
    return 0
