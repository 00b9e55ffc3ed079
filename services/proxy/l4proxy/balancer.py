"""Upstream pool and balancing strategies (pure: no sockets, no clocks, no asyncio).

The pool owns each upstream's active-connection count and health machine. A pick
reserves a slot at once (the count goes up before any dial starts), so concurrent
connections see each other's choices; the returned :class:`Lease` gives the slot back
exactly once, whatever path the connection ends on.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .config import BalancerName, Upstream
from .health import HealthMachine


class Strategy(Protocol):
    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        """Pick one index out of ``candidates`` (non-empty, ascending pool indices)."""
        ...


def _first_from(candidates: Sequence[int], start: int, size: int) -> int:
    """The candidate that comes first when walking the pool from ``start``, wrapping."""
    return min(candidates, key=lambda i: (i - start) % size)


class LeastConnections:
    """Fewest active connections; ties go to the next upstream after the last pick,
    so equal load rotates through the pool instead of always landing on the first."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._cursor = 0

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        fewest = min(active[i] for i in candidates)
        tied = [i for i in candidates if active[i] == fewest]
        chosen = tied[0] if len(tied) == 1 else _first_from(tied, self._cursor, self._size)
        self._cursor = (chosen + 1) % self._size
        return chosen


class RoundRobin:
    def __init__(self, size: int) -> None:
        self._size = size
        self._cursor = 0

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        chosen = _first_from(candidates, self._cursor, self._size)
        self._cursor = (chosen + 1) % self._size
        return chosen


class PowerOfTwo:
    """Two random choices, keep the less loaded (ties: the first drawn)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return b if active[b] < active[a] else a


class ConsistentHash:
    """Rendezvous (highest random weight) hashing on the client identity: a client keeps
    its upstream while that upstream is eligible, and when one upstream leaves only the
    clients that were on it move."""

    def __init__(self, upstreams: Sequence[Upstream]) -> None:
        self._labels = [u.key.encode() for u in upstreams]

    def _score(self, key: bytes, index: int) -> bytes:
        return hashlib.blake2b(key + b"\0" + self._labels[index], digest_size=8).digest()

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        raw = key.encode()
        return max(candidates, key=lambda i: self._score(raw, i))


def make_strategy(
    name: BalancerName, upstreams: Sequence[Upstream], rng: random.Random | None = None
) -> Strategy:
    if name == "least_connections":
        return LeastConnections(len(upstreams))
    if name == "round_robin":
        return RoundRobin(len(upstreams))
    if name == "power_of_two":
        return PowerOfTwo(rng or random.Random())  # noqa: S311 - load spreading, not crypto
    if name == "consistent_hash":
        return ConsistentHash(upstreams)
    raise ValueError(f"unknown balancer {name!r}")


class Lease:
    """A reserved slot; :meth:`release` gives it back exactly once."""

    __slots__ = ("_pool", "index")

    def __init__(self, pool: UpstreamPool, index: int) -> None:
        self._pool: UpstreamPool | None = pool
        self.index = index

    @property
    def upstream(self) -> Upstream:
        return self._pool_or_raise().upstreams[self.index]

    @property
    def released(self) -> bool:
        return self._pool is None

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._release(self.index)

    def _pool_or_raise(self) -> UpstreamPool:
        if self._pool is None:
            raise RuntimeError("lease already released")
        return self._pool


@dataclass(frozen=True, slots=True)
class NoUpstream:
    reason: str


class UpstreamPool:
    def __init__(
        self,
        upstreams: Sequence[Upstream],
        strategy: Strategy,
        *,
        rise: int = 1,
        fall: int = 1,
    ) -> None:
        if not upstreams:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = tuple(upstreams)
        self.strategy = strategy
        self.health = [HealthMachine(rise, fall) for _ in upstreams]
        self.active = [0] * len(upstreams)

    def eligible(self, allowed: Sequence[int], exclude: Sequence[int] = ()) -> list[int]:
        return [i for i in allowed if i not in exclude and self.health[i].eligible]

    def pick(
        self, allowed: Sequence[int], key: str, exclude: Sequence[int] = ()
    ) -> Lease | NoUpstream:
        """Choose among the allowed, healthy upstreams not in ``exclude`` and reserve a slot."""
        candidates = self.eligible(allowed, exclude)
        if not candidates:
            return NoUpstream("no_healthy_upstream")
        index = self.strategy.choose(candidates, self.active, key)
        self.active[index] += 1
        return Lease(self, index)

    def total_active(self) -> int:
        return sum(self.active)

    def _release(self, index: int) -> None:
        if self.active[index] <= 0:
            raise RuntimeError(f"active count of upstream {index} would go negative")
        self.active[index] -= 1
