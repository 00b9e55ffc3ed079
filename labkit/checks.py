"""Verdict logic (pure): what the logs must show for a scenario to pass.

Nothing here talks to Docker or reads a clock: the scenarios pass in the parsed log
records (:mod:`labkit.logs`) and the times at which they injected faults, and get back
:class:`Check` values -- a name, pass/fail, a one-line detail and the log lines that
are the evidence.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .logs import Access, Attempt, HealthEvent, LogLine

_Item = TypeVar("_Item")

EVIDENCE_LIMIT = 12


@dataclass(slots=True)
class Check:
    name: str
    passed: bool
    detail: str
    evidence: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "detail": self.detail,
            "evidence": self.evidence,
        }


def check(name: str, passed: bool, detail: str, evidence: Iterable[str] = ()) -> Check:
    lines = list(evidence)
    if len(lines) > EVIDENCE_LIMIT:
        hidden = len(lines) - EVIDENCE_LIMIT
        lines = [*lines[:EVIDENCE_LIMIT], f"... and {hidden} more line(s)"]
    return Check(name, passed, detail, lines)


# --- authorization ------------------------------------------------------------------


def _names(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(str(item) for item in items)


def allowed_upstreams(
    client: str, upstreams: Sequence[Mapping[str, Any]], authorization: Mapping[str, Any]
) -> set[str]:
    """Names of the upstreams ``client`` may reach under a proxy config's rules.

    The proxy's semantics, restated independently: rules in order, first match on
    (client, upstream name / address / ``*``) wins, else ``default``."""
    return allowed_table([client], upstreams, authorization)[client]


def allowed_table(
    clients: Iterable[str], upstreams: Sequence[Mapping[str, Any]], authorization: Mapping[str, Any]
) -> dict[str, set[str]]:
    """:func:`allowed_upstreams` for many clients, reading the rules once (with 200
    identities listed in rules, reading them per client and upstream cost ~80 ms)."""
    default = str(authorization.get("default", "allow"))
    rules = [
        (
            frozenset(_names(rule["client"])),
            frozenset(_names(rule["upstream"])),
            str(rule["action"]),
        )
        for rule in authorization.get("rules") or []
    ]
    labelled = [
        (name, {name, str(u["address"]), "*"})
        for u in upstreams
        for name in [str(u.get("name") or u["address"])]
    ]
    table: dict[str, set[str]] = {}
    for client in clients:
        mine = [(targets, action) for who, targets, action in rules if client in who or "*" in who]
        table[client] = {
            name
            for name, labels in labelled
            if next((action for targets, action in mine if labels & targets), default) == "allow"
        }
    return table


# --- token bucket -------------------------------------------------------------------


def expected_admitted(rate: float, burst: int, elapsed: float) -> float:
    """Connections a saturating client gets through a full bucket in ``elapsed`` s."""
    return burst + rate * max(0.0, elapsed)


def rate_tolerance(expected: float) -> float:
    """The accepted deviation from :func:`expected_admitted`: two connections (one for
    the fractional token at either end of the window, one for the millisecond
    resolution of the timestamps) or 5 %, whichever is larger."""
    return max(2.0, 0.05 * expected)


REPLAY_SLACK = 2  # decisions a millisecond of timestamp rounding can flip at a boundary


def simulate_bucket(times: Iterable[float], rate: float, burst: int) -> list[bool]:
    """Replay a token bucket (full at the first request) over request times, in order;
    True where a request is admitted. Mirrors the proxy's ``TokenBucket``."""
    tokens = float(burst)
    updated: float | None = None
    admitted: list[bool] = []
    for now in times:
        if updated is None:
            updated = now
        elif now > updated:
            tokens = min(float(burst), tokens + (now - updated) * rate)
            updated = now
        if tokens >= 1.0:
            tokens -= 1.0
            admitted.append(True)
        else:
            admitted.append(False)
    return admitted


@dataclass(frozen=True, slots=True)
class BucketVerdict:
    admitted: int
    limited: int
    elapsed: float
    expected: float
    tolerance: float
    simulated: int

    @property
    def within(self) -> bool:
        """The proxy decided as the bucket does at the times the client asked (the
        replay, give or take :data:`REPLAY_SLACK` decisions at token boundaries), and
        never admitted more than a saturating client could get (burst + rate x elapsed,
        within :func:`rate_tolerance`). Not the converse: a client slowed down by a
        busy machine asks less often than the bucket refills, and gets less."""
        replayed = abs(self.admitted - self.simulated) <= REPLAY_SLACK
        return replayed and self.admitted <= self.expected + self.tolerance

    def describe(self, rate: float, burst: int) -> str:
        return (
            f"admitted {self.admitted}, rate-limited {self.limited} in {self.elapsed:.2f}s; "
            f"the bucket replayed at the logged admission times admits {self.simulated} "
            f"(+/- {REPLAY_SLACK}); at most burst + rate x elapsed = {burst} + {rate:g} x "
            f"{self.elapsed:.2f} = {self.expected:.1f} +/- {self.tolerance:.1f}"
        )


def bucket_verdict(access: Sequence[Access], rate: float, burst: int) -> BucketVerdict:
    """Judge one client's admission decisions (its access lines) against the bucket.

    The admission time of a connection is its accept time plus its handshake time
    (``ts - duration_ms + handshake_ms``); the window runs from the first admission
    decision to the last one."""
    decided = sorted(
        (a for a in access if a.admitted_at is not None and a.decision != "tls_failed"),
        key=lambda a: a.admitted_at or 0.0,
    )
    times = [a.admitted_at or 0.0 for a in decided]
    limited = sum(1 for a in decided if a.decision == "rate_limited")
    admitted = len(decided) - limited
    elapsed = times[-1] - times[0] if times else 0.0
    expected = expected_admitted(rate, burst, elapsed)
    return BucketVerdict(
        admitted=admitted,
        limited=limited,
        elapsed=elapsed,
        expected=expected,
        tolerance=rate_tolerance(expected),
        simulated=sum(simulate_bucket(times, rate, burst)),
    )


# --- failures around a fault --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailureAccount:
    """Failed client attempts around a fault, sorted into the excused and the rest."""

    on_target: list[Attempt]  # in flight on the faulty upstream before it was marked down
    unexplained: list[Attempt]

    @property
    def total(self) -> int:
        return len(self.on_target) + len(self.unexplained)


def went_to(attempt: Attempt, access: Sequence[Access], upstream: str, slack: float) -> bool:
    """Did the proxy forward this attempt's connection to ``upstream``? (Same client
    identity, a connection to that upstream whose lifetime overlaps the attempt's.)"""
    for line in access:
        if line.client != attempt.client or line.upstream_name != upstream:
            continue
        if line.start <= attempt.end + slack and line.ts >= attempt.start - slack:
            return True
    return False


def account_failures(
    attempts: Iterable[Attempt],
    access: Sequence[Access],
    *,
    clients: Iterable[str],
    target: str,
    fault_at: float,
    detected: float,
    slack: float = 0.05,
) -> FailureAccount:
    """Every failed attempt of ``clients`` must have been a connection to ``target``
    that was open when the fault was injected or started before the proxy marked
    ``target`` down (``detected``): the connections in flight on the faulty upstream.
    Anything else -- a failure before the fault, after the detection, or on another
    upstream -- is unexplained."""
    wanted = set(clients)
    on_target: list[Attempt] = []
    unexplained: list[Attempt] = []
    for attempt in attempts:
        if attempt.client not in wanted or attempt.ok:
            continue
        in_window = attempt.end >= fault_at - slack and attempt.start <= detected + slack
        if in_window and went_to(attempt, access, target, slack):
            on_target.append(attempt)
        else:
            unexplained.append(attempt)
    return FailureAccount(on_target, unexplained)


def replies_from(attempts: Iterable[Attempt], upstream: str, after: float) -> list[Attempt]:
    """``ok`` attempts answered by ``upstream`` that started after ``after``."""
    return [a for a in attempts if a.ok and a.upstream == upstream and a.start > after]


def first_transition(
    events: Iterable[HealthEvent], upstream: str, new: str, after: float, slack: float = 0.05
) -> HealthEvent | None:
    """The first health transition of ``upstream`` into ``new`` at or after ``after``."""
    found = [
        e for e in events if e.upstream_name == upstream and e.new == new and e.ts >= after - slack
    ]
    return min(found, key=lambda e: e.ts) if found else None


def counts_by_upstream(attempts: Iterable[Attempt]) -> Counter[str]:
    return Counter(a.upstream for a in attempts if a.ok and a.upstream)


def outcome_counts(attempts: Iterable[Attempt]) -> Counter[str]:
    return Counter(a.outcome for a in attempts)


def describe_counts(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counts.items())) or "none"


# --- rule changes (reload) ---------------------------------------------------------


def follows_rules(attempt: Attempt, allowed: set[str]) -> bool:
    """Did a request/reply attempt turn out as rules allowing ``allowed`` say? A reply
    from one of them, or -- allowed nowhere -- ``rejected``."""
    if allowed:
        return attempt.ok and attempt.upstream in allowed
    return attempt.outcome == "rejected"


def access_follows(line: Access, allowed: set[str]) -> bool:
    """Did the proxy decide a connection as rules allowing ``allowed`` say? Forwarded
    to one of them, or -- allowed nowhere -- denied (``no_allowed_upstream``)."""
    if allowed:
        return line.decision == "forwarded" and line.upstream_name in allowed
    return (line.decision, line.reason) == ("denied", "no_allowed_upstream")


@dataclass(frozen=True, slots=True)
class RuleChange:
    """Items sorted by when they happened relative to a rule change at ``at``: before
    (old rules apply), around (within the margin: either may), after (new rules)."""

    before: list[Any]
    around: list[Any]
    after: list[Any]
    wrong: list[Any]  # those that followed neither the rules of their period

    def per_client(self, client: str, period: str) -> list[Any]:
        items: list[Any] = getattr(self, period)
        return [i for i in items if i.client == client]


def judge_rule_change(
    attempts: Iterable[Attempt],
    old: Mapping[str, set[str]],
    new: Mapping[str, set[str]],
    *,
    at: float,
    margin: float,
) -> RuleChange:
    """Client attempts of the clients in ``old``/``new`` (request/reply ones) against
    the rules in force when each started: ``old`` before ``at - margin``, ``new`` after
    ``at + margin``, either in between."""
    return _sort_by_rule_change(
        [a for a in attempts if not a.transfer],
        old,
        new,
        at=at,
        margin=margin,
        client=lambda a: a.client,
        when=lambda a: a.start,
        follows=follows_rules,
    )


def judge_access_change(
    access: Iterable[Access],
    old: Mapping[str, set[str]],
    new: Mapping[str, set[str]],
    *,
    at: float,
    slack: float,
) -> RuleChange:
    """The proxy's decisions for the clients in ``old``/``new`` against the rules in
    force when each was taken (its admission time, on the proxy's own clock like
    ``at``). A line without an admission time (the handshake failed) is wrong."""
    return _sort_by_rule_change(
        access,
        old,
        new,
        at=at,
        margin=slack,
        client=lambda line: line.client,
        when=lambda line: line.admitted_at,
        follows=access_follows,
    )


def _sort_by_rule_change(
    items: Iterable[_Item],
    old: Mapping[str, set[str]],
    new: Mapping[str, set[str]],
    *,
    at: float,
    margin: float,
    client: Callable[[_Item], str | None],
    when: Callable[[_Item], float | None],
    follows: Callable[[_Item, set[str]], bool],
) -> RuleChange:
    """Items of the clients in both ``old`` and ``new``, sorted by when they happened
    relative to ``at`` and checked against the rules of their period (either rules
    within ``margin``). An item with no time is wrong."""
    before: list[_Item] = []
    around: list[_Item] = []
    after: list[_Item] = []
    wrong: list[_Item] = []
    for item in items:
        name = client(item)
        if name is None or name not in old or name not in new:
            continue
        was, now = old[name], new[name]
        moment = when(item)
        if moment is None:
            wrong.append(item)
            continue
        if moment < at - margin:
            before.append(item)
            ok = follows(item, was)
        elif moment > at + margin:
            after.append(item)
            ok = follows(item, now)
        else:
            around.append(item)
            ok = follows(item, was) or follows(item, now)
        if not ok:
            wrong.append(item)
    return RuleChange(before, around, after, wrong)


# --- long transfers (reload, drain) ---------------------------------------------------


def in_flight(attempts: Iterable[Attempt], at: float) -> list[Attempt]:
    """Attempts whose connection was open at ``at`` (started before, ended after)."""
    return [a for a in attempts if a.start < at < a.end]


def transfer_intact(attempt: Attempt) -> bool:
    """A transfer-mode attempt that sent everything and got it back byte-exact."""
    return (
        attempt.ok
        and attempt.match is True
        and attempt.transfer_bytes is not None
        and attempt.bytes_sent == attempt.transfer_bytes
        and attempt.bytes_received == attempt.transfer_bytes
    )


def access_for(attempt: Attempt, access: Iterable[Access], slack: float) -> list[Access]:
    """The proxy's access lines for an attempt's connection: same client identity, a
    lifetime inside the attempt's (a few milliseconds of ``slack``)."""
    return [
        line
        for line in access
        if line.client == attempt.client
        and line.start >= attempt.start - slack
        and line.ts <= attempt.end + slack
    ]


def whole_stream_forwarded(line: Access, size: int) -> bool:
    """The proxy forwarded a transfer to its end: both directions, every byte."""
    bytes_up = (line.line.record or {}).get("bytes_up")
    bytes_down = (line.line.record or {}).get("bytes_down")
    return (
        (line.decision, line.reason) == ("forwarded", "eof")
        and bytes_up == size
        and bytes_down == size
    )


@dataclass(frozen=True, slots=True)
class TransferAccount:
    checked: list[Attempt]
    broken: list[Attempt]  # not byte-exact on the client's side
    unforwarded: list[Attempt]  # no access line saying forwarded/eof with every byte

    @property
    def intact(self) -> bool:
        return bool(self.checked) and not self.broken and not self.unforwarded

    def evidence(self, access: Sequence[Access], slack: float) -> list[str]:
        lines: list[str] = []
        failed = self.broken + [a for a in self.unforwarded if a not in self.broken]
        for attempt in failed:
            lines.append(attempt.line.evidence())
            lines.extend(a.line.evidence() for a in access_for(attempt, access, slack))
        return lines


def account_transfers(
    attempts: Iterable[Attempt], access: Sequence[Access], slack: float
) -> TransferAccount:
    """Each transfer must be byte-exact for the client, and the proxy must have logged
    exactly one access line for it: forwarded to the end (``eof``), every byte."""
    checked = list(attempts)
    broken = [a for a in checked if not transfer_intact(a)]
    unforwarded = []
    for attempt in checked:
        lines = access_for(attempt, access, slack)
        size = attempt.transfer_bytes or 0
        if len(lines) != 1 or not whole_stream_forwarded(lines[0], size):
            unforwarded.append(attempt)
    return TransferAccount(checked, broken, unforwarded)


# --- drain ----------------------------------------------------------------------------


def started_between(attempts: Iterable[Attempt], low: float, high: float) -> list[Attempt]:
    return [a for a in attempts if low < a.start < high]


def accepted_after(access: Iterable[Access], at: float, slack: float) -> list[Access]:
    """Connections the proxy accepted after ``at`` (accept time = end - duration)."""
    return [line for line in access if line.start > at + slack]


def event_after(lines: Iterable[LogLine], event: str, after: float) -> LogLine | None:
    """The first ``event`` line at or after ``after``."""
    found = [line for line in lines if line.event == event and line.ts >= after]
    return min(found, key=lambda line: line.ts) if found else None


# --- upstreams ------------------------------------------------------------------------


def identity_problems(lines: Iterable[LogLine]) -> list[LogLine]:
    """Upstream ``connection`` lines that carried a client's bytes but do not name that
    client: each must have come with a PROXY v2 header (``v2-proxy``) carrying the
    client's identity, and a reply-mode message must be ``Hello from <identity>``."""
    bad: list[LogLine] = []
    for line in lines:
        rec = line.record or {}
        if line.event != "connection" or rec.get("outcome") == "empty":
            continue
        identity = rec.get("identity")
        message = rec.get("message")
        if (
            rec.get("proxy_protocol") != "v2-proxy"
            or not isinstance(identity, str)
            or not identity
            or (message is not None and message != f"Hello from {identity}")
        ):
            bad.append(line)
    return bad


# --- the chart's data ---------------------------------------------------------------


def replies_per_bin(
    attempts: Iterable[Attempt], start: float, end: float, width: float
) -> tuple[list[float], dict[str, list[int]]]:
    """Replies per upstream in bins of ``width`` seconds from ``start`` (bin starts
    relative to ``start``, and one count list per upstream)."""
    bins = max(1, math.ceil((end - start) / width))
    edges = [i * width for i in range(bins)]
    series: dict[str, list[int]] = {}
    for attempt in attempts:
        if not attempt.ok or attempt.upstream is None:
            continue
        index = int((attempt.end - start) // width)
        if 0 <= index < bins:
            series.setdefault(attempt.upstream, [0] * bins)[index] += 1
    return edges, dict(sorted(series.items()))
