"""scale: the lab as a swarm stack under steady traffic, upstreams scaled 3 -> 8 -> 2.

The proxy finds the upstreams through the service's DNS name (``discover:
"upstream:8000"``), so scaling is all it sees: records that appear and vanish. Every
upstream answers after a 1 s delay, so connections are in flight when replicas go.

Timeline: a single-node swarm if the engine has none; the stack (3 upstreams, 4
clients at 200-600 ms) ready; 6 s steady; scale to 8 and wait until the proxy has 8
members, then 6 s; scale to 2 and wait until it has 2, then 6 s; the cut: attempts that
started before it are judged once each has had its timeout to end; the clients scaled
to 0; the proxy's ``/status`` read; the stack removed and the swarm left if it was
created here, and the engine compared with how it was found.

The oracle (:func:`judge`) is a pure function of the clients' and the proxy's log
lines, the times the scenario scaled, and the final status.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..checks import Check, check, describe_counts, outcome_counts, started_between
from ..engine import Engine, EngineError
from ..logs import Access, Attempt, HealthEvent, LogLine, access_of, attempts_of, health_of
from ..progress import Progress
from ..report import write_report
from ..result import ScenarioResult
from ..run import LabError, TimelineEvent, new_run_id
from ..stack import Shape
from ..swarm import Stack, engine_state, with_stack
from ..waiting import wait_until

NAME = "scale"
SUMMARY = "swarm stack: upstreams scaled 3 -> 8 -> 2 under traffic (DNS discovery)"
GROUP = "up"
STEPS = (3, 8, 2)
CLIENTS = 4
CONCURRENCY = 3  # attempts in flight per client: ~8 new connections/s in all
STEADY = 6.0  # seconds of traffic at each size
CLIENT_TIMEOUT = 5.0
UPSTREAM_DELAY = "1s"  # every connection is open for at least this long
HEALTH_INTERVAL = 2.0  # lab/swarm/proxy.yaml
SLACK = 0.25  # log timestamps are the engine's (ms) and the proxy's own


@dataclass(frozen=True, slots=True)
class Resolve:
    """A ``resolve`` line of the discovered group: members added and removed."""

    ts: float
    added: tuple[str, ...]
    removed: tuple[str, ...]
    members: tuple[str, ...]


@dataclass(slots=True)
class Observed:
    """What the scenario saw, as values (the oracle's whole input)."""

    attempts: list[Attempt]
    access: list[Access]
    resolves: list[Resolve]
    health: list[HealthEvent]
    scaled: dict[int, float]  # replicas -> when the scale was asked (epoch s)
    clients_started: float
    cut: float
    status: Mapping[str, Any] = field(default_factory=dict)
    slot_names: set[str] = field(default_factory=set)  # u1..uN that ever ran


def resolves_of(lines: Iterable[LogLine], group: str = GROUP) -> list[Resolve]:
    found = []
    for line in lines:
        rec = line.record
        if rec is None or rec.get("event") != "resolve" or rec.get("group") != group:
            continue
        found.append(
            Resolve(
                line.ts,
                tuple(str(k) for k in rec.get("added") or ()),
                tuple(str(k) for k in rec.get("removed") or ()),
                tuple(str(k) for k in rec.get("members") or ()),
            )
        )
    return sorted(found, key=lambda r: r.ts)


def member_name(key: str, group: str = GROUP) -> str:
    """``10.0.1.7:8000`` -> ``up@10.0.1.7`` (the proxy's name for a discovered member)."""
    host = key.rpartition(":")[0]
    return f"{group}@{host}"


def _members_at(resolves: Sequence[Resolve], count: int, after: float) -> Resolve | None:
    """The first lookup after ``after`` that left exactly ``count`` members."""
    return next((r for r in resolves if r.ts >= after and len(r.members) == count), None)


def judge(seen: Observed, interval: float = HEALTH_INTERVAL, slack: float = SLACK) -> list[Check]:
    """The scale scenario's verdicts."""
    up_at, down_at = seen.scaled[STEPS[1]], seen.scaled[STEPS[2]]
    judged = started_between(seen.attempts, seen.clients_started - slack, seen.cut)
    access = [a for a in seen.access if a.start <= seen.cut + slack]
    checks: list[Check] = []

    # 1. complete accounting
    outcomes = outcome_counts(judged)
    unnamed = [a for a in judged if not a.ok and not a.error and a.outcome != "rejected"]
    stray = [a for a in judged if a.ok and a.upstream not in seen.slot_names]
    checks.append(
        check(
            "every attempt ends ok (from a running upstream) or with a named outcome",
            bool(judged) and not unnamed and not stray,
            f"{len(judged)} attempts started before the cut: {describe_counts(outcomes)}; "
            f"answered by {len({a.upstream for a in judged if a.ok})} upstreams",
            [a.line.evidence() for a in unnamed + stray],
        )
    )

    # 2. the members follow the replicas
    grown = _members_at(seen.resolves, STEPS[1], up_at)
    shrunk = _members_at(seen.resolves, STEPS[2], down_at)
    checks.append(
        check(
            f"the group's members follow the replicas: {' -> '.join(map(str, STEPS))}",
            grown is not None and shrunk is not None,
            f"{STEPS[1]} members {_after(grown, up_at)} after scaling up, "
            f"{STEPS[2]} members {_after(shrunk, down_at)} after scaling down",
            [
                f"resolve at +{r.ts - seen.clients_started:.2f}s: {len(r.members)} members, "
                f"added {list(r.added)}, removed {list(r.removed)}"
                for r in seen.resolves
            ],
        )
    )

    # 3. new members carry traffic within one interval of their first passing check
    added = [k for r in seen.resolves if up_at <= r.ts < down_at for k in r.added]
    delays: dict[str, float | None] = {}
    for key in added:
        name = member_name(key)
        first_up = min(
            (e.ts for e in seen.health if e.upstream_name == name and e.new == "up"), default=None
        )
        admitted = [
            a.admitted_at for a in access if a.upstream_name == name and a.admitted_at is not None
        ]
        if first_up is None or not admitted:
            delays[name] = None
        else:
            delays[name] = min(t for t in admitted if t is not None) - first_up
    late = {n: d for n, d in delays.items() if d is None or d > interval + slack}
    shown = [d for d in delays.values() if d is not None]
    checks.append(
        check(
            f"each new member carries a connection within one health interval ({interval:g}s) "
            "of its first passing check",
            len(added) == STEPS[1] - STEPS[0] and not late,
            f"{len(added)} members added; first connection after "
            + (f"{min(shown):.2f}-{max(shown):.2f}s" if shown else "-")
            + (f"; late or never: {late}" if late else ""),
            [f"{n}: {d}" for n, d in late.items()],
        )
    )

    # 4. removed members: no new connection after retirement, open ones finish
    retired = {member_name(k): r.ts for r in seen.resolves if r.ts >= down_at for k in r.removed}
    after_retired = [
        a
        for a in access
        if a.upstream_name in retired
        and a.admitted_at is not None
        and a.admitted_at > retired[a.upstream_name] + slack
    ]
    in_flight = [
        a
        for a in access
        if a.upstream_name in retired and a.decision == "forwarded" and a.start < down_at < a.ts
    ]
    cut_short = [a for a in in_flight if a.reason != "eof"]
    checks.append(
        check(
            "removed members get no new connection, and those open when the replicas went finish",
            len(retired) == STEPS[1] - STEPS[2]
            and not after_retired
            and bool(in_flight)
            and not cut_short,
            f"{len(retired)} members retired; {len(in_flight)} connections were open on "
            f"them when scaled down, {len(in_flight) - len(cut_short)} ended eof; "
            f"{len(after_retired)} admitted after retirement",
            [a.line.evidence() for a in after_retired + cut_short],
        )
    )

    # 5. failures: only connections in flight on a removed member
    removed_names = set(retired)
    failed = [a for a in judged if not a.ok]
    excused = [
        a
        for a in failed
        if a.start <= max(retired.values(), default=down_at) + slack
        and a.end >= down_at - slack
        and any(
            x.client == a.client
            and x.upstream_name in removed_names
            and x.start <= a.end + slack
            and x.ts >= a.start - slack
            for x in access
        )
    ]
    unexplained = [a for a in failed if a not in excused]
    checks.append(
        check(
            "no client attempt fails beyond connections in flight on a removed member",
            not unexplained,
            f"{len(failed)} failed ({len(excused)} in flight on a removed member)",
            [a.line.evidence() for a in unexplained],
        )
    )

    # 6. the proxy's counts end at zero
    status = seen.status
    upstreams = status.get("upstreams") or []
    counted = {
        u.get("name"): u.get("active_connections") for u in upstreams if u.get("active_connections")
    }
    retired_left = status.get("retired_upstreams") or []
    open_now = {
        k: v
        for k, v in (status.get("connections") or {}).items()
        if k in ("handshaking", "forwarding", "closing", "open") and v
    }
    checks.append(
        check(
            "after the clients stop, the proxy counts no connection anywhere",
            bool(status)
            and not counted
            and not retired_left
            and not open_now
            and len(upstreams) == STEPS[2],
            f"{len(upstreams)} upstreams in /status, active {counted or 0}, "
            f"retired with connections {len(retired_left)}, open {open_now or 0}",
            [str(u) for u in upstreams if u.get("active_connections")] + [str(retired_left)],
        )
    )
    return checks


def _after(found: Resolve | None, at: float) -> str:
    return "never" if found is None else f"{found.ts - at:.2f}s"


# --- the driver --------------------------------------------------------------------------


def shape(tag: str = "latest") -> Shape:
    return Shape(
        upstreams=STEPS[0],
        clients=0,  # started once the proxy has its members
        identities=CLIENTS,
        image_tag=tag,
        client_args=(
            "--interval-min",
            "200ms",
            "--interval-max",
            "600ms",
            "--timeout",
            f"{CLIENT_TIMEOUT:g}s",
            "--concurrency",
            str(CONCURRENCY),
        ),
        upstream_env={"UPSTREAM_DELAY": UPSTREAM_DELAY},
    )


def _slot_names(stack: Stack) -> set[str]:
    return {f"u{t.get('Slot')}" for t in stack.tasks("upstream") if t.get("Slot")}


def run(
    engine: Engine, progress: Progress, report_dir: Path | None = None, image_tag: str = "latest"
) -> ScenarioResult:
    run_id = new_run_id(NAME)
    started = time.time()
    clock = time.monotonic()
    result = ScenarioResult(NAME, "swarm stack", run_id, started)
    timeline: list[TimelineEvent] = []
    seen: dict[str, Any] = {}

    def mark(kind: str, detail: str) -> float:
        now = time.time()
        timeline.append(TimelineEvent(now, kind, detail))
        progress.say(f"  {detail}")
        return now

    def body(stack: Stack) -> None:
        try:
            steps(stack)
        finally:  # the logs, also of a run that failed (read before the stack goes)
            if "logs" not in seen:
                with contextlib.suppress(LabError, EngineError):
                    seen["logs"] = {
                        "proxy": [line.text for line in stack.poll("proxy")],
                        "clients": [line.text for line in stack.poll("client")],
                    }

    def steps(stack: Stack) -> None:
        layout = shape(image_tag)
        stack.deploy(layout)
        mark("phase", f"stack ready in {stack.wait_ready(layout):.1f}s")
        slots: set[str] = _slot_names(stack)
        _wait_members(stack, STEPS[0])
        stack.scale("client", CLIENTS)
        stack.wait_running("client", CLIENTS)
        seen["clients_started"] = mark("phase", f"{CLIENTS} clients running")
        scaled: dict[int, float] = {}
        for step in STEPS[1:]:
            _steady(stack, STEADY)
            scaled[step] = mark("fault", f"upstreams scaled to {step}")
            stack.scale("upstream", step)
            stack.wait_running("upstream", step)
            slots |= _slot_names(stack)
            _wait_members(stack, step)
            mark("phase", f"the proxy has {step} members")
        _steady(stack, STEADY)
        cut = mark("phase", "the cut: attempts started from now on are not judged")
        _steady(stack, CLIENT_TIMEOUT + 1.0)  # every judged attempt has ended by now
        stack.poll("client")
        stack.scale("client", 0)
        stack.wait_gone("client", 0)
        lines_client = stack.poll("client")
        wait_until(
            "the proxy to count no open connection",
            lambda: True if _quiet(stack) else None,
            timeout=CLIENT_TIMEOUT + 5,
            evidence=lambda: _still_open(stack),
        )
        status = stack.status() or {}
        proxy_lines = stack.poll("proxy")
        seen.update(
            observed=Observed(
                attempts=attempts_of(lines_client),
                access=access_of(proxy_lines),
                resolves=resolves_of(proxy_lines),
                health=health_of(proxy_lines),
                scaled=scaled,
                clients_started=seen["clients_started"],
                cut=cut,
                status=status,
                slot_names=slots,
            ),
            logs={
                "proxy": [line.text for line in proxy_lines],
                "clients": [line.text for line in lines_client],
            },
        )

    before = engine_state(engine)
    note = "the swarm was not reached"
    try:
        note = with_stack(engine, f"l4l-{run_id}", progress, body)
    except (LabError, EngineError, TimeoutError) as exc:
        result.error = str(exc)
        evidence = exc.evidence if isinstance(exc, LabError) else []
        result.checks.append(check("scenario ran to completion", False, str(exc), evidence))
    differences = before.differences(engine_state(engine.fresh()))
    observed: Observed | None = seen.get("observed")
    if observed is not None:
        result.checks = judge(observed) + result.checks
        result.attempts = observed.attempts
    result.logs = seen.get("logs", {})
    result.checks.append(
        check(
            "the engine is as it was found (swarm state, overlay networks, docker_gwbridge)",
            not differences,
            "; ".join([*differences, note]) if differences else f"restored ({note})",
        )
    )
    result.timeline = sorted(timeline, key=lambda e: e.at)
    result.duration = time.monotonic() - clock
    if report_dir is not None:
        result.report_dir = write_report(result, report_dir, origin=started)
    return result


def _wait_members(stack: Stack, count: int, timeout: float = 30.0) -> None:
    """Until the proxy's last lookup of the group answered ``count`` members."""

    def done() -> bool | None:
        found = resolves_of(stack.poll("proxy"))
        return True if found and len(found[-1].members) == count else None

    wait_until(f"the proxy to have {count} members", done, timeout=timeout, evidence=stack.describe)


def _steady(stack: Stack, seconds: float) -> None:
    """Let traffic run for ``seconds`` while reading the logs (bounded; the clients
    and the proxy are the clock's subject, not its synchronisation)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        stack.poll("client")
        stack.poll("proxy")
        time.sleep(min(0.5, max(0.0, end - time.monotonic())))


def _still_open(stack: Stack) -> str:
    """What /status counts as open (the evidence when it does not reach zero)."""
    status = stack.status()
    if status is None:
        return "/status could not be read"
    busy = [
        {k: u.get(k) for k in ("name", "health", "active_connections")}
        for u in status.get("upstreams") or []
        if u.get("active_connections")
    ]
    return json.dumps(
        {
            "upstreams": busy,
            "connections": status.get("connections"),
            "retired_upstreams": status.get("retired_upstreams"),
        }
    )


def _quiet(stack: Stack) -> bool:
    status = stack.status()
    return status is not None and not any(
        u.get("active_connections") for u in status.get("upstreams") or []
    )
