"""JSON lines on stdout: one object per event, ``ts`` and ``event`` first, flushed.

The services' common log format (see the README). Which events a service writes and
which fields they carry are the service's own: the upstream's throttling of ``empty``
lines, the client's attempt fields; this module only writes the line.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any


def utc_timestamp() -> str:
    """ISO 8601 UTC with milliseconds, e.g. ``2024-05-01T12:00:00.123Z``."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonLog:
    """Writes one compact JSON object per line and flushes it. ``ts`` and ``event``
    come first in every line; values JSON cannot hold are written as ``str(value)``."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, event: str, /, **fields: Any) -> None:
        record: dict[str, Any] = {"ts": utc_timestamp(), "event": event}
        record.update(fields)
        line = json.dumps(record, separators=(",", ":"), default=str)
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):
            # stdout is gone (the reader exited, or it was closed at shutdown).
            return
