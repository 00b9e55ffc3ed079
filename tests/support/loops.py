"""Run an event loop (uvloop) in a background thread and call into it synchronously.

The proxy under test runs in one of these, test upstreams in another, and the test's
clients in the main thread, so a test can read the proxy's exact internal counters
(through :meth:`LoopThread.call`) while real sockets carry real traffic.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
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


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 10.0) -> float:
    """Poll ``predicate`` until it holds (failing with ``what`` at the deadline); return
    the monotonic time at which it held. The short sleep is a polling step between
    checks of a condition, never a wait standing in for one."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


async def await_condition(
    what: str,
    predicate: Callable[[], bool],
    timeout: float = 10.0,  # noqa: ASYNC109 - a polling deadline, not an I/O timeout
) -> None:
    """:func:`wait_for` for code running on an event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
