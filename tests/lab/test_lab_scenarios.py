"""The lab driver tier: the essential scenarios against real containers, through labkit.

Each scenario must pass and leave nothing labelled ``layer4lab.run=<its run id>``
behind; an interrupted ``python lab.py scenario`` (SIGINT) must clean up as well.
Without a reachable Docker engine these tests are skipped -- or fail when ``CI=true``.
About four minutes on a 2-core machine once the images exist (reload and drain stream
long transfers: about 20-25 s each). The fault scenarios are in ``test_lab_faults.py``.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from labkit import LABEL_RUN, Engine, Progress, run_scenario
from tests.lab.helpers import assert_nothing_left, in_ci, verdict_table
from tests.support.browser import CHROMIUM
from tests.support.browser import render as render_page

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
ESSENTIAL = ["failover", "authz", "ratelimit", "mtls", "reload", "drain", "isolation"]


@pytest.mark.parametrize("name", ESSENTIAL)
def test_scenario_passes_and_leaves_nothing_labelled(
    engine: Engine, labelled_before: set[str], name: str, tmp_path: Path
) -> None:
    result = run_scenario(name, engine=engine, progress=Progress(), report_dir=tmp_path)
    assert result.passed, verdict_table(result)
    assert result.removed > 0
    assert engine.labelled(f"{LABEL_RUN}={result.run_id}") == []
    verdicts = json.loads((tmp_path / name / "verdicts.json").read_text())
    assert verdicts["passed"] is True
    assert verdicts["run"] == result.run_id
    assert (tmp_path / name / "timeline.json").is_file()
    assert (tmp_path / name / "logs" / "proxy.log").stat().st_size > 0
    page = tmp_path / name / "index.html"
    assert page.read_text().count('class="verdict pass"') == len(result.checks)
    if name == "failover" and (CHROMIUM is not None or in_ci()):
        # The page a person opens, as a browser renders it: a real run's report.
        seen = render_page(page, tmp_path / "failover.png")
        assert f"<title>layer4lab {name}: PASS</title>" in seen.dom
        assert seen.dom.count('class="verdict pass"') == len(result.checks)
        assert '<svg id="chart"' in seen.dom
        assert 'class="mark fault"' in seen.dom
        assert seen.console == []
    assert_nothing_left(engine, labelled_before)


# Scenarios on topologies that are not their own (other names, counts and rules).
ELSEWHERE = [
    ("failover", "alt-mesh"),
    ("stop", "alt-mesh"),
    ("ratelimit", "alt-bucket"),
    ("mtls", "alt-certs"),
    ("reload", "alt-rules"),
    ("drain", "alt-drain"),
]


@pytest.mark.parametrize(("name", "topology"), ELSEWHERE)
def test_scenario_passes_on_another_topology(
    engine: Engine, labelled_before: set[str], name: str, topology: str
) -> None:
    result = run_scenario(name, engine=engine, progress=Progress(), topology=topology)
    assert result.passed, verdict_table(result)
    assert result.topology == topology
    assert_nothing_left(engine, labelled_before)


def test_sigint_mid_scenario_removes_everything(engine: Engine, labelled_before: set[str]) -> None:
    """Ctrl-C while the fault is in place: exit 130, nothing of the run left."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "lab.py"), "scenario", "failover"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[str] = []
    run_id = None
    deadline = time.monotonic() + 90
    try:
        for text in proc.stdout:
            seen.append(text)
            found = re.search(r"\(run (failover-[0-9a-f]+)\)", text)
            run_id = run_id or (found.group(1) if found else None)
            if "FAULT:" in text:
                proc.send_signal(signal.SIGINT)
                break
            if time.monotonic() > deadline:
                break
        rest, _ = proc.communicate(timeout=60)
        seen.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen)
    assert run_id is not None, output
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert engine.labelled(f"{LABEL_RUN}={run_id}") == [], output
    assert_nothing_left(engine, labelled_before)


@pytest.mark.parametrize("name", ["authz", "isolation"])
def test_shared_client_containers_at_size(
    engine: Engine, labelled_before: set[str], name: str
) -> None:
    """``pool``: large.yaml's features (numbered names, identities run 10 to a
    container, rules by range) at a size this tier affords: 6 upstreams, 30 identities
    in 3 containers. authz judges per rule class; isolation probes each container once,
    and each may read its 10 identities' keys and no other. (The 24 x 200 topology
    itself is measured, not run here: README, "A lab of real size".)"""
    result = run_scenario(name, engine=engine, progress=Progress(), topology="pool")
    assert result.passed, verdict_table(result)
    names = [c.name for c in result.checks]
    if name == "authz":
        assert any(n.startswith("client.01..client.10 (10) served only by") for n in names)
        assert "client.27..client.30 (4) (allowed nowhere) rejected every time" in names
    else:
        own = [
            n
            for n in names
            if n.endswith("the only private keys it can read are its 10 identities' own")
        ]
        assert [n.split(":")[0] for n in own] == ["pool-1", "pool-2", "pool-3"]
    assert {a.client for a in result.attempts} == {f"client.{i:02d}" for i in range(1, 31)}
    assert engine.labelled(f"{LABEL_RUN}={result.run_id}") == []
    assert_nothing_left(engine, labelled_before)
