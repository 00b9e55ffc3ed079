"""A scenario's report directory: verdicts, timeline, proxy config, raw logs and (when
matplotlib is installed) a chart of replies per upstream over time with the faults marked.

    DIR/<scenario>/index.html      the page a person opens: all of the below, self-contained
    DIR/<scenario>/verdicts.json   pass/fail, every check with its detail and evidence
    DIR/<scenario>/timeline.json   faults, recoveries, health transitions, first/last reply
    DIR/<scenario>/proxy.yaml      the proxy configuration the run used
    DIR/<scenario>/logs/NAME.log   every container's log lines
    DIR/<scenario>/replies.png     the chart (skipped, with a note, without matplotlib)
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import yaml

from . import html_report
from .checks import replies_per_bin
from .result import ScenarioResult

BIN_WIDTH = 0.5  # seconds per bar of the chart
FAULT_COLOURS = {"fault": "tab:red", "recover": "tab:green"}


def write_report(result: ScenarioResult, directory: Path, *, origin: float) -> Path:
    folder = Path(directory) / result.scenario
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    chart, note = write_chart(result, folder / "replies.png", origin=origin)
    verdicts = result.to_json()
    verdicts["chart"] = chart.name if chart else None
    if note:
        verdicts["chart_note"] = note
    _write_json(folder / "verdicts.json", verdicts)
    _write_json(folder / "timeline.json", [e.to_json(origin) for e in result.timeline])
    if result.proxy_config:
        (folder / "proxy.yaml").write_text(
            yaml.safe_dump(result.proxy_config, sort_keys=False), encoding="utf-8"
        )
    (folder / "index.html").write_text(html_report.render(result, origin), encoding="utf-8")
    for name, lines in result.logs.items():
        (folder / "logs" / f"{name}.log").write_text(
            "".join(line + "\n" for line in lines), encoding="utf-8"
        )
    return folder


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _pyplot() -> Any | None:
    try:
        matplotlib = importlib.import_module("matplotlib")
    except ImportError:
        return None
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def write_chart(result: ScenarioResult, path: Path, *, origin: float) -> tuple[Path | None, str]:
    """Replies per upstream per 0.5 s; faults and recoveries as vertical lines, health
    transitions (after start-up) as dotted ones. Returns (path or None, note)."""
    plt = _pyplot()
    if plt is None:
        return None, "matplotlib is not installed: no chart"
    attempts = result.attempts
    if not attempts:
        return None, "no client attempts: no chart"
    end = max([a.end for a in attempts] + [e.at for e in result.timeline])
    edges, series = replies_per_bin(attempts, origin, end + BIN_WIDTH, BIN_WIDTH)
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=100)
    try:
        for name, counts in series.items():
            ax.step(edges, counts, where="post", label=f"replies from {name}", linewidth=1.6)
        top = max((max(c) for c in series.values()), default=1) or 1
        for event in result.timeline:
            x = event.at - origin
            if event.kind in FAULT_COLOURS:
                colour = FAULT_COLOURS[event.kind]
                ax.axvline(x, color=colour, linestyle="--", linewidth=1.4)
                ax.text(
                    x,
                    top * 1.02,
                    event.detail,
                    color=colour,
                    fontsize=7,
                    rotation=90,
                    va="bottom",
                    ha="right",
                )
            elif event.kind == "health" and event.state in ("up", "down"):
                colour = "tab:red" if event.state == "down" else "tab:green"
                ax.axvline(x, color=colour, linestyle=":", linewidth=1.0)
                ax.text(
                    x,
                    top * 1.45,
                    f" {event.upstream} {event.state}",
                    color=colour,
                    fontsize=7,
                    va="top",
                    ha="left",
                )
        first = min(a.start for a in attempts) - origin
        ax.set_xlim(max(0.0, first - 1.0), end - origin + BIN_WIDTH)
        ax.set_xlabel("seconds since the run started")
        ax.set_ylabel(f"replies per {BIN_WIDTH:g} s")
        ax.set_ylim(0, top * 1.6)
        state = "PASS" if result.passed else "FAIL"
        ax.set_title(
            f"{result.scenario} ({result.run_id}): {state}; dashed = fault/recovery, "
            "dotted = health transitions",
            fontsize=9,
        )
        ax.legend(loc="upper left", fontsize=8, ncol=1 + len(series) // 8)  # 24 upstreams: 4
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path, ""
