"""Command line entry: parse options, load the TLS material, run attempts, print a summary
(per identity: with ``--id`` repeated, one runner per identity on one loop)."""

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
from .config import Config, ConfigError, load_configs
from .runner import Runner


async def run(configs: Sequence[Config], contexts: Sequence[ssl.SSLContext], log: JsonLog) -> None:
    """Run one :class:`Runner` per identity until each stops; SIGTERM/SIGINT stop all."""
    loop = asyncio.get_running_loop()
    who = ",".join(config.client_id for config in configs)

    def on_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.emit(
            "error",
            client=who,
            message=str(context.get("message", "")),
            exception=repr(exc) if exc is not None else None,
        )

    loop.set_exception_handler(on_error)
    runners = [Runner(config, ctx, log) for config, ctx in zip(configs, contexts, strict=True)]

    def stop_all() -> None:
        for runner in runners:
            runner.request_stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    for config in configs:
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
    async with asyncio.TaskGroup() as group:
        for runner in runners:
            group.create_task(_serve(runner, log), name=f"identity-{runner.config.client_id}")


async def _serve(runner: Runner, log: JsonLog) -> None:
    reason = await runner.run()
    log.emit("summary", client=runner.config.client_id, **runner.tally.summary(), reason=reason)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        configs = load_configs(argv)
    except ConfigError as exc:
        print(f"client: {exc}", file=sys.stderr)
        return 2
    contexts: list[ssl.SSLContext] = []
    for config in configs:
        try:
            contexts.append(client_context(config.certs, config.cert_stem))
        except (OSError, ssl.SSLError) as exc:
            print(
                f"client: cannot load TLS material for {config.client_id} from "
                f"{config.certs}: {exc}",
                file=sys.stderr,
            )
            return 2
    try:
        uvloop.run(run(configs, contexts, JsonLog()))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0
    return 0
