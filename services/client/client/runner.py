"""The attempt loop: ``--concurrency`` workers share one attempt counter and one RNG.

Each worker starts an attempt while :func:`decide.stop_reason` allows it, logs exactly one
``attempt`` line for it, then waits a random interval (none in burst mode).  A stop request
(SIGTERM) or the end of ``--count`` ends every worker's wait at once; attempts in flight
finish (each is bounded by ``--timeout``). One runner serves one identity; a process with
several (``--id`` repeated) runs one runner each on the same loop, and a staggered one
(:attr:`Config.stagger`) first waits a random part of ``--interval-max``.
"""

from __future__ import annotations

import asyncio
import random
import ssl

from l4common.logs import JsonLog, utc_timestamp

from .attempt import Result, attempt, transfer
from .config import Config
from .decide import StopReason, Tally, next_wait, reply_text, stop_reason


class Runner:
    def __init__(self, config: Config, ctx: ssl.SSLContext, log: JsonLog) -> None:
        self.config = config
        self.ctx = ctx
        self.log = log
        self.stop_requested = False
        self.wake = asyncio.Event()  # set when no further attempt may start
        self.rng = random.Random(config.seed)  # noqa: S311 - intervals, not secrets
        self.tally = Tally()
        self.started = 0
        self.reason: StopReason | None = None
        self.deadline: float | None = None

    def request_stop(self) -> None:
        """Start no further attempt (safe to call from a signal handler on the loop)."""
        self.stop_requested = True
        self.wake.set()

    async def run(self) -> StopReason:
        loop = asyncio.get_running_loop()
        if self.config.duration is not None:
            self.deadline = loop.time() + self.config.duration
        if self.config.stagger and not self.config.burst:
            await self._pause(self.rng.uniform(0.0, self.config.interval_max))
        async with asyncio.TaskGroup() as workers:
            for index in range(self.config.concurrency):
                workers.create_task(self._worker(), name=f"worker-{index}")
        return self.reason or "signal"

    def _done(self, now: float) -> bool:
        """No further attempt may start (the first reason is kept for the summary)."""
        reason = stop_reason(
            self.started,
            now,
            count=self.config.count,
            deadline=self.deadline,
            stopping=self.stop_requested,
        )
        if reason is not None:
            self.reason = self.reason or reason
            self.wake.set()
        return reason is not None

    def _claim(self, now: float) -> int | None:
        """The next attempt number, or ``None`` to stop."""
        if self._done(now):
            return None
        self.started += 1
        return self.started

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.config
        while (number := self._claim(loop.time())) is not None:
            # When it began: the line is written after the connection is closed, which
            # may take a while after the outcome (latency_ms ends at the outcome).
            began = utc_timestamp()
            if cfg.transfer:
                result = await transfer(cfg, self.ctx, number)
            else:
                result = await attempt(cfg, self.ctx)
            verdict = result.verdict
            self.tally.add(verdict)
            self.log.emit(
                "attempt",
                client=cfg.client_id,
                attempt=number,
                outcome=verdict.outcome,
                upstream=verdict.upstream,
                reply=reply_text(result.reply),
                started=began,
                latency_ms=round(result.latency * 1000, 3),
                error=verdict.error,
                **(self._transfer_fields(result) if cfg.transfer else {}),
            )
            if self._done(loop.time()):
                return  # e.g. --count reached: no interval after the last attempt
            wait = next_wait(
                self.rng,
                cfg.interval_min,
                cfg.interval_max,
                burst=cfg.burst,
                now=loop.time(),
                deadline=self.deadline,
            )
            await self._pause(wait)

    def _transfer_fields(self, result: Result) -> dict[str, object]:
        """Transfer mode's extra fields of an ``attempt`` line (see the README)."""
        progress = result.progress
        elapsed = result.transfer_time
        return {
            "transfer_bytes": self.config.transfer_bytes,
            "bytes_sent": progress.sent if progress else 0,
            "bytes_received": progress.received if progress else 0,
            "match": progress.complete if progress else False,
            "sha256_sent": progress.sha256_sent if progress else None,
            "sha256_received": progress.sha256_received if progress else None,
            "end": progress.end if progress else None,
            "transfer_ms": None if elapsed is None else round(elapsed * 1000, 3),
        }

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if no further attempt may start."""
        if seconds <= 0:
            await asyncio.sleep(0)  # let signals and other workers run between bursts
            return
        try:
            async with asyncio.timeout(seconds):
                await self.wake.wait()
        except TimeoutError:
            return
