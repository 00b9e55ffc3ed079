"""drain: SIGTERM the proxy while long transfers stream to echo upstreams. It stops
listening at once (new connects refused, /ready 503), lets every transfer finish
byte-exact, and exits 0 (``drained``) before its drain window ends. Then, restarted with
a 2 s window, a transfer longer than the window is cut (``drain_timeout``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from ..logs import LogLine
from .common import TRANSFER_LEFT, evidence, outcomes, transfers_in_flight
from .steps import (
    SLACK,
    STEADY_REPLIES,
    Admin,
    Await,
    Choose,
    Configure,
    Ctx,
    Custom,
    Exit,
    Judge,
    Scenario,
    Signal,
    Start,
    StartClients,
    StopClients,
    attempts_since,
    json_object,
    late_transfers,
    preconditions,
    talkers,
    transfers,
)

ACCESS_SLACK = 0.1  # seconds: the proxy's own decisions (one clock, milliseconds)
CUT_GRACE = "2s"  # the drain window of the cut-off phase


def _steady(ctx: Ctx) -> bool | None:
    attempts = ctx.attempts()
    enough = all(
        sum(1 for a in attempts if a.client == c and a.ok) >= STEADY_REPLIES for c in talkers(ctx)
    )
    return (enough and transfers_in_flight(ctx, transfers(ctx), time.time())) or None


def _proxy_event(event: str, since: str) -> Any:
    def condition(ctx: Ctx) -> LogLine | None:
        return ck.event_after(ctx.lines("proxy"), event, ctx.facts[since] - SLACK)

    return condition


def _logged(who: Any) -> Any:
    def condition(ctx: Ctx) -> bool | None:
        return all(ctx.attempts([c]) for c in who(ctx)) or None

    return condition


def drained(ctx: Ctx) -> Iterable[Check]:
    signalled, draining, ready = ctx.facts["signalled"], ctx.facts["draining"], ctx.facts["ready"]
    code, exited = ctx.facts["exit"]
    grace = ctx.facts["grace"]
    stopped = ck.event_after(ctx.lines("proxy"), "stopped", signalled - SLACK)
    access = ctx.access()
    record = draining.record or {}
    yield check(
        "SIGTERM: the proxy starts draining at once",
        draining.ts - signalled < 1.0,
        f"'draining' logged {draining.ts - signalled:.3f}s after the signal with "
        f"{record.get('open_connections')} connection(s) open, grace {record.get('grace_s')}s",
        [draining.evidence()],
    )
    answer = ready.json
    yield check(
        "/ready answers 503 (draining) while the proxy drains",
        ready.code == 1
        and answer.get("ready") is False
        and answer.get("reason") == "draining"
        and (exited is None or ready.at < exited),
        f"adminctl ready exit {ready.code} {ready.at - signalled:.2f}s after the signal: "
        f"{ready.evidence()}",
    )
    until = stopped.ts if stopped is not None else (exited or time.time())
    window = ck.started_between(
        ctx.attempts(talkers(ctx)), draining.ts + ACCESS_SLACK, until - ACCESS_SLACK
    )
    not_refused = [a for a in window if a.outcome != "refused"]
    late_accepts = ck.accepted_after(access, draining.ts, SLACK)
    yield check(
        "the listener is closed while draining: new connections refused",
        bool(window) and not not_refused and not late_accepts,
        f"{len(window)} attempts started while draining: {outcomes(window)}; "
        f"{len(late_accepts)} connection(s) accepted by the proxy after 'draining'",
        evidence(not_refused) + evidence(late_accepts),
    )
    moved = ctx.attempts(transfers(ctx))
    open_then = ck.in_flight(moved, signalled)
    account = ck.account_transfers(open_then, access, SLACK)
    yield check(
        "every transfer in flight at SIGTERM completed byte-exact",
        account.intact and len(open_then) == len(transfers(ctx)),
        f"{len(open_then)} of {len(transfers(ctx))} transfers in flight at the signal; "
        f"{len(account.broken)} not byte-exact, {len(account.unforwarded)} not forwarded "
        f"whole; ended {outcomes(open_then)}",
        account.evidence(access, SLACK) or evidence(moved[:2]),
    )
    reason = (stopped.record or {}).get("reason") if stopped is not None else None
    took = None if exited is None else exited - signalled
    yield check(
        f"the proxy drained and exited 0 before its drain window ({grace:g}s)",
        reason == "drained" and code == 0 and took is not None and took < grace,
        f"stopped reason {reason}, exit code {code}, "
        + (f"exited {took:.2f}s after SIGTERM" if took is not None else "exit time unknown"),
        [stopped.evidence()] if stopped is not None else ctx.run.tail("proxy"),
    )
    if exited is not None:
        ctx.run.mark("recover", "proxy exited (drained)", "proxy", at=exited)


def _restart_proxy(ctx: Ctx) -> None:
    ctx.facts["restarted"] = ctx.run.restart("proxy")


def _late_upstreams_up(ctx: Ctx) -> bool | None:
    allowed = ctx.allowed
    wanted = set().union(*(allowed[c] for c in late_transfers(ctx)))
    since = ctx.facts["restarted"]
    return all(ck.first_transition(ctx.health(), u, "up", since) for u in wanted) or None


def _forwarding(ctx: Ctx) -> bool | None:
    code, text = ctx.run.adminctl("status")
    count = (json_object(text).get("connections") or {}).get("forwarding")
    return (code == 0 and isinstance(count, int) and count >= len(late_transfers(ctx))) or None


def cut(ctx: Ctx) -> Iterable[Check]:
    grace = topo.parse_duration(CUT_GRACE)
    signalled = ctx.facts["cut_signalled"]
    code, exited = ctx.facts["cut_exit"]
    stopped = ck.event_after(ctx.lines("proxy"), "stopped", signalled - SLACK)
    reason = (stopped.record or {}).get("reason") if stopped is not None else None
    attempts = ctx.attempts(late_transfers(ctx))
    access = [a for a in ctx.access() if a.ts >= signalled - SLACK]
    lines = [line for a in attempts for line in ck.access_for(a, access, SLACK)]
    took = None if exited is None else exited - signalled
    yield check(
        f"a transfer longer than the drain window ({CUT_GRACE}) is cut at drain_timeout",
        bool(attempts)
        and all(not a.ok and (a.bytes_received or 0) < (a.transfer_bytes or 0) for a in attempts)
        and len(lines) == len(attempts)
        and all(line.reason == "drain_timeout" for line in lines)
        and reason == "drain_timeout"
        and code == 0
        and took is not None
        and grace - SLACK <= took < grace + 3.0,
        f"client: {outcomes(attempts)}; proxy: access reason "
        f"{ck.describe_counts(Counter(line.reason for line in lines))}, stopped reason "
        f"{reason}, exit code {code}, "
        + (f"exited {took:.2f}s after SIGTERM" if took is not None else "exit time unknown"),
        evidence(attempts) + evidence(lines) + ([stopped.evidence()] if stopped else []),
    )


def drain_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    clients = topology.clients
    grace = topo.drain_grace(config)
    longest = max(
        (
            topo.parse_duration(c.transfer_time or "0s")
            for c in clients
            if c.transfer and c.autostart
        ),
        default=0.0,
    )
    return preconditions(
        (
            any(c.transfer and c.autostart and c.finite for c in clients),
            "a transfer client that stops by itself",
        ),
        (
            any(c.transfer and not c.autostart for c in clients),
            "a transfer client the scenario starts itself (autostart: false)",
        ),
        (longest < grace, f"transfers ({longest:g}s) that fit the drain window ({grace:g}s)"),
    )


SCENARIO = Scenario(
    "drain",
    "SIGTERM under long transfers: drain, then cut-off",
    topology="drain",
    needs=drain_needs,
    steps=(
        Start(),
        Choose("grace", lambda ctx: topo.drain_grace(ctx.config)),
        Await(
            f">= {STEADY_REPLIES} replies per request/reply client, every transfer under way "
            f"with >= {TRANSFER_LEFT:g}s to go",
            _steady,
            30,
        ),
        Signal("proxy", "SIGTERM", "signalled", stops=True),
        Admin("ready", "ready"),
        Await(
            "the proxy to log 'draining'",
            _proxy_event("draining", "signalled"),
            5,
            ["proxy"],
            "draining",
        ),
        Await(
            f"{STEADY_REPLIES} attempts per request/reply client while the proxy drains",
            attempts_since(
                talkers, lambda ctx: ctx.facts["draining"].ts + ACCESS_SLACK, STEADY_REPLIES
            ),
            5,
            sources=talkers,
        ),
        # Stop them while the proxy still runs: once its container is gone, the name
        # 'proxy' takes the engine's resolver ~10s to fail, and a client cannot exit
        # while a lookup is under way.
        StopClients(talkers),
        Exit("proxy", lambda ctx: ctx.facts["grace"] + 10, "exit"),
        Await("every transfer client to log its attempt", _logged(transfers), 15, transfers),
        StopClients(transfers),
        Judge(drained),
        # The cut-off phase: a short drain window, a transfer longer than it.
        Configure(
            lambda ctx: topo.deep_merge(ctx.config, {"timeouts": {"drain": CUT_GRACE}}),
            f"timeouts.drain {CUT_GRACE} for the cut-off phase",
        ),
        Custom("restart the proxy", _restart_proxy),
        Await(
            "the proxy to log 'listening' again",
            _proxy_event("listening", "restarted"),
            20,
            ["proxy"],
        ),
        Await(
            "the proxy's health checks to mark the late clients' upstreams up",
            _late_upstreams_up,
            15,
            ["proxy"],
        ),
        StartClients(late_transfers),
        Await(
            "the late transfer(s) forwarding (adminctl status)",
            _forwarding,
            15,
            sources=lambda ctx: ["proxy", *late_transfers(ctx)],
        ),
        Signal("proxy", "SIGTERM", "cut_signalled", stops=True),
        Exit("proxy", topo.parse_duration(CUT_GRACE) + 10, "cut_exit"),
        Await("the cut transfer(s) to be logged", _logged(late_transfers), 15, late_transfers),
        StopClients(late_transfers),
        Judge(cut),
    ),
)
