"""The shape of every "fault against one upstream" scenario, as steps.

Steady traffic; inject the fault on the target upstream; the proxy must mark it down
within the health-check window, after which no reply names it and clients allowed
elsewhere lose no more than the connections in flight on it; recover; the proxy must
mark it up and send it traffic again. A scenario of this kind is a :class:`Fault`
value and ``fault_cycle(fault)`` (see ``failover.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import needs
from .. import topology as topo
from ..checks import Check, check
from ..faults import parse_fault
from ..logs import Attempt, HealthEvent
from ..run import Run
from .common import evidence, names
from .steps import (
    MARGIN,
    OBSERVE_ATTEMPTS,
    SLACK,
    STEADY_REPLIES,
    Await,
    Choose,
    Ctx,
    Fault,
    Inject,
    Judge,
    Recover,
    Start,
    Steady,
    Step,
    StopClients,
    attempts_since,
    elsewhere,
    watched,
)


def target_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    """What a fault cycle needs: two upstreams, a steady client, and an upstream whose
    clients may all reach another (so the failover can be judged)."""
    lacking = []
    steady = needs.steady_clients(topology)
    if len(topology.upstreams) < 2:
        lacking.append("two upstreams")
    if not steady:
        lacking.append("a steady request/reply client (no count, duration, burst, transfer)")
    if steady and len(topology.upstreams) >= 2 and needs.fault_target(config, topology) is None:
        lacking.append(
            "an upstream that some steady client may reach, whose clients may all reach "
            "another upstream too"
        )
    return lacking


def choose_target(ctx: Ctx) -> str:
    target = needs.fault_target(ctx.config, ctx.topology)
    assert target is not None, "run_scenario checks the needs before starting"
    return target


class Window:
    """The detection window: health-check interval x fall + timeout + margin, plus the
    fault's own allowance."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault

    def __call__(self, ctx: Ctx) -> tuple[float, str]:
        timing = topo.timing(ctx.config)
        extra, why = self.fault.allowance(ctx.run, ctx.target, timing)
        window = timing.window(MARGIN) + extra
        return window, (
            f"{window:.1f}s (interval {timing.interval:g}s x fall {timing.fall} + timeout "
            f"{timing.timeout:g}s + margin {MARGIN:g}s{why})"
        )


def _transition(state: str, since: str) -> Any:
    def condition(ctx: Ctx) -> HealthEvent | None:
        return ck.first_transition(ctx.health(), ctx.target, state, ctx.facts[since])

    return condition


def _health_evidence(ctx: Ctx) -> list[str]:
    return evidence(ctx.health()) + ctx.run.tail("proxy")


def _boundary(ctx: Ctx) -> float:
    """From here on no reply may name the target: once it is marked down, and at the
    latest once the window has passed (a late detection fails its own check)."""
    return float(min(ctx.facts["down"].ts, ctx.facts["fault"] + ctx.facts["window"][0]) + SLACK)


def detected(fault: Fault) -> Any:
    def judge(ctx: Ctx) -> Iterable[Check]:
        down, at = ctx.facts["down"], ctx.facts["fault"]
        window, text = ctx.facts["window"]
        before = [
            a for a in ck.replies_from(ctx.attempts(watched(ctx)), ctx.target, 0) if a.end <= at
        ]
        if before:
            ctx.run.mark(
                "last_reply",
                f"last reply from {ctx.target} before the {fault.name}",
                ctx.target,
                before[-1].end,
            )
        yield check(
            f"{ctx.target} marked down within the health-check window after {fault.name}",
            down.ts - at <= window,
            f"down {down.ts - at:.2f}s after the {fault.name} ({down.source}: {down.reason}); "
            f"window {text}",
            [down.line.evidence()],
        )

    return judge


def no_stray_replies(ctx: Ctx) -> Iterable[Check]:
    clients = watched(ctx)
    boundary = _boundary(ctx)
    stray = ck.replies_from(ctx.attempts(clients), ctx.target, boundary)
    after = [a for a in ctx.attempts(clients) if a.start > boundary]
    yield check(
        f"no reply names {ctx.target} once it is down (or the window has passed)",
        not stray,
        f"{len(stray)} reply(ies) from {ctx.target} after it was marked down"
        if stray
        else f"replies after it went down: {names(after)}",
        evidence(stray),
    )


def marked_up(ctx: Ctx) -> Iterable[Check]:
    up = ctx.facts["up"]
    yield check(
        f"{ctx.target} marked up again after recovery",
        True,
        f"up {up.ts - ctx.facts['recover']:.2f}s after the recovery ({up.source}: {up.reason})",
        [up.line.evidence()],
    )


def replies_again(since: Callable[[Ctx], float]) -> Callable[[Ctx], list[Attempt] | None]:
    """A condition: :data:`STEADY_REPLIES` replies from the target to watched clients
    after ``since(ctx)`` (the replies)."""

    def condition(ctx: Ctx) -> list[Attempt] | None:
        replies = ck.replies_from(ctx.attempts(watched(ctx)), ctx.target, since(ctx))
        return replies if len(replies) >= STEADY_REPLIES else None

    return condition


def served_again(ctx: Ctx) -> Iterable[Check]:
    back = ctx.facts["back"]
    first = back[0]
    ctx.run.mark(
        "first_reply", f"first reply from {ctx.target} after recovery", ctx.target, first.end
    )
    yield check(
        f"{ctx.target} receives traffic again",
        True,
        f"{len(back)} replies; the first {first.end - ctx.facts['up'].ts:.2f}s after it was "
        f"marked up ({first.client})",
        [first.line.evidence()],
    )


def only_in_flight_lost(fault: Fault) -> Any:
    def judge(ctx: Ctx) -> Iterable[Check]:
        others = elsewhere(ctx)
        account = ck.account_failures(
            ctx.attempts(others),
            ctx.access(),
            clients=others,
            target=ctx.target,
            fault_at=ctx.facts["fault"],
            detected=ctx.facts["down"].ts,
            slack=SLACK,
        )
        yield check(
            f"clients allowed elsewhere ({', '.join(others)}) lost only connections in "
            f"flight on {ctx.target}",
            not account.unexplained,
            f"{len(ctx.attempts(others))} attempts, {account.total} failed: "
            f"{len(account.on_target)} in flight on {ctx.target} between the {fault.name} and "
            f"its detection, {len(account.unexplained)} unexplained",
            evidence(account.unexplained or account.on_target),
        )
        retried = [a for a in ctx.access() if a.attempts > 1 and a.ts >= ctx.facts["fault"]]
        if retried:
            ctx.run.mark(
                "phase",
                f"{len(retried)} connection(s) re-dialled to another upstream (passive failover)",
                at=retried[0].ts,
            )

    return judge


def fault_cycle(fault: Fault) -> tuple[Step, ...]:
    """The steps of a fault against one upstream (see the module docstring)."""
    restarted: tuple[Step, ...] = (
        Await(
            "{target} to log 'listening' again",
            lambda ctx: (
                ctx.events(ctx.target, "listening", since=ctx.facts["recover"] - SLACK) or None
            ),
            deadline=20,
            sources=lambda ctx: [ctx.target],
        ),
    )
    return (
        Start(),
        Choose(
            "target",
            choose_target,
            "fault target {target}: its clients may all reach another upstream",
        ),
        Choose("window", Window(fault)),
        Steady(watched),
        Inject(fault),
        Await(
            "the proxy to mark {target} down (window {window[0]:.1f}s)",
            _transition("down", "fault"),
            deadline=lambda ctx: ctx.facts["window"][0] + 5,
            sources=["proxy"],
            save="down",
            evidence=_health_evidence,
        ),
        Judge(detected(fault)),
        Await(
            f"{OBSERVE_ATTEMPTS} attempts per client after {{target}} went down",
            attempts_since(watched, _boundary, OBSERVE_ATTEMPTS),
            deadline=20,
            sources=watched,
        ),
        Judge(no_stray_replies),
        Recover(fault),
        *(restarted if fault.restarts else ()),
        Await(
            "the proxy to mark {target} up again",
            _transition("up", "recover"),
            deadline=lambda ctx: ctx.facts["window"][0] + 15,
            sources=["proxy"],
            save="up",
            evidence=_health_evidence,
        ),
        Judge(marked_up),
        Await(
            f"{STEADY_REPLIES} client replies from {{target}} again",
            replies_again(lambda ctx: ctx.facts["up"].ts - SLACK),
            deadline=15,
            sources=watched,
            save="back",
        ),
        Judge(served_again),
        StopClients(),
        Judge(only_in_flight_lost(fault)),
    )


def toolkit(
    kind: str,
    *params: str,
    allowance: Any = None,
    lasting: str | None = None,
    flap: str | None = None,
) -> Fault:
    """A fault of the toolkit (:mod:`labkit.faults`: blackhole, loss, reset, bandwidth,
    hang, drip...) as a :class:`Fault`: applied through :meth:`Run.apply_fault`, undone
    through :meth:`Run.clear_faults` (``lasting``: it also ends by itself)."""
    spec = parse_fault(kind, list(params), duration=lasting, flap=flap)
    return Fault(
        spec.describe(),
        inject=lambda run, target: run.apply_fault(target, spec).applied,
        recover=lambda run, target: run.clear_faults(target),
        **({} if allowance is None else {"allowance": allowance}),
    )


def fault_ended(ctx: Ctx) -> bool | None:
    """A condition: the helpers of the run's network faults have ended by themselves
    (their ``--for`` is up)."""
    helpers = [f.helper for fs in ctx.run.active_faults.values() for f in fs if f.helper]
    return (not any(ctx.run.engine.state(h).get("Running") for h in helpers)) or None


def connect_allowance(_run: Run, choose_target: str, timing: topo.Timing) -> tuple[float, str]:
    """Packets dropped without a reset: a dial learns nothing until its connect timeout."""
    return timing.connect, f" + connect timeout {timing.connect:g}s"


def backlog_allowance(run: Run, target: str, timing: topo.Timing) -> tuple[float, str]:
    """A paused process's kernel still completes TCP handshakes until the listen queue
    (somaxconn + 1 connections) is full; only then do health checks time out."""
    spec = next(u for u in run.topology.upstreams if u.name == target)
    queue = (spec.somaxconn if spec.somaxconn is not None else 4096) + 1
    return queue * timing.interval, f" + {queue} checks to fill the accept queue"
