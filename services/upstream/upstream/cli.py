"""Command line entry: parse the configuration, serve on uvloop until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import uvloop

from l4common.logs import JsonLog

from .config import Config, ConfigError, load_config
from .server import serve


async def run(config: Config, log: JsonLog) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly."""
    loop = asyncio.get_running_loop()

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.emit(
            "error",
            message=str(context.get("message", "")),
            exception=repr(exc) if exc is not None else None,
        )

    loop.set_exception_handler(on_error)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await serve(config, log)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    try:
        config = load_config(argv, os.environ if environ is None else environ)
    except ConfigError as exc:
        print(f"upstream: {exc}", file=sys.stderr)
        return 2
    log = JsonLog()
    try:
        uvloop.run(run(config, log))
    except OSError as exc:  # e.g. the listen address is in use
        log.emit("fatal", message=f"cannot listen on {config.listen}: {exc}")
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    return 0
