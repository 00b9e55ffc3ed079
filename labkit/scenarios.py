"""The scenarios: each starts a topology, injects its fault, and judges the logs.

Every scenario appends :class:`~labkit.checks.Check` values to a list as it goes; a
wait that misses its deadline ends the scenario with a failed check carrying the log
lines seen. :func:`run_scenario` wraps one scenario in a :class:`~labkit.run.Run`
(so everything is removed afterwards, whatever happens) and returns a
:class:`ScenarioResult`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checks as ck
from . import isolation as iso
from . import needs
from . import topology as topo
from .checks import Check, check
from .engine import Engine, EngineError
from .logs import Access, Attempt, HealthEvent, LogLine, ReloadEvent, reloads_of
from .progress import Progress
from .report import write_report
from .result import ScenarioResult
from .run import LabError, Run, TimelineEvent

MARGIN = 1.0  # seconds added to interval + timeout for "the health-check window"
STEADY_REPLIES = 3  # replies per upstream (and per client) before a fault is injected
OBSERVE_ATTEMPTS = 5  # attempts per client observed after a fault was detected
SLACK = 0.05  # seconds of timestamp slack (milliseconds in logs, clocks of one host)
RULE_MARGIN = 0.5  # seconds around a reload in which a client attempt may follow either rules
ACCESS_SLACK = 0.1  # the same for the proxy's own decisions (one clock, milliseconds)
INVALID_KEY = "labkit_not_a_config_key"  # what makes the reload scenario's bad config bad


class ScenarioUnfit(ValueError):
    """The topology lacks what the scenario needs (nothing was started)."""

    def __init__(self, scenario: str, topology: str, lacking: list[str]) -> None:
        super().__init__(
            f"scenario {scenario} cannot run on topology {topology}: it needs " + "; ".join(lacking)
        )
        self.lacking = lacking


ScenarioFn = Callable[[Run, list[Check]], None]


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    topology: str
    summary: str
    fn: ScenarioFn


# --- helpers ------------------------------------------------------------------------


def _names(attempts: Sequence[Attempt]) -> str:
    return ck.describe_counts(ck.counts_by_upstream(attempts))


def _outcomes(attempts: Sequence[Attempt]) -> str:
    return ck.describe_counts(ck.outcome_counts(attempts))


def _evidence(items: Sequence[Attempt | Access | HealthEvent | LogLine]) -> list[str]:
    lines: list[str] = []
    for item in items:
        line = item if isinstance(item, LogLine) else item.line
        lines.append(line.evidence())
    return lines


def allowed_map(run: Run) -> dict[str, set[str]]:
    return needs.allowed(run.config, run.topology)


def wait_steady(run: Run, out: list[Check], clients: Sequence[str]) -> None:
    """Traffic reaches every upstream some client may use, and every client succeeds."""
    allowed = allowed_map(run)
    reachable = sorted(set().union(*(allowed[c] for c in clients)))

    def steady() -> bool | None:
        attempts = run.attempts(clients)
        per_upstream = ck.counts_by_upstream(attempts)
        per_client = {c: sum(1 for a in attempts if a.client == c and a.ok) for c in clients}
        if all(per_upstream[u] >= STEADY_REPLIES for u in reachable) and all(
            n >= STEADY_REPLIES for n in per_client.values()
        ):
            return True
        return None

    run.wait_for(
        f"steady traffic: >= {STEADY_REPLIES} replies from each of {', '.join(reachable)}",
        steady,
        timeout=20,
        sources=list(clients),
    )
    attempts = run.attempts(clients)
    out.append(
        check("steady traffic before the fault", True, f"replies so far: {_names(attempts)}")
    )


@dataclass(frozen=True, slots=True)
class Fault:
    name: str  # kill | pause | disconnect
    inject: Callable[[Run, str], float]
    recover: Callable[[Run, str], float]
    # Extra detection time beyond interval + timeout + margin, and why.
    allowance: Callable[[Run, str, topo.Timing], tuple[float, str]]


def _no_allowance(_run: Run, _target: str, _timing: topo.Timing) -> tuple[float, str]:
    return 0.0, ""


def _backlog_allowance(run: Run, target: str, timing: topo.Timing) -> tuple[float, str]:
    """A paused process's kernel still completes TCP handshakes until the listen queue
    (somaxconn + 1 connections) is full; only then do health checks time out."""
    spec = next(u for u in run.topology.upstreams if u.name == target)
    queue = (spec.somaxconn if spec.somaxconn is not None else 4096) + 1
    return queue * timing.interval, f" + {queue} checks to fill the accept queue"


def fault_cycle(run: Run, out: list[Check], fault: Fault) -> None:
    """Steady traffic; inject the fault on the target upstream; the proxy must mark it
    down within the health-check window, after which no reply names it and clients
    allowed elsewhere see no failure beyond the connections in flight on it; recover;
    the proxy must mark it up and send it traffic again."""
    run.start()
    target = needs.fault_target(run.config, run.topology)
    if target is None:  # run_scenario checks this before starting anything
        raise LabError("no upstream whose clients may all reach another: nothing to fault")
    run.mark("phase", f"fault target {target}: its clients may all reach another upstream")
    allowed = allowed_map(run)
    # Watched: the steady clients allowed somewhere (one allowed nowhere never succeeds).
    steady = needs.steady_clients(run.topology)
    clients = [c for c in run.client_names() if c in steady and allowed[c]]
    elsewhere = [c for c in clients if allowed[c] - {target}]
    timing = topo.timing(run.config)
    extra, why = fault.allowance(run, target, timing)
    window = timing.window(MARGIN) + extra
    window_text = (
        f"{window:.1f}s (interval {timing.interval:g}s x fall {timing.fall} + timeout "
        f"{timing.timeout:g}s + margin {MARGIN:g}s{why})"
    )
    wait_steady(run, out, clients)

    # The fault.
    t_fault = fault.inject(run, target)
    down = run.wait_for(
        f"the proxy to mark {target} down (window {window:.1f}s)",
        lambda: ck.first_transition(run.health(), target, "down", t_fault),
        timeout=window + 5,
        sources=["proxy"],
        evidence=lambda: _evidence(run.health()) + run.tail("proxy"),
    )
    delay = down.ts - t_fault
    before = [a for a in ck.replies_from(run.attempts(clients), target, 0.0) if a.end <= t_fault]
    if before:
        run.mark(
            "last_reply",
            f"last reply from {target} before the {fault.name}",
            target,
            before[-1].end,
        )
    out.append(
        check(
            f"{target} marked down within the health-check window after {fault.name}",
            delay <= window,
            f"down {delay:.2f}s after the {fault.name} ({down.source}: {down.reason}); "
            f"window {window_text}",
            [down.line.evidence()],
        )
    )
    # From here on no reply may name the target: once it is marked down, and at the
    # latest once the window has passed (a late detection fails the check above).
    boundary = min(down.ts, t_fault + window) + SLACK

    def observed() -> bool | None:
        later = [a for a in run.attempts(clients) if a.start > boundary]
        return (
            all(sum(1 for a in later if a.client == c) >= OBSERVE_ATTEMPTS for c in clients) or None
        )

    run.wait_for(
        f"{OBSERVE_ATTEMPTS} attempts per client after {target} went down",
        observed,
        timeout=20,
        sources=clients,
    )
    stray = ck.replies_from(run.attempts(clients), target, boundary)
    after_down = [a for a in run.attempts(clients) if a.start > boundary]
    out.append(
        check(
            f"no reply names {target} once it is down (or the window has passed)",
            not stray,
            f"{len(stray)} reply(ies) from {target} after it was marked down"
            if stray
            else f"replies after it went down: {_names(after_down)}",
            _evidence(stray),
        )
    )

    # Recovery.
    t_recover = fault.recover(run, target)
    if fault.name == "kill":
        run.wait_for(
            f"{target} to log 'listening' again",
            lambda: run.events(target, "listening", since=t_recover - SLACK) or None,
            timeout=20,
            sources=[target],
        )
    up = run.wait_for(
        f"the proxy to mark {target} up again",
        lambda: ck.first_transition(run.health(), target, "up", t_recover),
        timeout=window + 15,
        sources=["proxy"],
        evidence=lambda: _evidence(run.health()) + run.tail("proxy"),
    )
    out.append(
        check(
            f"{target} marked up again after recovery",
            True,
            f"up {up.ts - t_recover:.2f}s after the recovery ({up.source}: {up.reason})",
            [up.line.evidence()],
        )
    )

    def back_again() -> list[Attempt] | None:
        replies = ck.replies_from(run.attempts(clients), target, up.ts - SLACK)
        return replies if len(replies) >= STEADY_REPLIES else None

    back = run.wait_for(
        f"{STEADY_REPLIES} client replies from {target} again",
        back_again,
        timeout=15,
        sources=clients,
    )
    first = back[0]
    run.mark("first_reply", f"first reply from {target} after recovery", target, first.end)
    out.append(
        check(
            f"{target} receives traffic again",
            True,
            f"{len(back)} replies; the first {first.end - up.ts:.2f}s after it was marked up "
            f"({first.client})",
            [first.line.evidence()],
        )
    )
    run.stop_clients()

    # Failures, judged with every attempt logged (the clients have finished).
    account = ck.account_failures(
        run.attempts(elsewhere),
        run.access(),
        clients=elsewhere,
        target=target,
        fault_at=t_fault,
        detected=down.ts,
        slack=SLACK,
    )
    total = len(run.attempts(elsewhere))
    out.append(
        check(
            f"clients allowed elsewhere ({', '.join(elsewhere)}) lost only connections in "
            f"flight on {target}",
            not account.unexplained,
            f"{total} attempts, {account.total} failed: {len(account.on_target)} in flight on "
            f"{target} between the {fault.name} and its detection, "
            f"{len(account.unexplained)} unexplained",
            _evidence(account.unexplained or account.on_target),
        )
    )
    retried = [a for a in run.access() if a.attempts > 1 and a.ts >= t_fault]
    if retried:
        run.mark(
            "phase",
            f"{len(retried)} connection(s) re-dialled to another upstream (passive failover)",
            at=retried[0].ts,
        )


# --- the scenarios ------------------------------------------------------------------


def failover(run: Run, out: list[Check]) -> None:
    fault_cycle(run, out, Fault("kill", Run.kill, Run.restart, _no_allowance))


def hang(run: Run, out: list[Check]) -> None:
    fault_cycle(run, out, Fault("pause", Run.pause, Run.unpause, _backlog_allowance))


def partition(run: Run, out: list[Check]) -> None:
    fault_cycle(run, out, Fault("disconnect", Run.disconnect, Run.reconnect, _no_allowance))


def authz(run: Run, out: list[Check]) -> None:
    """Replies come only from allowed upstreams; a client allowed nowhere is always
    rejected (client ``rejected``, proxy ``denied``)."""
    run.start()
    clients = run.client_names()
    allowed = allowed_map(run)
    wanted = 12

    def covered() -> bool | None:
        attempts = run.attempts(clients)
        for client in clients:
            mine = [a for a in attempts if a.client == client]
            reached = {a.upstream for a in mine if a.ok}
            if len(mine) < wanted or not allowed[client] <= reached:
                return None
        return True

    run.wait_for(
        f">= {wanted} attempts per client, each allowed upstream reached",
        covered,
        timeout=30,
        sources=clients,
    )
    run.stop_clients()
    attempts = run.attempts(clients)
    access = run.access()
    for client in clients:
        mine = [a for a in attempts if a.client == client]
        if allowed[client]:
            wrong = [a for a in mine if a.ok and a.upstream not in allowed[client]]
            failed = [a for a in mine if not a.ok]
            out.append(
                check(
                    f"{client} served only by its allowed upstreams "
                    f"({', '.join(sorted(allowed[client]))})",
                    not wrong and not failed,
                    f"{len(mine)} attempts: {_names(mine)}; {len(wrong)} from a denied "
                    f"upstream, {len(failed)} failed",
                    _evidence(wrong + failed),
                )
            )
        else:
            not_rejected = [a for a in mine if a.outcome != "rejected"]
            proxy = [a for a in access if a.client == client]
            not_denied = [
                a for a in proxy if (a.decision, a.reason) != ("denied", "no_allowed_upstream")
            ]
            out.append(
                check(
                    f"{client} (allowed nowhere) rejected every time",
                    bool(mine) and not not_rejected,
                    f"{len(mine)} attempts, outcomes {ck.describe_counts(ck.outcome_counts(mine))}",
                    _evidence(not_rejected),
                )
            )
            out.append(
                check(
                    f"proxy denied {client} every time (denied / no_allowed_upstream)",
                    len(proxy) == len(mine) and not not_denied,
                    f"{len(proxy)} access lines for {len(mine)} attempts, "
                    f"{len(not_denied)} with another decision",
                    _evidence(not_denied or proxy[:3]),
                )
            )
    _identity_check(run, out)


def _identity_check(run: Run, out: list[Check]) -> None:
    """Every upstream connection that carried a client's bytes names that client."""
    lines = [
        line for name in run.topology.upstream_names() for line in run.events(name, "connection")
    ]
    carried = [line for line in lines if (line.record or {}).get("outcome") != "empty"]
    bad = ck.identity_problems(lines)
    out.append(
        check(
            "upstreams learned each client's identity from the PROXY v2 header",
            bool(carried) and not bad,
            f"{len(carried)} upstream connections with payload, {len(bad)} without a "
            "v2-proxy header naming the client that sent the message",
            _evidence(bad or carried[:2]),
        )
    )


def ratelimit(run: Run, out: list[Check]) -> None:
    """A --burst client is admitted at the token bucket's pace; a client keeping to the
    rate at the same time is never refused."""
    enabled, rate, burst = topo.rate_limit(topo.deep_merge(run.reference, run.topology.proxy))
    greedy = [c for c in run.topology.clients if c.burst]
    polite = [c for c in run.topology.clients if not c.burst]
    if not enabled or not greedy or not polite:
        raise LabError(
            "the ratelimit topology needs rate_limit enabled, a burst client and another"
        )
    run.start()
    clients = run.client_names()
    longest = max(topo.parse_duration(c.duration or "10s") for c in run.topology.clients)
    run.wait_for(
        "every client to finish (--duration) and log its summary",
        lambda: all(run.events(c, "summary") for c in clients) or None,
        timeout=longest + 20,
        sources=clients,
    )
    run.poll()
    access = run.access()
    for spec in greedy:
        mine = [a for a in access if a.client == spec.id]
        verdict = ck.bucket_verdict(mine, rate, burst)
        limited = [a for a in mine if a.decision == "rate_limited"]
        out.append(
            check(
                f"{spec.id} (--burst) admitted at rate {rate:g}/s after a burst of {burst}",
                verdict.within,
                verdict.describe(rate, burst),
                [a.line.evidence() for a in mine[:2] + mine[-2:]],
            )
        )
        out.append(
            check(
                f"{spec.id} was pushed beyond the bucket",
                verdict.limited > 0,
                f"{verdict.limited} connections rate-limited (reason "
                f"{ck.describe_counts(Counter(a.reason for a in limited))})",
            )
        )
        attempts = run.attempts([spec.id])
        outcomes = ck.outcome_counts(attempts)
        agree = outcomes["ok"] == verdict.admitted and outcomes["rejected"] == verdict.limited
        out.append(
            check(
                f"{spec.id}'s own log agrees with the proxy",
                agree and outcomes["ok"] + outcomes["rejected"] == len(attempts),
                f"client outcomes {ck.describe_counts(outcomes)}; proxy admitted "
                f"{verdict.admitted}, rate-limited {verdict.limited}",
            )
        )
    for spec in polite:
        gap = topo.parse_duration(spec.interval_min)
        attempts = run.attempts([spec.id])
        refused = [a for a in access if a.client == spec.id and a.decision == "rate_limited"]
        failed = [a for a in attempts if not a.ok]
        out.append(
            check(
                f"{spec.id} (interval >= {gap:g}s >= 1/rate) never rate-limited",
                bool(attempts) and not refused and not failed and gap >= 1 / rate,
                f"{len(attempts)} attempts, outcomes {_outcomes(attempts)}; "
                f"{len(refused)} rate_limited access lines",
                _evidence(failed) + [a.line.evidence() for a in refused],
            )
        )


def mtls(run: Run, out: list[Check]) -> None:
    """No certificate, another CA, an expired certificate and the server's own
    certificate are refused at the handshake, with the expected reason; a valid client
    still works and no refused client ever reaches an upstream."""
    run.start()
    assert run.addresses is not None
    clients = run.client_names()
    run.wait_for(
        "every client to finish (--count) and log its summary",
        lambda: all(run.events(c, "summary") for c in clients) or None,
        timeout=60,
        sources=clients,
    )
    run.poll()
    access = run.access()
    bad_ids: list[str] = []
    for spec in run.topology.clients:
        attempts = run.attempts([spec.id])
        if spec.expect is None:
            failed = [a for a in attempts if not a.ok]
            out.append(
                check(
                    f"{spec.id} (valid certificate) served",
                    bool(attempts) and not failed,
                    f"{len(attempts)} attempts: {_names(attempts)}; {len(failed)} failed",
                    _evidence(failed),
                )
            )
            continue
        bad_ids.append(spec.id)
        how = "no certificate" if spec.no_cert else f"certificate {spec.cert_stem or spec.id}"
        ok = [a for a in attempts if a.ok]
        out.append(
            check(
                f"{spec.id} ({how}) refused",
                bool(attempts) and not ok,
                f"{len(attempts)} attempts, outcomes {_outcomes(attempts)}",
                _evidence(ok or attempts[:1]),
            )
        )
        ip = run.addresses.clients[spec.id]
        mine = [a for a in access if a.peer_ip == ip]
        wrong = [
            a
            for a in mine
            if a.decision != "tls_failed" or a.reason != spec.expect or a.upstream_name
        ]
        out.append(
            check(
                f"proxy: {spec.id} tls_failed with '{spec.expect}'",
                len(mine) == len(attempts) and bool(mine) and not wrong,
                f"{len(mine)} access lines from {ip} for {len(attempts)} attempts; "
                f"{len(wrong)} with another decision or reason",
                _evidence(wrong or mine[:1]),
            )
        )
    leaked = [
        line
        for name in run.topology.upstream_names()
        for line in run.events(name, "connection")
        if any(f"from {bad}" in str((line.record or {}).get("message") or "") for bad in bad_ids)
    ]
    out.append(
        check(
            "no refused client's message reached an upstream",
            not leaked,
            f"{len(leaked)} upstream connection(s) carried a refused client's message",
            _evidence(leaked),
        )
    )


def _describe_rules(allowed: set[str]) -> str:
    return ", ".join(sorted(allowed)) if allowed else "denied"


def _transfer_ids(run: Run, *, autostart: bool = True) -> list[str]:
    return [c.id for c in run.topology.clients if c.transfer and c.autostart == autostart]


TRANSFER_SETTLE = 0.5  # seconds for a transfer to be connected after its client said so
TRANSFER_LEFT = 1.5  # seconds a transfer must still have to run when the fault comes


def _transfers_in_flight(run: Run, clients: Sequence[str], now: float) -> bool:
    """Is every transfer client connected (for :data:`TRANSFER_SETTLE`) with at least
    :data:`TRANSFER_LEFT` of its current transfer still to run? (Transfers run back to
    back: the current one began when the last one ended, or when the client started.)
    Clients start one after another, so "every one less than half done" could become
    impossible on a slow machine; a fixed margin before the end cannot."""
    for client in clients:
        spec = run.topology.client(client)
        ends = [a.end for a in run.attempts([client])]
        started = run.events(client, "started")
        if not started or (spec.count is not None and len(ends) >= spec.count):
            return False  # not started yet, or done
        began = ends[-1] if ends else started[0].ts
        planned = topo.parse_duration(spec.transfer_time or "0s")
        if not TRANSFER_SETTLE <= now - began <= planned - TRANSFER_LEFT:
            return False
    return True


def _first_reload(run: Run, after: float, *, ok: bool) -> ReloadEvent | None:
    found = [r for r in reloads_of(run.lines("proxy")) if r.ts >= after - SLACK and r.ok is ok]
    return found[0] if found else None


def _json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def reload(run: Run, out: list[Check]) -> None:
    """Change the authorization in the running proxy's config file and reload it (POST
    /reload through adminctl) while clients run -- some streaming long transfers to an
    echo upstream. Open connections survive byte-exact; new ones follow the new rules.
    Then an invalid config (SIGHUP) is refused and the rules in force stay."""
    run.start()
    transfers = _transfer_ids(run)
    replies = [c for c in run.client_names() if c not in transfers]
    if not transfers or not replies:
        raise LabError("the reload scenario needs transfer clients and request/reply clients")
    old_config = run.config
    new_config = {
        **old_config,
        "authorization": needs.reload_authorization(old_config, run.topology),
    }
    old = needs.allowed(old_config, run.topology)
    new = needs.allowed(new_config, run.topology)
    # The file may change now: the proxy reads it only when told to.
    new_sha = run.write_proxy_config(new_config, "the new authorization, not loaded yet")

    def steady() -> bool | None:
        attempts = run.attempts(replies)
        if any(sum(1 for a in attempts if a.client == c) < STEADY_REPLIES for c in replies):
            return None
        return _transfers_in_flight(run, transfers, time.time()) or None

    run.wait_for(
        f">= {STEADY_REPLIES} attempts per request/reply client under the old rules, every "
        f"transfer under way with >= {TRANSFER_LEFT:g}s to go",
        steady,
        timeout=30,
        sources=[*replies, *transfers],
    )

    # Step 1: the new rules, through the admin API.
    asked = time.time()
    code, body = run.adminctl("reload")
    run.mark("fault", "POST /reload (adminctl reload): new authorization", at=asked)
    done = run.wait_for(
        "the proxy to log 'reload' result ok",
        lambda: _first_reload(run, asked, ok=True) or _first_reload(run, asked, ok=False),
        timeout=10,
        sources=["proxy"],
    )
    answer = _json(body)
    out.append(
        check(
            "reload (POST /reload) applied the new config",
            code == 0 and answer.get("result") == "ok" and done.ok and done.sha256 == new_sha,
            f"adminctl exit {code}, result {answer.get('result')}; proxy logged reload "
            f"{done.result} with config_sha256 {str(done.sha256)[:12]}... (written: "
            f"{new_sha[:12]}...), {done.open_connections} connection(s) open",
            [f"adminctl: {' '.join(body.split())}"[:300], done.line.evidence()],
        )
    )
    if not done.ok:
        return
    at = done.ts
    run.mark("phase", "reload applied (new rules for new connections)", at=at)

    def observed(since: float) -> Callable[[], bool | None]:
        def probe() -> bool | None:
            attempts = run.attempts()
            for client in replies:
                later = [a for a in attempts if a.client == client and a.start > since]
                if len(later) < OBSERVE_ATTEMPTS:
                    return None
            for client in transfers:
                # The transfer open at the reload has ended (the next one is under way).
                if not any(a.client == client and a.end > at for a in attempts):
                    return None
            return True

        return probe

    run.wait_for(
        f"{OBSERVE_ATTEMPTS} attempts per request/reply client after the reload, and the "
        "end of the transfers open at the reload",
        observed(at + RULE_MARGIN),
        timeout=30,
    )

    # Step 2: an invalid config, by SIGHUP.
    bad_config = topo.deep_merge(new_config, {INVALID_KEY: True})
    run.write_proxy_config(bad_config, f"invalid: unknown key {INVALID_KEY}")
    hup = run.signal("proxy", "SIGHUP")
    refused = run.wait_for(
        "the proxy to log 'reload' result error",
        lambda: _first_reload(run, hup, ok=False) or _first_reload(run, hup, ok=True),
        timeout=10,
        sources=["proxy"],
    )
    run.wait_for(
        f"{OBSERVE_ATTEMPTS} attempts per client after the refused reload",
        observed(refused.ts + RULE_MARGIN),
        timeout=30,
    )
    run.write_proxy_config(new_config, "the valid config again (not reloaded)")
    status_code, status_text = run.adminctl("status")
    run.stop_clients()

    # Verdicts, with every attempt logged.
    attempts = run.attempts()
    access = run.access()
    moved = run.attempts(transfers)
    open_then = ck.in_flight(moved, at)
    missing = [c for c in transfers if not any(a.client == c for a in open_then)]
    account = ck.account_transfers(open_then, access, SLACK)
    out.append(
        check(
            "transfers open at the reload kept going and ended byte-exact",
            account.intact and not missing,
            f"{len(open_then)} transfer(s) in flight at the reload "
            f"({ck.describe_counts(Counter(a.client for a in open_then))}); "
            f"{len(account.broken)} not byte-exact, {len(account.unforwarded)} without a "
            f"forwarded/eof access line carrying every byte"
            + (f"; no transfer in flight for {', '.join(missing)}" if missing else ""),
            account.evidence(access, SLACK) or _evidence(open_then[:2]),
        )
    )
    every = ck.account_transfers(moved, access, SLACK)
    across = ck.in_flight(moved, refused.ts)
    begun = [a for a in moved if a.start > at]
    no_new = [c for c in transfers if not any(a.client == c for a in begun)]
    out.append(
        check(
            "every transfer ended byte-exact (those begun after the reload, and those "
            "across the refused one, too)",
            every.intact and not no_new,
            f"{len(moved)} transfers: {len(begun)} begun after the reload, {len(across)} in "
            f"flight at the refused reload; {len(every.broken)} not byte-exact, "
            f"{len(every.unforwarded)} not forwarded whole"
            + (f"; none begun after the reload for {', '.join(no_new)}" if no_new else ""),
            every.evidence(access, SLACK),
        )
    )
    change = ck.judge_rule_change(run.attempts(replies), old, new, at=at, margin=RULE_MARGIN)
    for client in replies:
        before = change.per_client(client, "before")
        after = change.per_client(client, "after")
        wrong = [a for a in change.wrong if a.client == client]
        out.append(
            check(
                f"{client}: {_describe_rules(old[client])} before the reload, "
                f"{_describe_rules(new[client])} after",
                bool(before) and len(after) >= OBSERVE_ATTEMPTS and not wrong,
                f"before: {len(before)} attempts ({_outcomes(before)}; {_names(before)}); "
                f"after: {len(after)} ({_outcomes(after)}; {_names(after)}); "
                f"{len(wrong)} against the rules of their time",
                _evidence(wrong),
            )
        )
    decisions = ck.judge_access_change(access, old, new, at=at, slack=ACCESS_SLACK)
    out.append(
        check(
            "proxy decisions follow the old rules before the reload and the new ones after",
            bool(decisions.before) and bool(decisions.after) and not decisions.wrong,
            f"{len(decisions.before)} access lines before, {len(decisions.after)} after, "
            f"{len(decisions.around)} within {ACCESS_SLACK:g}s of it; "
            f"{len(decisions.wrong)} against the rules (after: "
            f"{ck.describe_counts(Counter(a.decision for a in decisions.after))})",
            _evidence(decisions.wrong),
        )
    )
    key_named = refused.key == INVALID_KEY or INVALID_KEY in (refused.message or "")
    later_ok = [r for r in reloads_of(run.lines("proxy")) if r.ok and r.ts > refused.ts]
    out.append(
        check(
            "an invalid config (unknown key) is refused on SIGHUP",
            not refused.ok and key_named and not later_ok,
            f"reload {refused.result}: key {refused.key}, {refused.message}",
            [refused.line.evidence()],
        )
    )
    kept = ck.judge_rule_change(run.attempts(replies), new, new, at=refused.ts, margin=RULE_MARGIN)
    status = _json(status_text)
    config = status.get("config") or {}
    last = config.get("last_reload") or {}
    out.append(
        check(
            "after the refused reload the rules in force stay (traffic and /status)",
            len(kept.after) >= OBSERVE_ATTEMPTS * len(replies)
            and not [a for a in kept.wrong if a.start > refused.ts]
            and status_code == 0
            and config.get("sha256") == new_sha
            and last.get("result") == "error",
            f"{len(kept.after)} attempts after it, "
            f"{len([a for a in kept.wrong if a.start > refused.ts])} against the new rules; "
            f"/status: config sha256 {str(config.get('sha256'))[:12]}..., last_reload "
            f"{last.get('result')}",
            [
                *_evidence([a for a in kept.wrong if a.start > refused.ts]),
                f"adminctl status (exit {status_code}): {' '.join(status_text.split())}"[:300],
            ],
        )
    )
    _identity_check(run, out)
    if attempts:
        run.mark("phase", "clients stopped", at=max(a.end for a in attempts))


def drain(run: Run, out: list[Check]) -> None:
    """SIGTERM the proxy while long transfers stream to echo upstreams: it stops
    listening at once (new connects refused, /ready 503), lets every transfer finish
    byte-exact, and exits 0 (``drained``) before its drain window ends. Then, restarted
    with a 2s window, a transfer longer than the window is cut (``drain_timeout``)."""
    run.start()
    grace = topo.drain_grace(run.config)
    transfers = _transfer_ids(run)
    late = _transfer_ids(run, autostart=False)
    replies = [c for c in run.client_names() if c not in transfers]
    if not transfers or not replies:
        raise LabError("the drain scenario needs transfer clients and request/reply clients")
    longest = max(
        topo.parse_duration(run.topology.client(c).transfer_time or "0s") for c in transfers
    )
    if longest >= grace:
        raise LabError(f"the transfers ({longest:g}s) must fit the drain window ({grace:g}s)")

    def steady() -> bool | None:
        attempts = run.attempts()
        ok = all(
            sum(1 for a in attempts if a.client == c and a.ok) >= STEADY_REPLIES for c in replies
        )
        return (ok and _transfers_in_flight(run, transfers, time.time())) or None

    run.wait_for(
        f">= {STEADY_REPLIES} replies per request/reply client, every transfer under way "
        f"with >= {TRANSFER_LEFT:g}s to go",
        steady,
        timeout=30,
        sources=run.client_names(),
    )
    signalled = run.signal("proxy", "SIGTERM", stops=True)
    ready_code, ready_text = run.adminctl("ready")
    ready_at = time.time()
    draining = run.wait_for(
        "the proxy to log 'draining'",
        lambda: ck.event_after(run.lines("proxy"), "draining", signalled - SLACK),
        timeout=5,
        sources=["proxy"],
    )

    def tried_while_draining() -> bool | None:
        attempts = run.attempts(replies)
        later = [a for a in attempts if a.start > draining.ts + ACCESS_SLACK]
        return (
            all(sum(1 for a in later if a.client == c) >= STEADY_REPLIES for c in replies) or None
        )

    run.wait_for(
        f"{STEADY_REPLIES} attempts per request/reply client while the proxy drains",
        tried_while_draining,
        timeout=5,
        sources=replies,
    )
    # Stop them while the proxy still runs: once its container is gone, the name
    # 'proxy' takes the engine's resolver ~10s to fail, and a client cannot exit
    # while a lookup is under way.
    run.stop_clients(names=replies)
    code, exited = run.wait_exit("proxy", grace + 10)
    run.poll()
    stopped = ck.event_after(run.lines("proxy"), "stopped", signalled - SLACK)
    run.wait_for(
        "every transfer client to log its attempt",
        lambda: all(run.attempts([c]) for c in transfers) or None,
        timeout=15,
        sources=transfers,
    )
    run.stop_clients(names=transfers)
    access = run.access()

    lag = draining.ts - signalled
    opened = (draining.record or {}).get("open_connections")
    out.append(
        check(
            "SIGTERM: the proxy starts draining at once",
            lag < 1.0,
            f"'draining' logged {lag:.3f}s after the signal with {opened} connection(s) open, "
            f"grace {(draining.record or {}).get('grace_s')}s",
            [draining.evidence()],
        )
    )
    answer = _json(ready_text)
    out.append(
        check(
            "/ready answers 503 (draining) while the proxy drains",
            ready_code == 1
            and answer.get("ready") is False
            and answer.get("reason") == "draining"
            and (exited is None or ready_at < exited),
            f"adminctl ready exit {ready_code} {ready_at - signalled:.2f}s after the signal: "
            f"{' '.join(ready_text.split())}",
        )
    )
    until = stopped.ts if stopped is not None else (exited or time.time())
    window = ck.started_between(
        run.attempts(replies), draining.ts + ACCESS_SLACK, until - ACCESS_SLACK
    )
    not_refused = [a for a in window if a.outcome != "refused"]
    late_accepts = ck.accepted_after(access, draining.ts, SLACK)
    out.append(
        check(
            "the listener is closed while draining: new connections refused",
            bool(window) and not not_refused and not late_accepts,
            f"{len(window)} attempts started while draining: {_outcomes(window)}; "
            f"{len(late_accepts)} connection(s) accepted by the proxy after 'draining'",
            _evidence(not_refused) + _evidence(late_accepts),
        )
    )
    moved = run.attempts(transfers)
    open_then = ck.in_flight(moved, signalled)
    account = ck.account_transfers(open_then, access, SLACK)
    out.append(
        check(
            "every transfer in flight at SIGTERM completed byte-exact",
            account.intact and len(open_then) == len(transfers),
            f"{len(open_then)} of {len(transfers)} transfers in flight at the signal; "
            f"{len(account.broken)} not byte-exact, {len(account.unforwarded)} not forwarded "
            f"whole; ended {_outcomes(open_then)}",
            account.evidence(access, SLACK) or _evidence(moved[:2]),
        )
    )
    reason = (stopped.record or {}).get("reason") if stopped is not None else None
    took = None if exited is None else exited - signalled
    out.append(
        check(
            f"the proxy drained and exited 0 before its drain window ({grace:g}s)",
            reason == "drained" and code == 0 and took is not None and took < grace,
            f"stopped reason {reason}, exit code {code}, "
            + (f"exited {took:.2f}s after SIGTERM" if took is not None else "exit time unknown"),
            [stopped.evidence()] if stopped is not None else run.tail("proxy"),
        )
    )
    if exited is not None:
        run.mark("recover", "proxy exited (drained)", "proxy", at=exited)
    if late:
        _drain_cut(run, out, late)


CUT_GRACE = "2s"  # the drain window of the cut-off phase


def _drain_cut(run: Run, out: list[Check], late: list[str]) -> None:
    """Restart the proxy with a short drain window; a transfer longer than that is cut
    with access reason ``drain_timeout``, and the proxy still exits 0."""
    grace = topo.parse_duration(CUT_GRACE)
    config = topo.deep_merge(run.config, {"timeouts": {"drain": CUT_GRACE}})
    run.write_proxy_config(config, f"timeouts.drain {CUT_GRACE} for the cut-off phase")
    restarted = run.restart("proxy")
    run.wait_for(
        "the proxy to log 'listening' again",
        lambda: ck.event_after(run.lines("proxy"), "listening", restarted - SLACK),
        timeout=20,
        sources=["proxy"],
    )
    allowed = set().union(*(allowed_map(run)[c] for c in late))
    run.wait_for(
        f"the proxy's health checks to mark {', '.join(sorted(allowed))} up",
        lambda: all(ck.first_transition(run.health(), u, "up", restarted) for u in allowed) or None,
        timeout=15,
        sources=["proxy"],
    )
    run.start_clients(late)

    def forwarding() -> bool | None:
        code, text = run.adminctl("status")
        count = (_json(text).get("connections") or {}).get("forwarding")
        return (code == 0 and isinstance(count, int) and count >= len(late)) or None

    run.wait_for(
        f"{len(late)} transfer(s) forwarding (adminctl status)",
        forwarding,
        timeout=15,
        sources=["proxy", *late],
    )
    signalled = run.signal("proxy", "SIGTERM", stops=True)
    code, exited = run.wait_exit("proxy", grace + 10)
    run.wait_for(
        "the cut transfer(s) to be logged",
        lambda: all(run.attempts([c]) for c in late) or None,
        timeout=15,
        sources=late,
    )
    run.stop_clients(names=late)
    run.poll()
    stopped = ck.event_after(run.lines("proxy"), "stopped", signalled - SLACK)
    reason = (stopped.record or {}).get("reason") if stopped is not None else None
    cut = run.attempts(late)
    access = [a for a in run.access() if a.ts >= signalled - SLACK]
    lines = [line for a in cut for line in ck.access_for(a, access, SLACK)]
    took = None if exited is None else exited - signalled
    out.append(
        check(
            f"a transfer longer than the drain window ({CUT_GRACE}) is cut at drain_timeout",
            bool(cut)
            and all(not a.ok and (a.bytes_received or 0) < (a.transfer_bytes or 0) for a in cut)
            and len(lines) == len(cut)
            and all(line.reason == "drain_timeout" for line in lines)
            and reason == "drain_timeout"
            and code == 0
            and took is not None
            and grace - SLACK <= took < grace + 3.0,
            f"client: {_outcomes(cut)}; proxy: access reason "
            f"{ck.describe_counts(Counter(line.reason for line in lines))}, stopped reason "
            f"{reason}, exit code {code}, "
            + (f"exited {took:.2f}s after SIGTERM" if took is not None else "exit time unknown"),
            _evidence(cut) + _evidence(lines) + ([stopped.evidence()] if stopped else []),
        )
    )


def isolation(run: Run, out: list[Check]) -> None:
    """From inside every client: no upstream name resolves, no upstream address answers
    (so no forged PROXY header arrives), no private key is readable but its own. From
    inside an upstream: a forged header to another upstream is refused. The proxy holds
    its own key, never the CA's. And every client is still served (or refused) as its rules say."""
    names = run.topology.upstream_names()
    if len(names) < 2:
        raise LabError("isolation needs two upstreams (one forges a header to the other)")
    run.start()
    assert run.addresses is not None
    clients = run.client_names()
    addresses = [f"{ip}:{topo.UPSTREAM_PORT}" for ip in run.addresses.upstreams.values()]
    probed = run.mark("phase", "probes from inside the containers")
    holders = {c: iso.Holder(c, c, run.topology.client(c).cert_file_stem) for c in clients}
    out.extend(iso.probe_clients(run.exec, holders, names, addresses))
    out.append(iso.probe_proxy(run.exec, "proxy"))
    forger, victim = names[0], names[1]
    forged = iso.forged_identity(run.topology_client_ids(), "")
    victim_address = f"{run.addresses.upstreams[victim]}:{topo.UPSTREAM_PORT}"
    run.exec(forger, iso.probe_command([], [victim_address], forge=forged, keys=False))
    forger_ip = run.addresses.upstreams[forger]

    def from_forger() -> list[dict[str, Any]] | None:
        records = [line.record for line in run.events(victim, "connection") if line.record]
        return records if iso.from_peer(records, forger_ip) else None

    records = run.wait_for(
        f"{victim} to log the connection from {forger}", from_forger, timeout=10, sources=[victim]
    )
    out.append(iso.judge_forgery(forger_ip, forged, victim, records))

    rules = {c: allowed for c, allowed in allowed_map(run).items() if c in clients}
    found = run.wait_for(
        "every client treated as its rules say after the probes",
        lambda: iso.served_as_ruled([a for a in run.attempts(clients) if a.start > probed], rules),
        timeout=20,
    )
    out.append(check("every client is still treated as its rules say", True, "; ".join(found)))


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("failover", "failover", "kill an upstream, then start it again", failover),
        Scenario("authz", "authz", "replies only from allowed upstreams; denied client", authz),
        Scenario(
            "ratelimit", "ratelimit", "token bucket: --burst client vs polite client", ratelimit
        ),
        Scenario("mtls", "mtls", "bad client certificates refused, valid one served", mtls),
        Scenario("hang", "hang", "pause an upstream (hung process), then unpause", hang),
        Scenario(
            "partition", "partition", "disconnect an upstream's network, reconnect", partition
        ),
        Scenario(
            "reload", "reload", "change authorization and reload under load; bad config", reload
        ),
        Scenario("drain", "drain", "SIGTERM under long transfers: drain, then cut-off", drain),
        Scenario(
            "isolation",
            "isolation",
            "clients cannot reach upstreams, forge headers or read others' keys",
            isolation,
        ),
    )
}


# --- running one --------------------------------------------------------------------


def _add_log_timeline(run: Run, result: ScenarioResult) -> None:
    """Health transitions from the proxy's log and first/last reply per upstream."""
    events = list(run.timeline)
    for event in run.health():
        events.append(
            TimelineEvent(
                event.ts,
                "health",
                f"{event.upstream_name} {event.old} -> {event.new} "
                f"({event.source}: {event.reason})",
                event.upstream_name,
                state=event.new,
            )
        )
    attempts = run.attempts()
    for upstream in run.topology.upstream_names():
        replies = [a for a in attempts if a.ok and a.upstream == upstream]
        if replies:
            events.append(
                TimelineEvent(
                    replies[0].end, "first_reply", f"first reply from {upstream}", upstream
                )
            )
            events.append(
                TimelineEvent(
                    replies[-1].end, "last_reply", f"last reply from {upstream}", upstream
                )
            )
    result.timeline = sorted(events, key=lambda e: e.at)
    result.attempts = attempts


def run_scenario(
    name: str,
    *,
    engine: Engine,
    progress: Progress | None = None,
    keep: bool = False,
    report_dir: Path | None = None,
    topology_dir: Path = topo.TOPOLOGY_DIR,
    topology: str | None = None,
) -> ScenarioResult:
    """Run one scenario end to end (images must exist: see :func:`labkit.images.ensure_images`).

    Everything labelled with the run's id is removed before this returns (unless
    ``keep``), also when the scenario fails; on KeyboardInterrupt it is removed and
    the interrupt propagates."""
    scenario = SCENARIOS[name]
    progress = progress or Progress()
    layout = topo.load_topology(topology or scenario.topology, topology_dir)
    lacking = needs.missing(name, topo.nominal_config(topo.load_reference_config(), layout), layout)
    if lacking:
        raise ScenarioUnfit(name, layout.name, lacking)
    started = time.time()
    clock = time.monotonic()
    out: list[Check] = []
    run = Run(engine, layout, progress, keep=keep)
    result = ScenarioResult(scenario.name, layout.name, run.id, started)
    progress.say(f"scenario {name}: {scenario.summary} (run {run.id})")
    try:
        with run:
            try:
                scenario.fn(run, out)
            except (LabError, EngineError) as exc:
                result.error = str(exc)
                evidence = exc.evidence if isinstance(exc, LabError) else []
                out.append(check("scenario ran to completion", False, str(exc), evidence))
            finally:
                try:
                    run.poll()
                except EngineError as exc:
                    progress.say(f"could not read the final logs: {exc}")
                _add_log_timeline(run, result)
                result.logs = {
                    m.name: [line.text for line in m.lines] for m in run.members.values()
                }
                result.proxy_config = run.config
    except KeyboardInterrupt:
        result.interrupted = True
        raise
    finally:
        result.checks = out
        result.duration = time.monotonic() - clock
        result.removed = len(run.removed)
        if report_dir is not None:
            result.report_dir = write_report(result, report_dir, origin=run.origin)
            progress.say(f"report written to {result.report_dir}")
    return result
