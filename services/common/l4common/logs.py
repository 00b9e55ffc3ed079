"""JSON lines on stdout: one object per event, ``ts`` and ``event`` first, flushed.

The services' common log format (see the README). Which events a service writes and
which fields they carry are the service's own: the upstream's throttling of ``empty``
lines, the client's attempt fields; this module only writes the line.
"""

from __future__ import annotations

import json
import math
import sys
from datetime import UTC, datetime
from typing import IO, Any


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


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
            line = json.dumps(record, separators=(",", ":"), default=str, allow_nan=False)
        except ValueError:
            line = json.dumps(_finite(record), separators=(",", ":"), default=str, allow_nan=False)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout is gone (the reader exited, or it was closed at shutdown).
            return
