"""Progress lines on stderr: what is starting, what the lab waits for, time spent."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


class Progress:
    """``[  12.3s] message`` lines, timed from the creation of this object."""

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.quiet = quiet
        self.started = time.monotonic()
        self.prefix = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def say(self, message: str) -> None:
        if self.quiet:
            return
        try:
            print(f"[{self.elapsed():6.1f}s] {self.prefix}{message}", file=self.stream, flush=True)
        except (BrokenPipeError, ValueError):
            # The reader went away (``| head``) or the stream is closed. Progress is a
            # courtesy: it must never stop a run from cleaning up after itself.
            self.quiet = True

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """``what ...`` then ``what: done in 1.23s`` (or ``failed after``)."""
        self.say(f"{what} ...")
        began = time.monotonic()
        try:
            yield
        except BaseException:
            self.say(f"{what}: failed after {time.monotonic() - began:.2f}s")
            raise
        self.say(f"{what}: done in {time.monotonic() - began:.2f}s")
