"""What the proxy counts, as plain numbers (pure), and its Prometheus exposition.

The data path only does dictionary increments, once per connection (when its access
line is written) and once per health check; the metric families are built from these
numbers when ``/metrics`` is scraped, so a scrape costs the proxy nothing in between.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from dataclasses import dataclass, field

# Health-check latency buckets, in seconds: a TCP connect on a LAN up to a slow timeout.
CHECK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Client identities become metric labels; past this many, the rest share one label so a
# flood of distinct certificates cannot grow the exposition without bound.
MAX_CLIENT_LABELS = 1000
OTHER_CLIENTS = "_other"


@dataclass(slots=True)
class Histogram:
    """Cumulative-bucket histogram of observations (Prometheus semantics)."""

    bounds: tuple[float, ...] = CHECK_BUCKETS
    counts: list[int] = field(default_factory=list)  # per bound, non-cumulative; +1 for +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs, each count including every smaller bucket, ending +Inf."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == math.inf else repr(bound), float(running)))
        return out


@dataclass(slots=True)
class CheckStats:
    """One upstream's active checks."""

    ok: int = 0
    failed: int = 0
    latency: Histogram = field(default_factory=Histogram)
    last_ok: bool | None = None
    last_reason: str = "not checked yet"
    last_at: float | None = None  # wall-clock (Unix) time of the last result
    last_latency: float | None = None


@dataclass(slots=True)
class LookupStats:
    """One discovered group's lookups."""

    results: Counter[str] = field(default_factory=Counter)  # "ok" | "empty" | "failed"
    last_result: str | None = None
    last_reason: str = "not looked up yet"
    last_at: float | None = None  # wall-clock (Unix) time of the last result


class Stats:
    """Counters of everything that has happened since start (never reset by a reload)."""

    def __init__(self) -> None:
        self.accepted = 0
        self.closed: Counter[str] = Counter()  # by access-log decision
        self.closes: Counter[str] = Counter()  # by how the socket ended (access "close")
        self.handshake_failures: Counter[str] = Counter()  # by reason
        self.rate_limited: Counter[tuple[str, str]] = Counter()  # (client, reason)
        self.denied: Counter[str] = Counter()  # by client
        self.dial_failures: Counter[tuple[str, str]] = Counter()  # (upstream, reason)
        self.bytes_closed: Counter[tuple[str, str]] = Counter()  # (upstream, "up"|"down")
        self.forwarded: Counter[str] = Counter()  # ended forwarded connections by upstream
        self.checks: dict[str, CheckStats] = {}  # by upstream key
        self.reloads: Counter[str] = Counter()  # "ok" | "error"
        self.lookups: dict[str, LookupStats] = {}  # by discovered group name
        self._clients: set[str] = set()

    # What a worker counts (its connections); the rest is the supervisor's own.
    CONNECTION_COUNTS = (
        "closed",
        "closes",
        "handshake_failures",
        "rate_limited",
        "denied",
        "dial_failures",
        "bytes_closed",
        "forwarded",
    )

    def absorb(self, other: Stats) -> None:
        """Add ``other``'s connection counts to these (``workers: N``: the proxy's
        counters are the sum of its workers')."""
        self.accepted += other.accepted
        for name in self.CONNECTION_COUNTS:
            counts: Counter[object] = getattr(self, name)
            counts.update(getattr(other, name))

    def client_label(self, identity: str | None) -> str:
        if identity is None:
            return "-"
        if identity in self._clients:
            return identity
        if len(self._clients) < MAX_CLIENT_LABELS:
            self._clients.add(identity)
            return identity
        return OTHER_CLIENTS

    def connection_closed(
        self,
        decision: str,
        reason: str,
        *,
        identity: str | None,
        upstream: str | None,
        bytes_up: int,
        bytes_down: int,
        close: str = "graceful",
    ) -> None:
        """One access-log line's worth of counting."""
        self.closed[decision] += 1
        self.closes[close] += 1
        if decision == "forwarded":
            if upstream is not None:
                self.forwarded[upstream] += 1
                self.bytes_closed[upstream, "up"] += bytes_up
                self.bytes_closed[upstream, "down"] += bytes_down
        elif decision == "tls_failed":
            self.handshake_failures[reason] += 1
        elif decision == "handshake_timeout":
            self.handshake_failures["timeout"] += 1
        elif decision == "rate_limited":
            self.rate_limited[self.client_label(identity), reason] += 1
        elif decision == "denied":
            self.denied[self.client_label(identity)] += 1

    def check_done(
        self, upstream: str, *, ok: bool, reason: str, latency: float, wall_time: float
    ) -> None:
        stats = self.checks.get(upstream)
        if stats is None:
            stats = self.checks[upstream] = CheckStats()
        if ok:
            stats.ok += 1
        else:
            stats.failed += 1
        stats.latency.observe(latency)
        stats.last_ok = ok
        stats.last_reason = reason
        stats.last_at = wall_time
        stats.last_latency = latency

    def lookup_done(self, group: str, *, result: str, reason: str, wall_time: float) -> None:
        stats = self.lookups.get(group)
        if stats is None:
            stats = self.lookups[group] = LookupStats()
        stats.results[result] += 1
        stats.last_result = result
        stats.last_reason = reason
        stats.last_at = wall_time
