"""Per-identity admission: a token bucket for new connections and an optional cap on
open connections (pure; ``now`` is a monotonic time passed in by the caller)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float  # tokens added per second
    burst: int  # bucket size
    tokens: float
    updated: float  # when ``tokens`` was last brought up to date
    last_used: float

    @classmethod
    def full(cls, rate: float, burst: int, now: float) -> TokenBucket:
        return cls(rate, burst, float(burst), now, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(float(self.burst), self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        self.refill(now)
        self.last_used = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def retry_after(self) -> float:
        """Seconds until the next token (0 if one is there now)."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass(frozen=True, slots=True)
class Limited:
    reason: str  # "rate" or "max_concurrent"
    retry_after: float = 0.0


class Ticket:
    """An open-connection slot for one identity; :meth:`release` returns it once."""

    __slots__ = ("_limiter", "identity")

    def __init__(self, limiter: RateLimiter | None, identity: str) -> None:
        self._limiter = limiter
        self.identity = identity

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self.identity)


class RateLimiter:
    """Token bucket per identity plus an optional per-identity concurrency cap.

    A bucket is forgotten once it has been unused for ``cleanup_interval`` *and* would
    be full again by now, so forgetting it never hands a client extra tokens.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        cleanup_interval: float,
        max_concurrent: int = 0,
        *,
        enabled: bool = True,
    ) -> None:
        self.buckets: dict[str, TokenBucket] = {}
        self.open: dict[str, int] = {}
        self.reconfigure(rate, burst, cleanup_interval, max_concurrent, enabled=enabled)

    def admit(self, identity: str, now: float) -> Ticket | Limited:
        if self.enabled:
            bucket = self.buckets.get(identity)
            if bucket is None:
                bucket = self.buckets[identity] = TokenBucket.full(self.rate, self.burst, now)
            if not bucket.take(now):
                return Limited("rate", bucket.retry_after())
        current = self.open.get(identity, 0)
        if self.max_concurrent and current >= self.max_concurrent:
            return Limited("max_concurrent")
        self.open[identity] = current + 1
        return Ticket(self, identity)

    def reconfigure(
        self,
        rate: float,
        burst: int,
        cleanup_interval: float,
        max_concurrent: int = 0,
        *,
        enabled: bool = True,
    ) -> None:
        """New limits (a config reload). Open-connection counts stay, so tickets taken
        before still count and still release. Each bucket keeps its tokens, capped at
        the new burst: a reload never hands out extra tokens."""
        self.rate = rate
        self.burst = burst
        self.cleanup_interval = cleanup_interval
        self.max_concurrent = max_concurrent
        self.enabled = enabled
        for bucket in self.buckets.values():
            bucket.rate = rate
            bucket.burst = burst
            bucket.tokens = min(bucket.tokens, float(burst))

    def cleanup(self, now: float) -> int:
        """Forget idle buckets; returns how many were removed."""
        stale = [
            identity
            for identity, bucket in self.buckets.items()
            if now - bucket.last_used >= self.cleanup_interval
            and bucket.tokens + (now - bucket.updated) * bucket.rate >= bucket.burst
        ]
        for identity in stale:
            del self.buckets[identity]
        return len(stale)

    def _release(self, identity: str) -> None:
        left = self.open[identity] - 1
        if left < 0:
            raise RuntimeError(f"open connection count of {identity!r} would go negative")
        if left:
            self.open[identity] = left
        else:
            del self.open[identity]
