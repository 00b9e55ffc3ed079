"""Unit tests for l4proxy.health: the rise/fall state machine, transitions as values."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.health import Health, HealthMachine, Transition

UNKNOWN, UP, DOWN = Health.UNKNOWN, Health.UP, Health.DOWN

Event = Literal["ok", "fail", "down"]  # active check passed / failed, dial failed


def apply(machine: HealthMachine, event: Event, now: float) -> Transition | None:
    if event == "ok":
        return machine.observe(True, now)
    if event == "fail":
        return machine.observe(False, now)
    return machine.mark_down(now, "dial failed")


def run(rise: int, fall: int, events: Sequence[Event]) -> list[tuple[Health, Health] | None]:
    """Feed ``events`` at t=1, 2, ...; return (old, new) for each transition, else None."""
    machine = HealthMachine(rise, fall)
    result: list[tuple[Health, Health] | None] = []
    for step, event in enumerate(events, start=1):
        state_before = machine.state
        transition = apply(machine, event, float(step))
        if transition is None:
            assert machine.state is state_before
            result.append(None)
        else:
            assert transition.old is state_before
            assert transition.new is machine.state
            assert transition.at == float(step)
            assert machine.last_change == float(step)
            result.append((transition.old, transition.new))
    return result


NO: None = None  # "no transition" in the table below

# (rise, fall, events, expected transition after each event)
TABLE: list[tuple[str, int, int, list[Event], list[tuple[Health, Health] | None]]] = [
    # UNKNOWN: the first check decides, whatever rise/fall
    ("unknown-ok-rise1", 1, 1, ["ok"], [(UNKNOWN, UP)]),
    ("unknown-ok-rise3", 3, 1, ["ok"], [(UNKNOWN, UP)]),
    ("unknown-ok-rise5-fall5", 5, 5, ["ok"], [(UNKNOWN, UP)]),
    ("unknown-fail-fall1", 1, 1, ["fail"], [(UNKNOWN, DOWN)]),
    ("unknown-fail-fall3", 1, 3, ["fail"], [(UNKNOWN, DOWN)]),
    ("unknown-fail-rise5-fall5", 5, 5, ["fail"], [(UNKNOWN, DOWN)]),
    # UP stays UP on success, needs `fall` consecutive failures
    ("up-ok", 1, 1, ["ok", "ok", "ok"], [(UNKNOWN, UP), NO, NO]),
    ("up-fall1", 1, 1, ["ok", "fail"], [(UNKNOWN, UP), (UP, DOWN)]),
    ("up-fall3", 1, 3, ["ok", "fail", "fail", "fail"], [(UNKNOWN, UP), NO, NO, (UP, DOWN)]),
    (
        "up-fall3-success-resets",
        1,
        3,
        ["ok", "fail", "fail", "ok", "fail", "fail", "fail"],
        [(UNKNOWN, UP), NO, NO, NO, NO, NO, (UP, DOWN)],
    ),
    (
        "up-fall2-alternating-never-falls",
        1,
        2,
        ["ok", "fail", "ok", "fail", "ok", "fail"],
        [(UNKNOWN, UP), NO, NO, NO, NO, NO],
    ),
    # DOWN stays DOWN on failure, needs `rise` consecutive successes
    ("down-fail", 1, 1, ["fail", "fail", "fail"], [(UNKNOWN, DOWN), NO, NO]),
    ("down-rise1", 1, 1, ["fail", "ok"], [(UNKNOWN, DOWN), (DOWN, UP)]),
    ("down-rise3", 3, 1, ["fail", "ok", "ok", "ok"], [(UNKNOWN, DOWN), NO, NO, (DOWN, UP)]),
    (
        "down-rise3-failure-resets",
        3,
        1,
        ["fail", "ok", "ok", "fail", "ok", "ok", "ok"],
        [(UNKNOWN, DOWN), NO, NO, NO, NO, NO, (DOWN, UP)],
    ),
    # round trips: the streak that counts is the one in the current state
    (
        "up-down-up",
        2,
        2,
        ["ok", "fail", "fail", "ok", "ok", "fail", "fail"],
        [(UNKNOWN, UP), NO, (UP, DOWN), NO, (DOWN, UP), NO, (UP, DOWN)],
    ),
    (
        "down-up-down",
        2,
        3,
        ["fail", "ok", "ok", "fail", "fail", "fail"],
        [(UNKNOWN, DOWN), NO, (DOWN, UP), NO, NO, (UP, DOWN)],
    ),
    # mark_down: immediate from UP or UNKNOWN, nothing when already DOWN
    ("mark-down-unknown", 1, 3, ["down"], [(UNKNOWN, DOWN)]),
    ("mark-down-up", 1, 3, ["ok", "down"], [(UNKNOWN, UP), (UP, DOWN)]),
    ("mark-down-down", 1, 1, ["fail", "down"], [(UNKNOWN, DOWN), NO]),
    ("mark-down-twice", 1, 1, ["down", "down"], [(UNKNOWN, DOWN), NO]),
    (
        "mark-down-then-rise",
        3,
        1,
        ["ok", "down", "ok", "ok", "ok"],
        [(UNKNOWN, UP), (UP, DOWN), NO, NO, (DOWN, UP)],
    ),
    (
        "mark-down-resets-a-recovery",
        3,
        1,
        ["fail", "ok", "ok", "down", "ok", "ok", "ok"],
        [(UNKNOWN, DOWN), NO, NO, NO, NO, NO, (DOWN, UP)],
    ),
    (
        "mark-down-rise1",
        1,
        3,
        ["ok", "down", "ok"],
        [(UNKNOWN, UP), (UP, DOWN), (DOWN, UP)],
    ),
    (
        "mark-down-after-earlier-successes",
        2,
        1,
        ["ok", "ok", "ok", "down", "ok", "ok"],
        [(UNKNOWN, UP), NO, NO, (UP, DOWN), NO, (DOWN, UP)],
    ),
]


@pytest.mark.parametrize(
    ("rise", "fall", "events", "expected"),
    [row[1:] for row in TABLE],
    ids=[row[0] for row in TABLE],
)
def test_transition_table(
    rise: int,
    fall: int,
    events: list[Event],
    expected: list[tuple[Health, Health] | None],
) -> None:
    assert run(rise, fall, events) == expected


# --------------------------------------------------------------------- transition values


def test_transitions_carry_old_new_reason_and_time() -> None:
    assert HealthMachine().last_change is None
    machine = HealthMachine(rise=1, fall=1)
    assert machine.state is UNKNOWN

    assert machine.observe(True, 3.5) == Transition(UNKNOWN, UP, "check passed", 3.5)
    assert machine.observe(True, 4.0) is None
    assert machine.observe(False, 7.25, "connect refused") == Transition(
        UP, DOWN, "connect refused", 7.25
    )
    assert (machine.state, machine.last_change, machine.last_reason) == (
        DOWN,
        7.25,
        "connect refused",
    )
    assert machine.observe(False, 8.0) is None
    assert machine.last_change == 7.25  # nothing changed
    assert machine.observe(True, 9.0) == Transition(DOWN, UP, "check passed", 9.0)
    assert machine.observe(False, 10.0) == Transition(UP, DOWN, "check failed", 10.0)


def test_mark_down_returns_the_transition_or_none() -> None:
    machine = HealthMachine(rise=2, fall=5)
    assert machine.observe(True, 1.0) == Transition(UNKNOWN, UP, "check passed", 1.0)
    assert machine.mark_down(2.0, "dial failed: refused") == Transition(
        UP, DOWN, "dial failed: refused", 2.0
    )
    assert machine.mark_down(3.0, "dial failed: again") is None
    assert machine.last_change == 2.0
    assert machine.observe(True, 4.0) is None
    assert machine.observe(True, 5.0) == Transition(DOWN, UP, "check passed", 5.0)


def test_mark_down_from_unknown_is_immediate() -> None:
    machine = HealthMachine(rise=3, fall=3)
    assert machine.mark_down(1.0, "dial failed: timeout") == Transition(
        UNKNOWN, DOWN, "dial failed: timeout", 1.0
    )
    assert not machine.eligible


def test_eligible_is_false_only_for_down() -> None:
    machine = HealthMachine(rise=1, fall=1)
    assert machine.state is UNKNOWN
    assert machine.eligible
    machine.observe(True, 1.0)
    assert machine.state is UP
    assert machine.eligible
    machine.observe(False, 2.0)
    assert machine.state is DOWN
    assert not machine.eligible
    machine.observe(True, 3.0)
    assert machine.eligible


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (0, 0), (-1, 2), (2, -3)])
def test_rise_and_fall_must_be_at_least_one(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        HealthMachine(rise, fall)


# ------------------------------------------------------------------------ the model


class Model:
    """The documented behaviour, written independently of the implementation."""

    def __init__(self, rise: int, fall: int) -> None:
        self.rise, self.fall = rise, fall
        self.state = UNKNOWN
        self.ok_run = 0  # consecutive passed checks, since the last failure or dial failure
        self.fail_run = 0  # consecutive failed checks, since the last pass

    def step(self, event: Event) -> tuple[Health, Health] | None:
        old = self.state
        if event == "down":
            self.ok_run = 0
            self.state = DOWN
        elif event == "ok":
            self.ok_run += 1
            self.fail_run = 0
            if old is UNKNOWN or (old is DOWN and self.ok_run >= self.rise):
                self.state = UP
        else:
            self.fail_run += 1
            self.ok_run = 0
            if old is UNKNOWN or (old is UP and self.fail_run >= self.fall):
                self.state = DOWN
        return None if self.state is old else (old, self.state)


@settings(max_examples=300, deadline=None)
@given(
    rise=st.integers(1, 4),
    fall=st.integers(1, 4),
    events=st.lists(st.sampled_from(["ok", "fail", "down"]), max_size=40),
)
def test_machine_matches_the_model(rise: int, fall: int, events: list[Event]) -> None:
    model = Model(rise, fall)
    assert run(rise, fall, events) == [model.step(e) for e in events]
