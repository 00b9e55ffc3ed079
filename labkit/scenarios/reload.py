"""reload: change the authorization in the running proxy's config file and reload it
(POST /reload through adminctl) while clients run, some streaming long transfers to an
echo upstream. Open connections survive byte-exact; new ones follow the new rules. Then
an invalid config (SIGHUP) is refused and the rules in force stay."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import needs
from .. import topology as topo
from ..checks import Check, check
from ..logs import reloads_of
from .common import (
    TRANSFER_LEFT,
    evidence,
    identity,
    names,
    outcomes,
    reload_after,
    rules_text,
    transfers_in_flight,
)
from .steps import (
    OBSERVE_ATTEMPTS,
    SLACK,
    STEADY_REPLIES,
    Admin,
    Await,
    Choose,
    Configure,
    Ctx,
    Judge,
    Scenario,
    Signal,
    Start,
    StopClients,
    preconditions,
    talkers,
    transfers,
)

RULE_MARGIN = 0.5  # seconds around a reload in which a client attempt may follow either rules
ACCESS_SLACK = 0.1  # the same for the proxy's own decisions (one clock, milliseconds)
INVALID_KEY = "labkit_not_a_config_key"  # what makes the bad config bad


def _new_config(ctx: Ctx) -> dict[str, Any]:
    return {**ctx.config, "authorization": needs.reload_authorization(ctx.config, ctx.topology)}


def _rules(ctx: Ctx, which: str) -> dict[str, set[str]]:
    return needs.allowed(ctx.facts[which], ctx.topology)


def _steady(ctx: Ctx) -> bool | None:
    attempts = ctx.attempts(talkers(ctx))
    if any(sum(1 for a in attempts if a.client == c) < STEADY_REPLIES for c in talkers(ctx)):
        return None
    return transfers_in_flight(ctx, transfers(ctx), time.time()) or None


def _observed(since: str) -> Any:
    """After the reload line saved as ``since`` (+ margin): OBSERVE_ATTEMPTS per
    request/reply client, and every transfer open at the (first) reload has ended."""

    def condition(ctx: Ctx) -> bool | None:
        attempts, at = ctx.attempts(), ctx.facts["done"].ts
        later = ctx.facts[since].ts + RULE_MARGIN
        for client in talkers(ctx):
            if (
                sum(1 for a in attempts if a.client == client and a.start > later)
                < OBSERVE_ATTEMPTS
            ):
                return None
        return (
            all(any(a.client == c and a.end > at for a in attempts) for c in transfers(ctx)) or None
        )

    return condition


def applied(ctx: Ctx) -> Iterable[Check]:
    asked, done, sha = ctx.facts["asked"], ctx.facts["done"], ctx.facts["new_sha"]
    answer = asked.json
    yield check(
        "reload (POST /reload) applied the new config",
        asked.code == 0 and answer.get("result") == "ok" and done.ok and done.sha256 == sha,
        f"adminctl exit {asked.code}, result {answer.get('result')}; proxy logged reload "
        f"{done.result} with config_sha256 {str(done.sha256)[:12]}... (written: "
        f"{sha[:12]}...), {done.open_connections} connection(s) open",
        [f"adminctl: {asked.evidence()}", done.line.evidence()],
    )
    if done.ok:
        ctx.run.mark("phase", "reload applied (new rules for new connections)", at=done.ts)


def transfers_kept(ctx: Ctx) -> Iterable[Check]:
    access, moved, at = ctx.access(), ctx.attempts(transfers(ctx)), ctx.facts["done"].ts
    open_then = ck.in_flight(moved, at)
    missing = [c for c in transfers(ctx) if not any(a.client == c for a in open_then)]
    account = ck.account_transfers(open_then, access, SLACK)
    yield check(
        "transfers open at the reload kept going and ended byte-exact",
        account.intact and not missing,
        f"{len(open_then)} transfer(s) in flight at the reload "
        f"({ck.describe_counts(Counter(a.client for a in open_then))}); "
        f"{len(account.broken)} not byte-exact, {len(account.unforwarded)} without a "
        f"forwarded/eof access line carrying every byte"
        + (f"; no transfer in flight for {', '.join(missing)}" if missing else ""),
        account.evidence(access, SLACK) or evidence(open_then[:2]),
    )
    every = ck.account_transfers(moved, access, SLACK)
    across = ck.in_flight(moved, ctx.facts["refused"].ts)
    begun = [a for a in moved if a.start > at]
    no_new = [c for c in transfers(ctx) if not any(a.client == c for a in begun)]
    yield check(
        "every transfer ended byte-exact (those begun after the reload, and those "
        "across the refused one, too)",
        every.intact and not no_new,
        f"{len(moved)} transfers: {len(begun)} begun after the reload, {len(across)} in "
        f"flight at the refused reload; {len(every.broken)} not byte-exact, "
        f"{len(every.unforwarded)} not forwarded whole"
        + (f"; none begun after the reload for {', '.join(no_new)}" if no_new else ""),
        every.evidence(access, SLACK),
    )


def rules_follow(ctx: Ctx) -> Iterable[Check]:
    old, new, at = _rules(ctx, "old"), _rules(ctx, "new"), ctx.facts["done"].ts
    change = ck.judge_rule_change(ctx.attempts(talkers(ctx)), old, new, at=at, margin=RULE_MARGIN)
    for client in talkers(ctx):
        before = change.per_client(client, "before")
        after = change.per_client(client, "after")
        wrong = [a for a in change.wrong if a.client == client]
        yield check(
            f"{client}: {rules_text(old[client])} before the reload, "
            f"{rules_text(new[client])} after",
            bool(before) and len(after) >= OBSERVE_ATTEMPTS and not wrong,
            f"before: {len(before)} attempts ({outcomes(before)}; {names(before)}); "
            f"after: {len(after)} ({outcomes(after)}; {names(after)}); "
            f"{len(wrong)} against the rules of their time",
            evidence(wrong),
        )
    decisions = ck.judge_access_change(ctx.access(), old, new, at=at, slack=ACCESS_SLACK)
    yield check(
        "proxy decisions follow the old rules before the reload and the new ones after",
        bool(decisions.before) and bool(decisions.after) and not decisions.wrong,
        f"{len(decisions.before)} access lines before, {len(decisions.after)} after, "
        f"{len(decisions.around)} within {ACCESS_SLACK:g}s of it; "
        f"{len(decisions.wrong)} against the rules (after: "
        f"{ck.describe_counts(Counter(a.decision for a in decisions.after))})",
        evidence(decisions.wrong),
    )


def invalid_refused(ctx: Ctx) -> Iterable[Check]:
    refused, new = ctx.facts["refused"], _rules(ctx, "new")
    named = refused.key == INVALID_KEY or INVALID_KEY in (refused.message or "")
    later_ok = [r for r in reloads_of(ctx.lines("proxy")) if r.ok and r.ts > refused.ts]
    yield check(
        "an invalid config (unknown key) is refused on SIGHUP",
        not refused.ok and named and not later_ok,
        f"reload {refused.result}: key {refused.key}, {refused.message}",
        [refused.line.evidence()],
    )
    kept = ck.judge_rule_change(
        ctx.attempts(talkers(ctx)), new, new, at=refused.ts, margin=RULE_MARGIN
    )
    wrong = [a for a in kept.wrong if a.start > refused.ts]
    status = ctx.facts["status"]
    config = status.json.get("config") or {}
    last = config.get("last_reload") or {}
    yield check(
        "after the refused reload the rules in force stay (traffic and /status)",
        len(kept.after) >= OBSERVE_ATTEMPTS * len(talkers(ctx))
        and not wrong
        and status.code == 0
        and config.get("sha256") == ctx.facts["new_sha"]
        and last.get("result") == "error",
        f"{len(kept.after)} attempts after it, {len(wrong)} against the new rules; "
        f"/status: config sha256 {str(config.get('sha256'))[:12]}..., last_reload "
        f"{last.get('result')}",
        [*evidence(wrong), f"adminctl status (exit {status.code}): {status.evidence()}"],
    )


def reload_needs(_config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    clients = topology.clients
    echo = any(u.mode == "echo" for u in topology.upstreams)
    return preconditions(
        (
            echo and any(c.transfer and c.autostart for c in clients),
            "a transfer client and an echo upstream",
        ),
        (
            len([c for c in clients if not c.transfer]) >= 3,
            "three request/reply clients (one moved, one denied, one allowed)",
        ),
        (len(needs.reply_upstreams(topology)) >= 2, "two reply upstreams"),
    )


def _bad_config(ctx: Ctx) -> dict[str, Any]:
    return topo.deep_merge(ctx.facts["new"], {INVALID_KEY: True})


SCENARIO = Scenario(
    "reload",
    "change authorization and reload under load; bad config",
    topology="reload",
    needs=reload_needs,
    steps=(
        Start(),
        Choose("old", lambda ctx: dict(ctx.config)),
        Choose("new", _new_config),
        Configure(lambda ctx: ctx.facts["new"], "the new authorization, not loaded yet", "new_sha"),
        Await(
            f">= {STEADY_REPLIES} attempts per request/reply client under the old rules, every "
            f"transfer under way with >= {TRANSFER_LEFT:g}s to go",
            _steady,
            30,
        ),
        Admin("reload", "asked", mark="POST /reload (adminctl reload): new authorization"),
        Await(
            "the proxy to log its 'reload' result",
            lambda ctx: reload_after(ctx, ctx.facts["asked"].at),
            10,
            sources=["proxy"],
            save="done",
        ),
        Judge(applied, gate=True),
        Await(
            f"{OBSERVE_ATTEMPTS} attempts per request/reply client after the reload, and the "
            "end of the transfers open at the reload",
            _observed("done"),
            30,
            sources=lambda ctx: ["proxy", *ctx.clients()],
        ),
        Configure(_bad_config, f"invalid: unknown key {INVALID_KEY}"),
        Signal("proxy", "SIGHUP", "hup"),
        Await(
            "the proxy to log its 'reload' result (an error)",
            lambda ctx: reload_after(ctx, ctx.facts["hup"]),
            10,
            sources=["proxy"],
            save="refused",
        ),
        Await(
            f"{OBSERVE_ATTEMPTS} attempts per client after the refused reload",
            _observed("refused"),
            30,
            sources=lambda ctx: ["proxy", *ctx.clients()],
        ),
        Configure(lambda ctx: ctx.facts["new"], "the valid config again (not reloaded)"),
        Admin("status", "status"),
        StopClients(),
        Judge(transfers_kept),
        Judge(rules_follow),
        Judge(invalid_refused),
        Judge(identity),
    ),
)
