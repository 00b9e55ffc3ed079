"""The scenario vocabulary (labkit.scenarios.steps) and the scenario files written in it:
the table of contents, the facts each description uses, and the loop that plays them."""

from __future__ import annotations

import string
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest

import labkit.scenarios as scenarios
from labkit.checks import check
from labkit.run import Run
from labkit.scenarios import SCENARIOS
from labkit.scenarios.steps import (
    Admin,
    Await,
    Choose,
    Configure,
    Exit,
    Fault,
    Inject,
    Judge,
    Recover,
    Scenario,
    Signal,
    Start,
    play,
)

ROOT = Path(__file__).resolve().parents[2]


def test_the_package_opens_with_its_table_of_contents() -> None:
    doc = scenarios.__doc__ or ""
    listed = [line.split(None, 1) for line in doc.splitlines() if line.startswith("    ")]
    assert [(name, summary) for name, summary in listed] == [
        (s.name, s.summary) for s in SCENARIOS.values()
    ]
    for name in SCENARIOS:  # one file per scenario, named after it
        assert (ROOT / "labkit" / "scenarios" / f"{name}.py").is_file()


def _saved(step: object) -> str | None:
    if isinstance(step, Inject | Recover | Choose | Signal | Admin | Exit | Await):
        return step.save
    if isinstance(step, Configure):
        return step.save
    return None


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_descriptions_name_only_facts_saved_before_them(name: str) -> None:
    """An Await's description is a format string over the facts: each field it names
    must have been saved by an earlier step (else the scenario dies mid-run)."""
    saved: set[str] = set()
    for step in SCENARIOS[name].steps:
        if isinstance(step, Await):
            fields = {f for _, f, _, _ in string.Formatter().parse(step.what) if f}
            roots = {f.split(".")[0].split("[")[0] for f in fields}
            assert roots <= saved, (step.what, roots - saved)
        if (key := _saved(step)) is not None:
            saved.add(key)


def test_every_fault_scenario_recovers_what_it_injected() -> None:
    for scenario in SCENARIOS.values():
        injected = [s.fault for s in scenario.steps if isinstance(s, Inject)]
        recovered = [s.fault for s in scenario.steps if isinstance(s, Recover)]
        assert injected == recovered, scenario.name


class _Recorder:
    """The few Run methods the steps below call, recording what they were asked."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.config: dict[str, Any] = {}

    def poll(self, names: object = None) -> None:
        self.calls.append(("poll", names))

    def mark(
        self, kind: str, detail: str, upstream: str | None = None, at: float | None = None
    ) -> float:
        self.calls.append(("mark", detail))
        return 1.0

    def wait_for(self, what: str, probe: Callable[[], Any], **kw: Any) -> Any:
        self.calls.append(("wait_for", what))
        return probe()

    def client_names(self) -> list[str]:
        return ["client.a"]


def _play(*steps: Any) -> tuple[_Recorder, list[Any]]:
    recorder = _Recorder()
    out: list[Any] = []
    play(Scenario("t", "test", "failover", tuple(steps)), cast(Run, recorder), out)
    return recorder, out


def test_a_failed_gate_ends_the_scenario_and_a_passed_one_does_not() -> None:
    later = Judge(lambda ctx: [check("later", True, "")])
    _, out = _play(Judge(lambda ctx: [check("gate", False, "no")], gate=True), later)
    assert [c.name for c in out] == ["gate"]
    _, out = _play(Judge(lambda ctx: [check("gate", True, "")], gate=True), later)
    assert [c.name for c in out] == ["gate", "later"]


def test_facts_flow_from_one_step_to_the_next() -> None:
    recorder, out = _play(
        Choose("target", lambda ctx: "u2", note="target {target}"),
        Await("{target} down", lambda ctx: ctx.target.upper(), 5, save="down"),
        Judge(lambda ctx: [check(f"saw {ctx.facts['down']}", True, "")]),
    )
    assert ("mark", "target u2") in recorder.calls
    assert ("wait_for", "u2 down") in recorder.calls
    assert [c.name for c in out] == ["saw U2"]
    assert ("poll", None) in recorder.calls  # a judge reads every member's latest lines


def test_inject_and_recover_hit_the_chosen_target() -> None:
    hits: list[tuple[str, str]] = []

    def act(kind: str) -> Callable[[Run, str], float]:
        def do(_run: Run, target: str) -> float:
            hits.append((kind, target))
            return 2.0

        return do

    fault = Fault("poke", inject=act("in"), recover=act("out"))
    _play(Choose("target", lambda ctx: "u3"), Inject(fault), Recover(fault))
    assert hits == [("in", "u3"), ("out", "u3")]


def test_a_value_that_is_not_a_step_is_a_bug() -> None:
    with pytest.raises(TypeError, match="not a step"):
        _play(types.SimpleNamespace())


def test_start_is_the_first_step_of_every_scenario() -> None:
    for scenario in SCENARIOS.values():
        assert isinstance(scenario.steps[0], Start), scenario.name


def test_the_readme_shows_the_stop_scenario_as_it_is() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    source = (ROOT / "labkit" / "scenarios" / "stop.py").read_text(encoding="utf-8")
    assert f"```python\n{source}```" in readme
    assert len(source.splitlines()) < 30
