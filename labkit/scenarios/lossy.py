"""lossy: a reply upstream and an echo upstream drop 10% of their packets for 20 s while
request/reply clients and 4 MiB transfers run. Every transfer is byte-exact or reported
failed (none ok when short, none corrupted); the proxy forwarded every byte of each ok
one; every request/reply attempt ends ok, rejected or with a named error, and each ok
names the upstream the proxy sent it to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .. import checks as ck
from .. import topology as topo
from ..checks import Check, check
from .common import evidence, names, outcomes
from .fault_cycle import choose_target, fault_ended, target_needs, toolkit
from .reset import choose_echo_target, reset_needs
from .steps import (
    SLACK,
    Await,
    Choose,
    Ctx,
    Inject,
    Judge,
    Recover,
    Scenario,
    Start,
    Steady,
    StopClients,
    talkers,
    transfers,
)

LOSS_FOR = "20s"
LOSS = toolkit("loss", "10%", lasting=LOSS_FOR)
# Matching a client's transfer to the proxy's access line: the proxy logs once the
# upstream side has closed too, and a lost FIN waits for a retransmission (RTO >= 200 ms),
# so the line may come well after the client's; transfers last 4 s, so 1.5 s cannot
# match a neighbour.
LOSSY_SLACK = 1.5
OUTCOMES = {"ok", "rejected", "timeout", "refused", "error", "truncated", "mismatch", "tls_error"}


def _window(ctx: Ctx) -> tuple[float, float]:
    start = min(ctx.facts["fault"], ctx.facts["fault_echo"])
    return start, start + topo.parse_duration(LOSS_FOR)


def _loss_over(ctx: Ctx) -> bool | None:
    """The helpers removed the loss by themselves (their time is up), and every
    transfer client has started one after that."""
    _, end = _window(ctx)
    if not fault_ended(ctx):
        return None
    after = [any(a.start > end for a in ctx.attempts([c])) for c in transfers(ctx)]
    return all(after) or None


def transfers_accounted(ctx: Ctx) -> Iterable[Check]:
    start, end = _window(ctx)
    moved = ctx.attempts(transfers(ctx))
    during = [a for a in moved if a.start < end and a.end > start]
    access = ctx.access()
    through = [a for a in during if ck.went_to(a, access, ctx.facts["echo"], SLACK)]
    short = [a for a in moved if a.ok and not ck.transfer_intact(a)]
    corrupted = [a for a in moved if a.outcome == "mismatch"]
    yield check(
        "every transfer byte-exact or reported failed; none ok when short, none corrupted",
        bool(through) and not short and not corrupted,
        f"{len(moved)} transfers ({len(during)} during the loss, {len(through)} of them "
        f"through {ctx.facts['echo']}): {outcomes(moved)}; {len(short)} ok but short, "
        f"{len(corrupted)} corrupted",
        evidence(short + corrupted or through[:2]),
    )
    ok = [a for a in moved if a.ok]
    account = ck.account_transfers(ok, access, LOSSY_SLACK)
    yield check(
        "the proxy forwarded every byte of each transfer reported ok",
        bool(ok) and not account.unforwarded,
        f"{len(ok)} ok transfers, {len(account.unforwarded)} without one forwarded/eof "
        "access line carrying every byte",
        account.evidence(access, LOSSY_SLACK),
    )


def replies_accounted(ctx: Ctx) -> Iterable[Check]:
    attempts, access = ctx.attempts(talkers(ctx)), ctx.access()
    unnamed = [a for a in attempts if a.outcome not in OUTCOMES or (not a.ok and not a.error)]
    misattributed = [
        a for a in attempts if a.ok and not ck.went_to(a, access, a.upstream or "", SLACK)
    ]
    yield check(
        "every request/reply attempt ends ok or with a named error; each ok names the "
        "upstream the proxy sent it to",
        bool(attempts) and not unnamed and not misattributed,
        f"{len(attempts)} attempts: {outcomes(attempts)} ({names(attempts)}); "
        f"{len(unnamed)} without a named outcome, {len(misattributed)} ok from an upstream "
        "the proxy did not send them to",
        evidence(unnamed + misattributed),
    )


def lossy_needs(config: Mapping[str, Any], topology: topo.Topology) -> list[str]:
    return target_needs(config, topology) + reset_needs(config, topology)


SCENARIO = Scenario(
    "lossy",
    "10% packet loss on a reply and an echo upstream for 20 s",
    topology="lossy",
    needs=lossy_needs,
    steps=(
        Start(),
        Choose("target", choose_target),
        Choose("echo", choose_echo_target, "loss on {target} and {echo}"),
        Steady(talkers),
        Inject(LOSS),
        Inject(LOSS, save="fault_echo", on="echo"),
        Await(
            f"the loss to end by itself ({LOSS_FOR}) and a transfer per client after it",
            _loss_over,
            lambda ctx: topo.parse_duration(LOSS_FOR) + 30,
        ),
        Recover(LOSS),
        Recover(LOSS, save="recover_echo", on="echo"),
        StopClients(),
        Judge(transfers_accounted),
        Judge(replies_accounted),
    ),
)
