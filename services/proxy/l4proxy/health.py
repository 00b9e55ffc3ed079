"""Upstream health: a small table-driven state machine with rise/fall hysteresis.

Active checks feed :meth:`HealthMachine.observe`; a failed dial feeds
:meth:`HealthMachine.mark_down` (passive health). Transitions are returned as values
for the I/O shell to log. No clocks here: ``now`` is passed in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Health(enum.Enum):
    UNKNOWN = "unknown"  # not checked yet; eligible for traffic (optimistic start)
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True, slots=True)
class Transition:
    old: Health
    new: Health
    reason: str
    at: float


class HealthMachine:
    """Rise/fall hysteresis.

    * UNKNOWN: the first active check decides (success -> UP, failure -> DOWN), so the
      start-up state is settled by one prompt check, not after ``rise``/``fall`` intervals.
    * UP -> DOWN after ``fall`` consecutive failed checks, or at once on a failed dial.
    * DOWN -> UP after ``rise`` consecutive successful checks.
    """

    __slots__ = ("_failures", "_successes", "fall", "last_change", "last_reason", "rise", "state")

    def __init__(self, rise: int = 1, fall: int = 1) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.state = Health.UNKNOWN
        self._successes = 0
        self._failures = 0
        self.last_change: float | None = None
        self.last_reason = "not checked yet"

    @property
    def eligible(self) -> bool:
        """May new connections be sent here?"""
        return self.state is not Health.DOWN

    def observe(self, ok: bool, now: float, reason: str = "") -> Transition | None:
        """Record one active check result; return the transition it caused, if any."""
        if ok:
            self._successes += 1
            self._failures = 0
        else:
            self._failures += 1
            self._successes = 0
        target = _NEXT[(self.state, ok)]
        if target is None:
            return None
        needed = self.rise if ok else self.fall
        streak = self._successes if ok else self._failures
        if self.state is not Health.UNKNOWN and streak < needed:
            return None
        return self._move(target, now, reason or ("check passed" if ok else "check failed"))

    def mark_down(self, now: float, reason: str) -> Transition | None:
        """Passive health: a dial to this upstream failed. Down at once; rise applies."""
        self._successes = 0
        self._failures = max(self._failures, self.fall)
        if self.state is Health.DOWN:
            return None
        return self._move(Health.DOWN, now, reason)

    def _move(self, new: Health, now: float, reason: str) -> Transition:
        transition = Transition(self.state, new, reason, now)
        self.state = new
        self.last_change = now
        self.last_reason = reason
        return transition


# (state, check ok) -> state to move to once the streak is long enough; None = stay.
_NEXT: dict[tuple[Health, bool], Health | None] = {
    (Health.UNKNOWN, True): Health.UP,
    (Health.UNKNOWN, False): Health.DOWN,
    (Health.UP, True): None,
    (Health.UP, False): Health.DOWN,
    (Health.DOWN, True): Health.UP,
    (Health.DOWN, False): None,
}
