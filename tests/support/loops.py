"""Run an event loop (uvloop) in a background thread and call into it synchronously.

The proxy under test runs in one of these, test upstreams in another, and the test's
clients in the main thread, so a test can read the proxy's exact internal counters
(through :meth:`LoopThread.call`) while real sockets carry real traffic.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")

DEFAULT_TIMEOUT = 30.0


class LoopThread:
    def __init__(self, name: str) -> None:
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Give cancelled tasks a turn to unwind before the loop closes.
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = DEFAULT_TIMEOUT) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = DEFAULT_TIMEOUT) -> T:
        """Run a plain function on the loop thread (safe access to loop-owned state)."""
        future: Future[T] = Future()

        def invoke() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.loop.call_soon_threadsafe(invoke)
        return future.result(timeout)

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float,  # noqa: ASYNC109 - a polling deadline, not an I/O timeout
    what: str,
    step: float = 0.01,
) -> None:
    """Poll ``predicate`` on this loop until it holds; fail with ``what`` at the deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(step)
