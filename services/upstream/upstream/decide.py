"""Pure decisions of the upstream: where a message ends, how a connection ended, whether
an empty connection is logged. No I/O and no clocks here: ``now`` is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from .config import Mode

MESSAGE_CAP = 64 * 1024  # reply mode reads at most this much as "the message"
QUIET_PERIOD = 0.1  # reply mode: the message is complete when nothing arrives for this long
MESSAGE_LOG_CHARS = 200
REPLY_PREFIX = "Reply from upstream "

Outcome = Literal[
    "replied",
    "echoed",
    "sunk",
    "empty",
    "proxy_protocol_error",
    "untrusted_proxy",
    "fault_close",
    "fault_reset",
    "fault_hang",
    "client_reset",
    "idle_timeout",
    "shutdown",
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# What the server itself did to end (or answer) a connection, if anything.
Action = Literal[
    "replied",
    "untrusted_proxy",
    "fault_close",
    "fault_reset",
    "fault_hang",
    "idle_timeout",
    "shutdown",
]


def reply_bytes(name: str) -> bytes:
    """The exact reply: ``Reply from upstream <name>``, UTF-8, no trailing newline."""
    return f"{REPLY_PREFIX}{name}".encode()


def message_end(buffer: bytes | bytearray, cap: int = MESSAGE_CAP) -> int | None:
    """The length of the message in ``buffer`` if a newline or the cap completes it.

    The newline itself is not part of the message. ``None`` means: not complete yet (EOF
    or the quiet period may still complete it).
    """
    newline = buffer.find(b"\n", 0, cap)
    if newline >= 0:
        return newline
    if len(buffer) >= cap:
        return cap
    return None


def message_text(raw: bytes | bytearray, limit: int = MESSAGE_LOG_CHARS) -> str:
    """The logged form of a message: UTF-8 (errors replaced), no trailing CR, ``limit`` chars."""
    return bytes(raw).rstrip(b"\r").decode("utf-8", errors="replace")[:limit]


def remaining(due: float, now: float) -> float:
    """Seconds left until ``due`` (never negative)."""
    return max(0.0, due - now)


def final_outcome(
    mode: Mode,
    *,
    bytes_in: int,
    action: Action | None,
    lost_with_error: bool,
    proxy_protocol_failed: bool = False,
) -> Outcome:
    """How a connection ended, from what we did and how it was lost.

    ``bytes_in`` counts payload bytes only (not a PROXY protocol header);
    ``proxy_protocol_failed``: the expected PROXY header was invalid or incomplete.

    1. Something the server did decides first: refusing a peer not trusted to send PROXY
       headers, a fault, the idle timeout, a shutdown.
    2. A bad or incomplete PROXY protocol header is ``proxy_protocol_error``.
    3. A peer that sent no payload at all (a health check, by FIN or RST, possibly after
       a PROXY header) is ``empty``.
    4. Otherwise an error on the connection (e.g. RST from the peer) is ``client_reset``.
    5. Otherwise the mode's normal outcome: ``replied``, ``echoed``, ``sunk``.
    """
    if action is not None and action != "replied":
        return action
    if proxy_protocol_failed:
        return "proxy_protocol_error"
    if bytes_in == 0:
        return "empty"
    if lost_with_error:
        return "client_reset"
    if mode == "echo":
        return "echoed"
    if mode == "sink":
        return "sunk"
    if action == "replied":
        return "replied"
    # Reply mode, bytes read, no reply and no error: the peer went away before we answered.
    return "client_reset"


@dataclass
class EmptyLogThrottle:
    """Log empty connections at most once per ``interval`` seconds.

    :meth:`admit` returns ``None`` when this empty connection is not to be logged, or the
    number of empty connections suppressed since the last logged one when it is.
    ``interval <= 0`` logs every one.
    """

    interval: float
    last_logged: float | None = None
    pending: int = 0

    def admit(self, now: float) -> int | None:
        recent = self.last_logged is not None and now - self.last_logged < self.interval
        if self.interval > 0 and recent:
            self.pending += 1
            return None
        suppressed, self.pending = self.pending, 0
        self.last_logged = now
        return suppressed

    def drain(self) -> int:
        """Suppressed connections not yet reported (reported in the ``stopped`` line)."""
        suppressed, self.pending = self.pending, 0
        return suppressed
