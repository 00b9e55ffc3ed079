"""A scenario's report as one self-contained HTML page (pure: a ScenarioResult in, a
string out; no network, no script, no file it needs beside it).

    <title>layer4lab failover: PASS</title>
    header      scenario, run, topology, wall time, PASS/FAIL
    verdicts    one row per check (class ``verdict pass|fail``), evidence folded
    chart       inline SVG: replies per upstream per 0.5 s, faults and recoveries as
                dashed lines, health transitions dotted
    timeline    every event, seconds since the run started
    logs        per container, the lines within a few seconds of each fault

Everything taken from logs is escaped; the page holds no JavaScript, so it renders
the same with scripts off.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape

from .checks import Check, replies_per_bin
from .logs import format_ts, parse_record, parse_ts
from .result import ScenarioResult

BIN_WIDTH = 0.5
WINDOW = 3.0  # seconds of log lines shown either side of a fault
EXCERPT_LIMIT = 40  # lines per container per fault
WIDTH, HEIGHT = 960, 320
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 48, 16, 40, 36
LABEL_ROWS = 3  # fault labels take the rows at the top of the chart in turn
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
)
FAULT_COLOURS = {"fault": "#d62728", "recover": "#2ca02c"}
HEALTH_COLOURS = {"down": "#d62728", "up": "#2ca02c"}

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px auto; max-width: 1040px;
       color: #1b1b1b; }
h1 { font-size: 22px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
.meta { color: #555; }
.badge { display: inline-block; padding: 2px 10px; border-radius: 4px; color: #fff;
         font-weight: 600; }
.badge.pass, tr.pass td.state { background: #2e7d32; color: #fff; }
.badge.fail, tr.fail td.state { background: #c62828; color: #fff; }
table { border-collapse: collapse; width: 100%; }
td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
td.state { font-weight: 600; width: 48px; text-align: center; }
pre { white-space: pre-wrap; word-break: break-all; font-size: 12px; margin: 4px 0;
      background: #f6f6f6; padding: 6px; }
.error { background: #fdecea; border: 1px solid #c62828; padding: 8px; }
svg text { font: 11px system-ui, sans-serif; }
"""


def render(result: ScenarioResult, origin: float) -> str:
    """The whole page for ``result`` (times shown relative to ``origin``, epoch s)."""
    state = "PASS" if result.passed else ("INTERRUPTED" if result.interrupted else "FAIL")
    badge = "pass" if result.passed else "fail"
    title = f"layer4lab {result.scenario}: {state}"
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        f'<h1>{escape(result.scenario)} <span class="badge {badge}">{state}</span></h1>',
        f'<p class="meta">run {escape(result.run_id)} · topology {escape(result.topology)} · '
        f"started {escape(format_ts(result.started))} · {result.duration:.1f} s · "
        f"{sum(c.passed for c in result.checks)}/{len(result.checks)} checks passed</p>",
    ]
    if result.error:
        parts.append(f'<p class="error">{escape(result.error)}</p>')
    parts += ["<h2>Verdicts</h2>", verdict_table(result.checks)]
    parts += ["<h2>Replies per upstream</h2>", chart(result, origin)]
    parts += ["<h2>Timeline</h2>", timeline_table(result, origin)]
    parts += ["<h2>Logs around each fault</h2>", log_excerpts(result, origin)]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def verdict_table(checks: Sequence[Check]) -> str:
    rows = ["<table><tr><th></th><th>check</th><th>detail</th></tr>"]
    for item in checks:
        cls = "pass" if item.passed else "fail"
        evidence = ""
        if item.evidence:
            shown = escape("\n".join(item.evidence))
            evidence = (
                f"<details{' open' if not item.passed else ''}><summary>evidence "
                f"({len(item.evidence)})</summary><pre>{shown}</pre></details>"
            )
        rows.append(
            f'<tr class="verdict {cls}"><td class="state">{cls.upper()}</td>'
            f"<td>{escape(item.name)}</td><td>{escape(item.detail)}{evidence}</td></tr>"
        )
    if not checks:
        rows.append('<tr><td colspan="3">no check ran</td></tr>')
    rows.append("</table>")
    return "\n".join(rows)


def chart(result: ScenarioResult, origin: float) -> str:
    """Inline SVG, or a sentence saying why there is none."""
    attempts = result.attempts
    if not attempts:
        return '<p id="chart">no client attempts: no chart</p>'
    end = max([a.end for a in attempts] + [e.at for e in result.timeline]) + BIN_WIDTH
    edges, series = replies_per_bin(attempts, origin, end, BIN_WIDTH)
    span = max(end - origin, BIN_WIDTH)
    top = max((max(c) for c in series.values()), default=1) or 1
    plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM

    def x(t: float) -> float:
        return MARGIN_LEFT + plot_w * max(0.0, min(t, span)) / span

    def y(v: float) -> float:
        return MARGIN_TOP + plot_h * (1 - v / top)

    out = [
        f'<svg id="chart" role="img" aria-label="replies per upstream" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" xmlns="http://www.w3.org/2000/svg">',
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{plot_w}" height="{plot_h}" '
        'fill="#fafafa" stroke="#ccc"/>',
    ]
    for tick in _ticks(span):
        out.append(
            f'<text x="{x(tick):.1f}" y="{HEIGHT - MARGIN_BOTTOM + 14}" '
            f'text-anchor="middle">{tick:g}s</text>'
        )
    out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y(top):.1f}" text-anchor="end">{top}</text>')
    out.append(f'<text x="{MARGIN_LEFT - 6}" y="{y(0):.1f}" text-anchor="end">0</text>')
    labels = 0
    for event in result.timeline:
        colour, dash = None, ""
        if event.kind in FAULT_COLOURS:
            colour, dash = FAULT_COLOURS[event.kind], "6,4"
        elif event.kind == "health" and event.state in HEALTH_COLOURS:
            colour, dash = HEALTH_COLOURS[event.state], "2,3"
        if colour is None:
            continue
        px = x(event.at - origin)
        label = event.detail if event.kind in FAULT_COLOURS else f"{event.upstream} {event.state}"
        out.append(
            f'<line class="mark {event.kind}" x1="{px:.1f}" y1="{MARGIN_TOP}" x2="{px:.1f}" '
            f'y2="{HEIGHT - MARGIN_BOTTOM}" stroke="{colour}" stroke-width="1.4" '
            f'stroke-dasharray="{dash}"><title>{escape(label)}</title></line>'
        )
        if event.kind in FAULT_COLOURS:  # health marks are many: tooltips only
            # Rows in turn, so the labels of marks close together do not run into
            # each other (a kill and its restart a second apart).
            row = labels % LABEL_ROWS
            labels += 1
            out.append(
                f'<text x="{px + 3:.1f}" y="{MARGIN_TOP + 12 + 13 * row}" fill="{colour}">'
                f"{escape(label)}</text>"
            )
    for index, (name, counts) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        points = []
        for edge, count in zip(edges, counts, strict=True):
            points.append(f"{x(edge):.1f},{y(count):.1f}")
            points.append(f"{x(edge + BIN_WIDTH):.1f},{y(count):.1f}")
        out.append(
            f'<polyline class="series" data-upstream="{escape(name)}" fill="none" '
            f'stroke="{colour}" stroke-width="1.6" points="{" ".join(points)}"/>'
        )
        out.append(
            f'<text x="{MARGIN_LEFT + 8 + 110 * index}" y="{MARGIN_TOP - 12}" '
            f'fill="{colour}">■ {escape(name)}</text>'
        )
    out.append(
        f'<text x="{WIDTH - MARGIN_RIGHT}" y="{MARGIN_TOP - 12}" text-anchor="end">'
        f"replies per {BIN_WIDTH:g} s · dashed: fault / recovery · dotted: health</text>"
    )
    out.append("</svg>")
    return "\n".join(out)


def _ticks(span: float) -> list[float]:
    step = next((s for s in (1, 2, 5, 10, 20, 30, 60, 120) if span / s <= 12), 300)
    return [float(t) for t in range(0, int(span) + 1, step)]


def timeline_table(result: ScenarioResult, origin: float) -> str:
    rows = ["<table><tr><th>t (s)</th><th>kind</th><th>what</th></tr>"]
    for event in result.timeline:
        rows.append(
            f'<tr class="event {escape(event.kind)}"><td>{event.at - origin:.2f}</td>'
            f"<td>{escape(event.kind)}</td><td>{escape(event.detail)}</td></tr>"
        )
    rows.append("</table>")
    return "\n".join(rows)


def _lines_near(lines: Iterable[str], moments: Sequence[float]) -> list[str]:
    near = []
    for text in lines:
        record = parse_record(text)
        at = parse_ts(record.get("ts")) if record else None
        if at is not None and any(abs(at - m) <= WINDOW for m in moments):
            near.append(text)
    return near


def log_excerpts(result: ScenarioResult, origin: float) -> str:
    moments = [e.at for e in result.timeline if e.kind in FAULT_COLOURS]
    if not moments:
        return "<p>no fault in this scenario</p>"
    shown = ", ".join(f"{m - origin:.2f}" for m in moments)
    parts = [f"<p>lines within {WINDOW:g} s of the faults and recoveries at {shown} s</p>"]
    for name, lines in sorted(result.logs.items()):
        near = _lines_near(lines, moments)
        if not near:
            continue
        cut = near[:EXCERPT_LIMIT]
        more = f" (first {EXCERPT_LIMIT} of {len(near)})" if len(near) > EXCERPT_LIMIT else ""
        parts.append(
            f'<details class="logs"><summary>{escape(name)}: {len(near)} lines{more}</summary>'
            f"<pre>{escape(chr(10).join(cut))}</pre></details>"
        )
    return "\n".join(parts)
