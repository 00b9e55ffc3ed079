"""The fault toolkit against real containers: the fault scenarios, and ``python lab.py
fault add|list|clear`` against a running ``python lab.py up``, which must leave no rule
in a container and no helper behind."""

from __future__ import annotations

import json
import re

import pytest

from labkit import LABEL_RUN, Engine, Progress, run_scenario
from labkit.faulting import LABEL_FAULT, helper_spec
from labkit.run import LABEL_NAME
from tests.lab.helpers import lab, verdict_table

pytestmark = pytest.mark.lab

FAULT_SCENARIOS = ["blackhole", "reset", "slow", "flap"]


@pytest.mark.parametrize("name", FAULT_SCENARIOS)
def test_fault_scenario_passes_and_leaves_nothing(engine: Engine, name: str) -> None:
    result = run_scenario(name, engine=engine, progress=Progress())
    assert result.passed, verdict_table(result)
    kinds = {event.kind for event in result.timeline}
    assert {"fault", "recover"} <= kinds  # when it was applied and removed
    assert engine.labelled(f"{LABEL_RUN}={result.run_id}") == []  # helpers included


def rules_in(engine: Engine, container: str) -> str:
    """``iptables -S`` and ``tc qdisc show`` inside a container's network namespace."""
    probe = engine.create_container(
        helper_spec(
            container,
            ["sh", "-c", "iptables -S; tc qdisc show"],
            {"layer4lab.test": "rules-probe"},
            f"l4l-rules-probe-{container[:12]}",
        )
    )
    try:
        engine.start(probe)
        assert engine.wait(probe, 20) == 0
        return engine.logs(probe, None)
    finally:
        engine.remove_container(probe)


def test_the_fault_command_on_a_running_lab(engine: Engine) -> None:
    up = lab("up")
    assert up.returncode == 0, up.stdout + up.stderr
    run_id = re.search(r"run (up-[0-9a-f]+) is up", up.stdout)
    assert run_id is not None, up.stdout
    run = run_id.group(1)
    try:
        member = {
            item.labels[LABEL_NAME]: item.id
            for item in engine.labelled(f"{LABEL_RUN}={run}")
            if item.kind == "container"
        }
        added = lab("fault", "add", "u2", "loss", "20%", "--for", "10s", "--run", run)
        assert added.returncode == 0, added.stderr
        assert "loss 20% (both) for 10s on u2" in added.stdout
        assert lab("fault", "add", "u1", "hang", "--for", "30s", "--run", run).returncode == 0
        assert lab("fault", "add", "u3", "bandwidth", "1mbit", "--run", run).returncode == 0
        listed = lab("fault", "list", "--json", "--run", run)
        faults = {f["target"]: f for f in json.loads(listed.stdout)}
        assert faults["u2"]["family"] == "network"
        assert 0 < faults["u2"]["left_s"] <= 10
        assert faults["u1"]["family"] == "application"
        assert 0 < faults["u1"]["left_s"] <= 30
        assert faults["u3"]["left_s"] is None  # until cleared
        assert "L4L-FAULT" in rules_in(engine, member["u2"])
        assert "tbf" in rules_in(engine, member["u3"])

        cleared = lab("fault", "clear", "u3", "--run", run)
        assert cleared.returncode == 0, cleared.stderr
        assert "tbf" not in rules_in(engine, member["u3"])
        bad = lab("fault", "add", "u2", "loss", "lots", "--run", run)
        assert bad.returncode == 2
        assert "percentage" in bad.stderr

        assert lab("fault", "add", "u2", "blackhole", "--run", run).returncode == 0
    finally:
        down = lab("down", "--run", run)
    assert down.returncode == 0, down.stderr
    helpers = [i for i in engine.labelled(LABEL_FAULT) if i.labels.get(LABEL_RUN) == run]
    assert not helpers, helpers
    assert engine.labelled(f"{LABEL_RUN}={run}") == []
