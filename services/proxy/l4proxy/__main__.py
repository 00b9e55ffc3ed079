"""``python -m l4proxy --config PATH [--check]``."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from .config import Config, ConfigError, check_files, read_config
from .logs import JsonLog
from .supervisor import make_proxy
from .tls import server_context


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m l4proxy", description="Layer-4 mTLS load-balancing proxy."
    )
    parser.add_argument("--config", required=True, type=Path, help="YAML configuration file")
    parser.add_argument(
        "--check", action="store_true", help="validate the configuration and exit (0 = valid)"
    )
    return parser.parse_args(argv)


def load_and_check(path: Path) -> tuple[Config, str]:
    config, digest = read_config(path)
    check_files(config)
    server_context(config.tls)  # proves the certificate, key and CA load together
    return config, digest


async def serve(config: Config, log: JsonLog, path: Path | None = None, digest: str = "") -> None:
    """Serve until SIGTERM or SIGINT, then drain: stop accepting and let open connections
    finish for ``timeouts.drain`` (a second signal closes them at once). SIGHUP reloads."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    force = asyncio.Event()

    def on_stop_signal() -> None:
        (force if stop.is_set() else stop).set()

    proxy = make_proxy(config, log, config_path=path, config_sha256=digest or None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, proxy.reload)
    await proxy.start()
    try:
        await stop.wait()
    except BaseException:
        await proxy.stop()
        raise
    await proxy.drain(proxy.config.timeouts.drain, force=force.wait())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    log = JsonLog()
    try:
        config, digest = load_and_check(args.config)
    except ConfigError as exc:
        print(f"l4proxy: invalid configuration {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(
            f"l4proxy: {args.config} is valid: listen {config.listen}, "
            f"{len(config.upstreams)} upstream(s), "
            f"{len(config.groups)} discovered group(s), balancer {config.balancer}, "
            f"{config.workers} worker(s)"
        )
        return 0
    # libuv resolves names on a pool of worker threads (4 by default). Lookups are
    # single-flight per upstream name (see resolver.py); a bigger pool leaves room for
    # several names whose resolver hangs at once. Must be set before the loop starts.
    os.environ.setdefault("UV_THREADPOOL_SIZE", "16")
    try:
        uvloop.run(serve(config, log, args.config, digest))
    except OSError as exc:  # e.g. the listen or admin address is in use
        log.emit("fatal", message=exc.strerror or str(exc))
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
