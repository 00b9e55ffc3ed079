"""The I/O shell, by concern: ``connection.py`` (one client connection),
``proxy.py`` (the listener, reload, drain, stop), ``capacity.py``, ``healthchecks.py``
and ``accesslog.py``; the connection's lifecycle decisions are the pure table in
``lifecycle.py``. This module keeps the names other code imports from it."""

from __future__ import annotations

from .capacity import HANDSHAKE_GRACE
from .connection import (
    HIGH_WATER,
    HOLD_LIMIT,
    LINGER,
    LOW_WATER,
    MAX_RECORD,
    READ_SIZE,
    ClientConnection,
    State,
    UpstreamSide,
    describe_os_error,
    describe_tls_error,
)
from .proxy import Proxy, ReloadResult

__all__ = [
    "HANDSHAKE_GRACE",
    "HIGH_WATER",
    "HOLD_LIMIT",
    "LINGER",
    "LOW_WATER",
    "MAX_RECORD",
    "READ_SIZE",
    "ClientConnection",
    "Proxy",
    "ReloadResult",
    "State",
    "UpstreamSide",
    "describe_os_error",
    "describe_tls_error",
]
