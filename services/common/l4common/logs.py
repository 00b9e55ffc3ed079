"""JSON lines on stdout: one object per event, ``ts`` and ``event`` first, flushed.

The services' common log format (see the README). Which events a service writes and
which fields they carry are the service's own: the upstream's throttling of ``empty``
lines, the client's attempt fields; this module only writes the line.
"""

from __future__ import annotations

import functools
import json
import json.encoder
import math
import sys
import time
from collections.abc import Callable
from typing import IO, Any


@functools.lru_cache(maxsize=2)
def _up_to_the_second(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``.

    Every log line has one, so the text up to the second is made once per second."""
    now = time.time()
    second = int(now)
    return f"{_up_to_the_second(second)}.{min(999, int((now - second) * 1000)):03d}Z"


def _compact_encoder() -> Callable[[Any], str]:
    """``json.dumps(value, separators=(",", ":"), default=str, allow_nan=False)``, made
    once: ``dumps`` with arguments builds a new encoder for every call, a third of the
    cost of a log line. (Without the C accelerator: the same encoder in Python.)"""
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return json.JSONEncoder(separators=(",", ":"), default=str, allow_nan=False).encode
    # No circularity check (markers None): a log record is a tree we build ourselves.
    chunks = make(
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )
    return lambda value: "".join(chunks(value, 0))


to_json = _compact_encoder()


RESERVED = ("ts", "event")


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity (which JSON cannot hold: ``json.dumps``
    would write the invalid ``NaN``) replaced by its text, ``"nan"``, ``"inf"``."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


class JsonLog:
    """Writes one compact JSON object per line and flushes it. ``ts`` and ``event``
    come first in every line and cannot be given as fields (that is a bug: the line's
    time would be lost); values JSON cannot hold are written as ``str(value)``, and a
    NaN or infinity as its text, so every line is valid JSON."""

    def __init__(self, stream: IO[str] | None = None, fields: dict[str, Any] | None = None) -> None:
        """``fields``: written in every line, after ``ts`` and ``event`` (e.g. a worker's
        number)."""
        self.stream = stream if stream is not None else sys.stdout
        self.fields = dict(fields or {})

    def emit(self, event: str, /, **fields: Any) -> None:
        clash = [name for name in RESERVED if name in fields]
        if clash:
            raise ValueError(f"log field {clash[0]!r} would overwrite the line's own")
        record: dict[str, Any] = {"ts": utc_timestamp(), "event": event}
        if self.fields:
            record.update(self.fields)
        record.update(fields)
        try:
            line = to_json(record)
        except ValueError:
            line = to_json(_finite(record))
        self.write_line(line)

    @functools.cached_property
    def fields_json(self) -> str:
        """This log's own :attr:`fields` as JSON members with a leading comma (``""``
        when there are none), for a caller that writes a line's text itself."""
        return "," + to_json(self.fields)[1:-1] if self.fields else ""

    def write_line(self, line: str) -> None:
        """Write one line of JSON text that the caller made (for a line written for
        every connection, made without a dict: see the proxy's access line)."""
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout is gone (the reader exited, or it was closed at shutdown).
            return
