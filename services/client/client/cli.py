"""Command line entry: parse options, load the TLS material, run attempts, print a summary."""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from collections.abc import Sequence
from typing import Any

import uvloop

from l4common.logs import JsonLog

from .attempt import client_context
from .config import Config, ConfigError, load_config
from .runner import Runner


async def run(config: Config, ctx: ssl.SSLContext, log: JsonLog) -> None:
    loop = asyncio.get_running_loop()

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.emit(
            "error",
            client=config.client_id,
            message=str(context.get("message", "")),
            exception=repr(exc) if exc is not None else None,
        )

    loop.set_exception_handler(on_error)
    runner = Runner(config, ctx, log)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.request_stop)
    log.emit(
        "started",
        client=config.client_id,
        proxy=config.proxy,
        server_name=config.server_name,
        cert=config.cert_stem,
        burst=config.burst,
        concurrency=config.concurrency,
        mode="transfer" if config.transfer else "reply",
        transfer_bytes=config.transfer_bytes,
        transfer_time_s=config.transfer_time if config.transfer else None,
    )
    reason = await runner.run()
    log.emit("summary", client=config.client_id, **runner.tally.summary(), reason=reason)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    try:
        ctx = client_context(config.certs, config.cert_stem)
    except (OSError, ssl.SSLError) as exc:
        print(f"client: cannot load TLS material from {config.certs}: {exc}", file=sys.stderr)
        return 2
    try:
        uvloop.run(run(config, ctx, JsonLog()))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    return 0
