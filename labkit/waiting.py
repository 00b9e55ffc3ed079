"""Waiting on a condition with a deadline (never a fixed sleep for synchronisation)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
POLL = 0.1


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float,
    evidence: Callable[[], str] | None = None,
    poll: float = POLL,
) -> T:
    """Poll ``probe`` until it returns something other than None (returned); after
    ``timeout`` seconds a TimeoutError naming ``what``, with ``evidence()`` attached."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() >= deadline:
            shown = f"\n{evidence()}" if evidence is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{shown}")
        time.sleep(poll)
