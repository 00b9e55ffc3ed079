"""The vocabulary every scenario is written in, and the loop that plays it.

A scenario is a tuple of step values, played in order against one :class:`~labkit.run.Run`:

=================  ========================================================================
``Start``          start the topology (networks, certificates, upstreams, proxy, clients)
``Choose``         derive a value from the run's config and topology, keep it as a fact
``Steady``         wait until traffic flows: replies from every upstream the clients may use
``Inject``         apply a fault to the target upstream (kill, pause, disconnect, stop...)
``Recover``        undo it (start, unpause, reconnect...)
``Configure``      write a new proxy config file (the proxy reads it only when told)
``Signal``         send a signal to a member (SIGHUP to reload, SIGTERM to drain)
``Admin``          run ``adminctl`` in the proxy (reload, status, ready)
``Await``          poll the logs until a condition holds, or fail at its deadline
``StartClients``   start the clients a topology leaves to the scenario (autostart: false)
``StopClients``    SIGTERM the clients; their last attempts and summaries are logged
``Exit``           await a member's exit (its code and when)
``Judge``          turn the logs (and the facts) into checks; ``gate`` stops on failure
``Probe``          act from inside the containers (docker exec) and judge the answers
``Custom``         the escape hatch: any function of the context
=================  ========================================================================

Steps keep what they learn in ``ctx.facts`` under a name (``save``), and an
``Await``'s description is a format string over those facts (``"{target} down"``).
Conditions and judges are functions of the :class:`Ctx`; judges only read it, so each
is an oracle over the run's logs, its proxy config and the facts. Waits have deadlines
(seconds, or a function of the context such as the health-check window); none sleeps.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import needs
from .. import topology as topo
from ..checks import Check, check, counts_by_upstream, describe_counts
from ..logs import Access, Attempt, HealthEvent, LogLine
from ..run import Run

STEADY_REPLIES = 3  # replies per upstream (and per client) before a fault is injected
OBSERVE_ATTEMPTS = 5  # attempts per client observed after a change
SLACK = 0.05  # seconds of timestamp slack (milliseconds in logs, clocks of one host)
MARGIN = 1.0  # seconds added to the health-check timing for "the detection window"


class Ctx:
    """What steps, conditions and judges see: the run, the checks so far, the facts."""

    def __init__(self, run: Run, checks: list[Check]) -> None:
        self.run = run
        self.checks = checks
        self.facts: dict[str, Any] = {}

    # Reading the run (what judges use).
    @property
    def config(self) -> dict[str, Any]:
        return self.run.config

    @property
    def topology(self) -> topo.Topology:
        return self.run.topology

    @property
    def allowed(self) -> dict[str, set[str]]:
        """Which upstreams each client may reach under the running proxy's config."""
        return needs.allowed(self.run.config, self.run.topology)

    @property
    def target(self) -> str:
        return str(self.facts["target"])

    def attempts(self, clients: Iterable[str] | None = None) -> list[Attempt]:
        return self.run.attempts(clients)

    def access(self) -> list[Access]:
        return self.run.access()

    def health(self) -> list[HealthEvent]:
        return self.run.health()

    def lines(self, name: str) -> list[LogLine]:
        return self.run.lines(name)

    def events(self, name: str, event: str, since: float | None = None) -> list[LogLine]:
        return self.run.events(name, event, since)

    def clients(self, who: Who = None) -> list[str]:
        return resolve(self, who)

    def text(self, template: str) -> str:
        return template.format_map(self.facts)


# Which members a step is about: every client (None), a fixed list, or a function of
# the context (a client group such as :func:`watched`).
Who = Sequence[str] | Callable[[Ctx], Sequence[str]] | None
Seconds = float | Callable[[Ctx], float]
Condition = Callable[[Ctx], Any]  # a value once it holds, None until then
Judgement = Callable[[Ctx], Iterable[Check]]


def resolve(ctx: Ctx, who: Who) -> list[str]:
    if who is None:
        return ctx.run.client_names()
    return list(who(ctx) if callable(who) else who)


def seconds(ctx: Ctx, value: Seconds) -> float:
    return float(value(ctx) if callable(value) else value)


# --- client groups -------------------------------------------------------------------


def watched(ctx: Ctx) -> list[str]:
    """Steady request/reply clients allowed somewhere: what fault scenarios watch."""
    steady = needs.steady_clients(ctx.topology)
    allowed = ctx.allowed
    return [c for c in ctx.run.client_names() if c in steady and allowed[c]]


def elsewhere(ctx: Ctx) -> list[str]:
    """Watched clients that may reach an upstream other than the target."""
    allowed = ctx.allowed
    return [c for c in watched(ctx) if allowed[c] - {ctx.target}]


def transfers(ctx: Ctx) -> list[str]:
    """Clients streaming transfers from the start."""
    return [c.id for c in ctx.topology.clients if c.transfer and c.autostart]


def late_transfers(ctx: Ctx) -> list[str]:
    """Transfer clients a scenario starts itself (``autostart: false``)."""
    return [c.id for c in ctx.topology.clients if c.transfer and not c.autostart]


def talkers(ctx: Ctx) -> list[str]:
    """Running clients that are not transfer clients (request/reply)."""
    moving = set(transfers(ctx))
    return [c for c in ctx.run.client_names() if c not in moving]


def attempts_since(who: Who, since: Callable[[Ctx], float], count: int) -> Condition:
    """A condition: every client of ``who`` has started ``count`` attempts after
    ``since(ctx)``."""

    def condition(ctx: Ctx) -> bool | None:
        clients = resolve(ctx, who)
        at = since(ctx)
        later = [a for a in ctx.attempts(clients) if a.start > at]
        return all(sum(1 for a in later if a.client == c) >= count for c in clients) or None

    return condition


# --- the steps -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    clients: bool = True


@dataclass(frozen=True, slots=True)
class Choose:
    """``facts[save] = pick(ctx)``; ``note`` (over the facts) goes on the timeline."""

    save: str
    pick: Callable[[Ctx], Any]
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Steady:
    """>= ``replies`` replies from each upstream the clients may use, and per client."""

    clients: Who = watched
    replies: int = STEADY_REPLIES
    deadline: Seconds = 20.0


def _no_allowance(_run: Run, _target: str, _timing: topo.Timing) -> tuple[float, str]:
    return 0.0, ""


@dataclass(frozen=True, slots=True)
class Fault:
    """Something done to the target upstream (``facts['target']``) and its undoing.

    ``allowance``: detection time beyond the health-check window, and why (a paused
    process's kernel still accepts connections until its listen queue is full).
    ``restarts``: the recovery starts the process anew (await its 'listening' line)."""

    name: str
    inject: Callable[[Run, str], float]
    recover: Callable[[Run, str], float]
    allowance: Callable[[Run, str, topo.Timing], tuple[float, str]] = _no_allowance
    restarts: bool = False


@dataclass(frozen=True, slots=True)
class Inject:
    fault: Fault
    save: str = "fault"  # when it was applied (epoch seconds)
    on: str = "target"  # the fact naming the upstream it hits


@dataclass(frozen=True, slots=True)
class Recover:
    fault: Fault
    save: str = "recover"
    on: str = "target"


@dataclass(frozen=True, slots=True)
class Configure:
    """Write the proxy's config file (``facts[save]`` = its sha256); no reload."""

    config: Callable[[Ctx], Mapping[str, Any]]
    why: str
    save: str | None = None


@dataclass(frozen=True, slots=True)
class Signal:
    """``docker kill --signal``; ``facts[save]`` = when. ``stops``: expected to exit."""

    member: str
    signal: str
    save: str
    stops: bool = False


@dataclass(frozen=True, slots=True)
class Admin:
    """``adminctl COMMAND`` in the proxy: ``facts[save]`` = :class:`AdminAnswer`."""

    command: str
    save: str
    mark: str | None = None  # a timeline note (as a fault) when it was sent


def json_object(text: str) -> dict[str, Any]:
    """``text`` as a JSON object; {} when it is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class AdminAnswer:
    at: float
    code: int
    text: str

    @property
    def json(self) -> dict[str, Any]:
        return json_object(self.text)

    def evidence(self) -> str:
        return " ".join(self.text.split())[:300]


@dataclass(frozen=True, slots=True)
class Await:
    what: str  # a format string over the facts
    until: Condition
    deadline: Seconds
    sources: Who = None  # whose logs to poll: the clients by default
    save: str | None = None
    evidence: Callable[[Ctx], list[str]] | None = None


@dataclass(frozen=True, slots=True)
class StartClients:
    """Start clients the topology does not start itself (``autostart: false``)."""

    clients: Who


@dataclass(frozen=True, slots=True)
class StopClients:
    clients: Who = None


@dataclass(frozen=True, slots=True)
class Exit:
    """Await a member's exit: ``facts[save]`` = (exit code, when it exited or None)."""

    member: str
    deadline: Seconds
    save: str


@dataclass(frozen=True, slots=True)
class Judge:
    """Append ``judge(ctx)``'s checks (after reading every member's latest log lines);
    with ``gate``, a failed one ends the scenario."""

    judge: Judgement
    gate: bool = False


@dataclass(frozen=True, slots=True)
class Probe:
    """Act from inside the containers (``docker exec``) and judge what comes back:
    ``probe(ctx)``'s checks are appended."""

    what: str
    probe: Judgement


@dataclass(frozen=True, slots=True)
class Custom:
    """The escape hatch: ``do(ctx)``, described by ``what``."""

    what: str
    do: Callable[[Ctx], None]


Step = (
    Start
    | Choose
    | Steady
    | Inject
    | Recover
    | Configure
    | Signal
    | Admin
    | Await
    | StartClients
    | StopClients
    | Exit
    | Judge
    | Probe
    | Custom
)
Needs = Callable[[Mapping[str, Any], topo.Topology], list[str]]


def _needs_nothing(_config: Mapping[str, Any], _topology: topo.Topology) -> list[str]:
    return []


@dataclass(frozen=True, slots=True)
class Scenario:
    """A name, a one-line purpose, the topology it runs on by default, what it needs of
    any other topology (phrases naming what is missing), and its steps."""

    name: str
    summary: str
    topology: str
    steps: tuple[Step, ...]
    needs: Needs = field(default=_needs_nothing)


class Gate(Exception):
    """A gating judgement failed: later steps would only restate it."""


# --- playing -------------------------------------------------------------------------


def _steady(ctx: Ctx, step: Steady) -> None:
    clients = resolve(ctx, step.clients)
    allowed = ctx.allowed
    reachable = sorted(set().union(*(allowed[c] for c in clients)))
    want = step.replies

    def ready() -> bool | None:
        replies = [a for a in ctx.attempts(clients) if a.ok]
        per_upstream = counts_by_upstream(replies)
        per_client = Counter(a.client for a in replies)
        return (
            all(per_upstream[u] >= want for u in reachable)
            and all(per_client[c] >= want for c in clients)
        ) or None

    ctx.run.wait_for(
        f"steady traffic: >= {want} replies from each of {', '.join(reachable)}",
        ready,
        timeout=seconds(ctx, step.deadline),
        sources=clients,
    )
    replies = describe_counts(counts_by_upstream(ctx.attempts(clients)))
    ctx.checks.append(check("steady traffic before the fault", True, f"replies so far: {replies}"))


def play_step(ctx: Ctx, step: Step) -> None:
    run = ctx.run
    match step:
        case Start(clients=clients):
            run.start(clients=clients)
        case Choose(save=save, pick=pick, note=note):
            ctx.facts[save] = pick(ctx)
            if note is not None:
                run.mark("phase", ctx.text(note))
        case Steady():
            _steady(ctx, step)
        case Inject(fault=fault, save=save, on=on):
            ctx.facts[save] = fault.inject(run, str(ctx.facts[on]))
        case Recover(fault=fault, save=save, on=on):
            ctx.facts[save] = fault.recover(run, str(ctx.facts[on]))
        case Configure(config=config, why=why, save=save):
            sha = run.write_proxy_config(config(ctx), ctx.text(why))
            if save is not None:
                ctx.facts[save] = sha
        case Signal(member=member, signal=signal, save=save, stops=stops):
            ctx.facts[save] = run.signal(member, signal, stops=stops)
        case Admin(command=command, save=save, mark=mark):
            at = time.time()
            code, text = run.adminctl(command)
            if mark is not None:
                run.mark("fault", ctx.text(mark), at=at)
            ctx.facts[save] = AdminAnswer(at, code, text)
        case Await():
            evidence = step.evidence
            value = run.wait_for(
                ctx.text(step.what),
                lambda: step.until(ctx),
                timeout=seconds(ctx, step.deadline),
                sources=resolve(ctx, step.sources),
                evidence=None if evidence is None else (lambda: evidence(ctx)),
            )
            if step.save is not None:
                ctx.facts[step.save] = value
        case StartClients(clients=clients):
            run.start_clients(resolve(ctx, clients))
        case Exit(member=member, deadline=deadline, save=save):
            ctx.facts[save] = run.wait_exit(member, seconds(ctx, deadline))
        case StopClients(clients=clients):
            run.stop_clients(names=None if clients is None else resolve(ctx, clients))
        case Judge(judge=judge, gate=gate):
            run.poll()  # every member's latest lines
            found = list(judge(ctx))
            ctx.checks.extend(found)
            if gate and not all(c.passed for c in found):
                raise Gate
        case Probe(what=what, probe=probe):
            with run.progress.step(ctx.text(what)):
                ctx.checks.extend(probe(ctx))
        case Custom(do=do):
            do(ctx)
        case _:
            raise TypeError(f"not a step: {step!r}")


def play(scenario: Scenario, run: Run, checks: list[Check]) -> Ctx:
    """Play every step in order; a failed gate ends the scenario (its checks say why),
    a missed deadline raises :class:`~labkit.run.LabError` (the caller records it)."""
    ctx = Ctx(run, checks)
    for step in scenario.steps:
        try:
            play_step(ctx, step)
        except Gate:
            break
    return ctx


def preconditions(*phrases: tuple[bool, str]) -> list[str]:
    """The phrases whose condition fails: a compact way to write a ``needs``."""
    return [text for ok, text in phrases if not ok]
