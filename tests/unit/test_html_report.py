"""The scenario report as one HTML page (labkit.html_report): self-contained, every
verdict a row, the chart an inline SVG with its marks, log text escaped; and, where
Debian's chromium is installed (CI installs it), the page as a browser renders it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from labkit.checks import Check
from labkit.html_report import render
from labkit.logs import LogLine, attempts_of, format_ts
from labkit.report import write_report
from labkit.result import ScenarioResult
from labkit.run import TimelineEvent
from tests.lab.helpers import in_ci
from tests.support.browser import CHROMIUM
from tests.support.browser import render as render_page

T0 = 1_800_000_000.0
HOSTILE = '<script>alert("x")</script> & </pre>'


def line(origin: str, at: float, **record: Any) -> LogLine:
    record = {"ts": format_ts(at), **record}
    return LogLine(origin, int(at * 1e9), json.dumps(record), record)


def result() -> ScenarioResult:
    clients = []
    for i in range(60):
        at = T0 + 1 + i * 0.25
        upstream = ("u1", "u2", "u3")[i % 3] if not 6 < i * 0.25 < 9 or i % 3 != 1 else "u1"
        clients.append(
            line(
                "client.a",
                at,
                event="attempt",
                client="client.a",
                attempt=i,
                outcome="ok",
                upstream=upstream,
                latency_ms=12.0,
            )
        )
    proxy = [
        line("proxy", T0 + 6.2, event="health", upstream="u2", new="down", reason=HOSTILE),
        line("proxy", T0 + 30, event="access", client="client.a", decision="forwarded"),
    ]
    return ScenarioResult(
        scenario="failover",
        topology="failover",
        run_id="failover-abc123",
        started=T0,
        duration=21.5,
        checks=[
            Check("u2 marked down within the window", True, "after 0.21 s (bound 2.0 s)"),
            Check("no reply from u2 while down", False, "2 replies from u2", [HOSTILE]),
            Check("every failure was in flight on u2", True, "0 failed"),
        ],
        timeline=[
            TimelineEvent(T0 + 6.0, "fault", "kill u2", "u2"),
            TimelineEvent(T0 + 6.2, "health", "u2 up -> down", "u2", state="down"),
            TimelineEvent(T0 + 9.0, "recover", "start u2", "u2"),
            TimelineEvent(T0 + 10.1, "health", "u2 down -> up", "u2", state="up"),
        ],
        logs={
            "proxy": [x.text for x in proxy],
            "client.a": [x.text for x in clients],
        },
        attempts=attempts_of(clients),
    )


def test_the_page_holds_every_verdict_the_chart_and_escaped_logs() -> None:
    page = render(result(), origin=T0)
    assert "<title>layer4lab failover: FAIL</title>" in page
    assert page.count('<tr class="verdict pass">') == 2
    assert page.count('<tr class="verdict fail">') == 1
    assert page.count('<polyline class="series"') == 3  # u1, u2, u3
    assert page.count('class="mark fault"') == 1
    assert page.count('class="mark recover"') == 1
    assert page.count('class="mark health"') == 2
    assert HOSTILE not in page  # escaped wherever it appears
    assert "&lt;script&gt;" in page
    assert "<script" not in page  # no script at all
    # Self-contained: nothing is fetched (the SVG namespace is an identifier, not a fetch).
    assert "src=" not in page
    assert "<link" not in page
    assert "kill u2" in page  # timeline
    assert "client.a: " in page  # log excerpts around the faults
    # The fault and recovery labels are on different rows (they do not run together).
    labels = re.findall(r'<text x="[0-9.]+" y="([0-9.]+)" fill="[^"]+">(kill u2|start u2)<', page)
    assert len(labels) == 2
    assert labels[0][0] != labels[1][0]


def test_write_report_writes_index_html_beside_the_json(tmp_path: Path) -> None:
    folder = write_report(result(), tmp_path, origin=T0)
    assert (folder / "index.html").read_text().startswith("<!doctype html>")
    assert json.loads((folder / "verdicts.json").read_text())["passed"] is False


def test_no_attempts_no_chart_but_a_sentence() -> None:
    empty = result()
    empty.attempts = []
    assert "no client attempts: no chart" in render(empty, origin=T0)


@pytest.mark.skipif(CHROMIUM is None and not in_ci(), reason="Debian's chromium is not installed")
def test_chromium_renders_the_page(tmp_path: Path) -> None:
    """Headless Chromium: the DOM it builds has the title, every verdict row and the
    chart; it logs no console line; its screenshot is a real picture."""
    folder = write_report(result(), tmp_path, origin=T0)
    seen = render_page(folder / "index.html", tmp_path / "page.png")
    assert "<title>layer4lab failover: FAIL</title>" in seen.dom
    assert seen.dom.count('class="verdict ') == 3
    assert '<svg id="chart"' in seen.dom
    assert seen.console == []
    assert seen.png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(seen.png) > 20_000  # a rendered page, not a blank one
