"""Pure decisions of the client: how an attempt turned out, when to stop, how long to wait.
No I/O and no clocks here: times are passed in.
"""

from __future__ import annotations

import random
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from .transfer import Progress

Outcome = Literal[
    "ok", "rejected", "tls_error", "refused", "timeout", "error", "truncated", "mismatch"
]
OUTCOMES: tuple[Outcome, ...] = get_args(Outcome)

# Where an attempt was when it ended: the TCP connect, the TLS handshake, or after the
# handshake (sending the message and reading the reply).
Phase = Literal["connect", "handshake", "exchange"]

StopReason = Literal["count", "duration", "signal"]

REPLY_PREFIX = b"Reply from upstream "
TEXT_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: Outcome
    upstream: str | None
    error: str | None


def upstream_name(reply: bytes) -> str | None:
    """``u1`` from ``Reply from upstream u1`` (first line, stripped); else ``None``."""
    if not reply.startswith(REPLY_PREFIX):
        return None
    rest = reply[len(REPLY_PREFIX) :].decode("utf-8", errors="replace")
    lines = rest.splitlines()
    name = lines[0].strip() if lines else ""
    return name[:TEXT_LIMIT] or None


def reply_text(reply: bytes) -> str | None:
    """The logged form of a reply: the first 200 characters, or ``None`` for no bytes."""
    if not reply:
        return None
    return reply.decode("utf-8", errors="replace")[:TEXT_LIMIT]


def describe(exc: BaseException) -> str:
    """A short, single-line description of an error."""
    text = str(exc).strip() or repr(exc)
    return f"{type(exc).__name__}: {' '.join(text.split())}"[:TEXT_LIMIT]


def classify(
    phase: Phase, reply: bytes, error: BaseException | None, *, timed_out: bool = False
) -> Verdict:
    """The outcome of one attempt.

    ``phase`` is where the attempt was when it ended, ``reply`` the bytes read after the
    handshake, ``error`` what ended it (``None``: the reply ended with EOF), ``timed_out``
    whether the attempt's own deadline expired.

    * ``ok``: the reply starts with ``Reply from upstream `` (however the stream ended);
    * ``timeout``: the deadline expired (or the kernel timed out) before that;
    * ``refused``: the TCP connect was refused;
    * ``tls_error``: the TLS handshake failed (bad server certificate, alert, reset, EOF);
    * ``rejected``: the handshake completed, then the connection ended without a reply
      byte -- EOF, reset, or a TLS alert on read (TLS 1.3 reports a rejected client
      certificate this way, after the client's handshake is complete);
    * ``error``: anything else, e.g. an unexpected reply or DNS failure.
    """
    name = upstream_name(reply)
    if reply.startswith(REPLY_PREFIX):
        note = describe(error) if error is not None else None
        if note is None and timed_out:
            note = "timed out waiting for the end of the reply"
        return Verdict("ok", name, note)
    if timed_out or isinstance(error, TimeoutError):
        note = describe(error) if error is not None and not timed_out else None
        return Verdict("timeout", None, note or f"no completion within the timeout ({phase})")
    if reply:
        suffix = f" then {describe(error)}" if error is not None else ""
        return Verdict("error", None, f"unexpected reply{suffix}"[:TEXT_LIMIT])
    if error is None:
        if phase == "exchange":
            return Verdict("rejected", None, "closed without a reply")
        return Verdict("error", None, f"ended during {phase} without an error")
    if phase == "connect":
        outcome: Outcome = "refused" if isinstance(error, ConnectionRefusedError) else "error"
        return Verdict(outcome, None, describe(error))
    if phase == "handshake":
        outcome = "tls_error" if isinstance(error, OSError | EOFError) else "error"
        return Verdict(outcome, None, describe(error))
    if isinstance(error, ssl.SSLError | ConnectionError | EOFError):
        return Verdict("rejected", None, describe(error))
    return Verdict("error", None, describe(error))


def classify_transfer(
    phase: Phase, progress: Progress | None, error: BaseException | None, *, timed_out: bool
) -> Verdict:
    """The outcome of one transfer-mode attempt (``progress``: how far it got after the
    handshake, ``None`` if it never got there).

    * ``ok``: every planned byte was sent and the echo is byte-exact (length and
      SHA-256), however the stream then ended;
    * ``mismatch``: an echoed byte differs from the one sent, or more came back;
    * ``timeout``: the deadline expired (or the kernel timed out) before that;
    * ``rejected``: the stream ended (EOF, reset, TLS alert) before any byte came back;
    * ``truncated``: it ended after some bytes came back, all correct, but not all;
    * ``refused``, ``tls_error``, ``error``: as in :func:`classify` (connect, handshake,
      and anything else).
    """
    if phase != "exchange" or progress is None:
        return classify(phase, b"", error, timed_out=timed_out)
    counts = f"{progress.received} of {progress.planned} bytes echoed (sent {progress.sent})"
    suffix = f"; {describe(error)}" if error is not None else ""
    if progress.mismatch_at is not None or (
        progress.received == progress.sent and not progress.match
    ):
        if progress.mismatch_at is None:
            where = "in its SHA-256"
        elif progress.mismatch_at >= progress.planned:
            where = "beyond the end of the payload"
        else:
            where = f"at byte {progress.mismatch_at}"
        return Verdict("mismatch", None, f"echo differs {where}; {counts}{suffix}"[:TEXT_LIMIT])
    if progress.complete:
        note = describe(error) if error is not None else None
        if note is None and timed_out:
            note = "timed out waiting for the end of the echo"
        if note is None and progress.end != "close_notify":
            note = f"echo ended with {progress.end or 'no end'}, not close_notify"
        return Verdict("ok", None, note)
    if timed_out or isinstance(error, TimeoutError):
        return Verdict("timeout", None, f"no completion within the timeout: {counts}{suffix}")
    if error is not None and not isinstance(error, ssl.SSLError | ConnectionError | EOFError):
        return Verdict("error", None, f"{describe(error)}; {counts}"[:TEXT_LIMIT])
    how = describe(error) if error is not None else f"ended with {progress.end or 'no end'}"
    if progress.received == 0:
        return Verdict("rejected", None, f"closed without an echo: {how}"[:TEXT_LIMIT])
    return Verdict("truncated", None, f"{how}; {counts}"[:TEXT_LIMIT])


def stop_reason(
    started: int,
    now: float,
    *,
    count: int | None,
    deadline: float | None,
    stopping: bool,
) -> StopReason | None:
    """Why no further attempt may start (``None``: start the next one)."""
    if stopping:
        return "signal"
    if count is not None and started >= count:
        return "count"
    if deadline is not None and now >= deadline:
        return "duration"
    return None


def next_wait(
    rng: random.Random,
    low: float,
    high: float,
    *,
    burst: bool,
    now: float,
    deadline: float | None,
) -> float:
    """Seconds to wait before the next attempt: uniform in [low, high], 0 in burst mode,
    never past the ``--duration`` deadline."""
    wait = 0.0 if burst else rng.uniform(low, high)
    if deadline is not None:
        wait = min(wait, max(0.0, deadline - now))
    return wait


@dataclass
class Tally:
    """Counts for the summary line."""

    attempts: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    upstreams: Counter[str] = field(default_factory=Counter)

    def add(self, verdict: Verdict) -> None:
        self.attempts += 1
        self.outcomes[verdict.outcome] += 1
        if verdict.outcome == "ok" and verdict.upstream is not None:
            self.upstreams[verdict.upstream] += 1

    def summary(self) -> dict[str, Any]:
        return {
            "attempts": self.attempts,
            "outcomes": {outcome: self.outcomes[outcome] for outcome in OUTCOMES},
            "upstreams": dict(sorted(self.upstreams.items())),
        }
