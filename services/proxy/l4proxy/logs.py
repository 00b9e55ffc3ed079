"""JSON lines on stdout: the shared writer (:mod:`l4common.logs`), under the name the
proxy's modules import it by."""

from __future__ import annotations

from l4common.logs import JsonLog, utc_timestamp

__all__ = ["JsonLog", "utc_timestamp"]
