"""The swarm path (issue 14): the compose lab as a stack on a single-node swarm, and the
scale scenario. Each test leaves the engine as it found it: no swarm if there was none,
no stack, no overlay network, no ``docker_gwbridge`` it created. About two and a half
minutes on a 2-core machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labkit import Engine, Progress
from labkit.logs import attempts_of
from labkit.scenarios import scale
from labkit.stack import NAMESPACE_LABEL
from labkit.swarm import Stack, engine_state
from labkit.waiting import wait_until
from tests.lab.helpers import lab, verdict_table

pytestmark = pytest.mark.lab


def test_scale_scenario_passes_and_restores_the_engine(engine: Engine, tmp_path: Path) -> None:
    before = engine_state(engine)
    result = scale.run(engine, Progress(), tmp_path)
    assert result.passed, verdict_table(result)
    assert engine_state(engine) == before
    verdicts = json.loads((tmp_path / "scale" / "verdicts.json").read_text())
    assert verdicts["passed"] is True
    assert (tmp_path / "scale" / "logs" / "proxy.log").stat().st_size > 0


def test_swarm_up_serves_slot_identities_walled_off_then_down_restores(engine: Engine) -> None:
    before = engine_state(engine)
    name = "l4l-swarm-test"
    stack = Stack(engine, name, Progress())
    try:
        up = lab("swarm", "up", "--upstreams", "2", "--clients", "2", "--name", name, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"stack {name} is up" in up.stdout

        def both_served() -> bool | None:
            oks = {a.client for a in attempts_of(stack.poll("client")) if a.ok}
            return True if oks == {"client.1", "client.2"} else None

        wait_until("an ok reply for client.1 and client.2", both_served, timeout=60)
        # The proxy saw each replica as its own identity, and answered from both members.
        access = [
            line.record for line in stack.poll("proxy") if line.event == "access" and line.record
        ]
        assert {r["client"] for r in access if r["decision"] == "forwarded"} >= {
            "client.1",
            "client.2",
        }
        # Walled off: a client resolves no upstream and holds no server key.
        client = stack.containers("client")[0]
        code, out = engine.exec_run(
            client,
            [
                "python3",
                "-c",
                "import os, socket\n"
                "try:\n    socket.getaddrinfo('upstream', 8000); print('resolved')\n"
                "except OSError: print('unresolved')\n"
                "print(sorted(os.listdir('/run/secrets')))",
            ],
        )
        assert code == 0, out
        assert out.splitlines()[0] == "unresolved"
        assert "server.key" not in out
        assert "ca.key" not in out
        assert "client.1.key" in out
    finally:
        down = lab("swarm", "down", "--name", name)
    assert down.returncode == 0, down.stdout + down.stderr
    assert engine.swarm_objects(f"{NAMESPACE_LABEL}={name}") == []
    assert engine.labelled(f"{NAMESPACE_LABEL}={name}") == []
    assert engine_state(engine) == before
