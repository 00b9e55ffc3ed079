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


class Rotation:
    """Where rotation stands, one cursor per candidate set: clients whose rules allow
    them different upstreams each rotate through their own. With one cursor for all, a
    client was sent to the first of its upstreams whenever others had moved the cursor
    past its range: with 24 upstreams and six rule classes, the first upstream of a
    class got 190 times the picks of its last, and some were never picked at all."""

    LIMIT = 4096  # candidate sets remembered (rules x health states); then start afresh

    def __init__(self, size: int) -> None:
        self._size = size
        self._cursors: dict[tuple[int, ...], int] = {}

    def next(self, candidates: Sequence[int], among: Sequence[int]) -> int:
        """The member of ``among`` (a subset of ``candidates``) that comes first from
        where ``candidates``' rotation stands; the rotation moves past it."""
        key = tuple(candidates)
        chosen = _first_from(among, self._cursors.get(key, 0), self._size)
        if key not in self._cursors and len(self._cursors) >= self.LIMIT:
            self._cursors.clear()
        self._cursors[key] = (chosen + 1) % self._size
        return chosen


class LeastConnections:
    """Fewest active connections; ties go to the next upstream after the last pick
    among the same candidates, so equal load rotates through them instead of always
    landing on the first."""

    def __init__(self, size: int) -> None:
        self._rotation = Rotation(size)

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        fewest = min(active[i] for i in candidates)
        tied = [i for i in candidates if active[i] == fewest]
        return self._rotation.next(candidates, tied)


class RoundRobin:
    """The next candidate after the last pick among the same candidates."""

    def __init__(self, size: int) -> None:
        self._rotation = Rotation(size)

    def choose(self, candidates: Sequence[int], active: Sequence[int], key: str) -> int:
        return self._rotation.next(candidates, candidates)


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
    """A reserved slot; :meth:`release` gives it back exactly once.

    The lease remembers its upstream and the pool generation it was taken in, so it
    finds its slot again after :meth:`UpstreamPool.reconfigure` moved or removed it."""

    __slots__ = ("_pool", "generation", "index", "upstream")

    def __init__(self, pool: UpstreamPool, index: int) -> None:
        self._pool: UpstreamPool | None = pool
        self.index = index  # in the pool as it was at ``generation``
        self.generation = pool.generation
        self.upstream = pool.upstreams[index]

    @property
    def released(self) -> bool:
        return self._pool is None

    def release(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool._release(self)


@dataclass(frozen=True, slots=True)
class NoUpstream:
    reason: str


class UpstreamPool:
    """The upstreams, each one's active-connection count and health machine.

    :meth:`reconfigure` swaps in a new upstream list (a config reload): an upstream that
    stays, keyed by its address, keeps its count and health; a removed one is *retired*
    (no new picks) until its last lease is released; a new one starts UNKNOWN. Members of
    discovered groups come and go through :meth:`reconfigure` too, so the pool may be
    empty for a while (a group whose name has not answered yet): it then picks nothing."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        strategy: Strategy,
        *,
        rise: int = 1,
        fall: int = 1,
    ) -> None:
        self.upstreams = tuple(upstreams)
        self.strategy = strategy
        self.health = [HealthMachine(rise, fall) for _ in upstreams]
        self.active = [0] * len(upstreams)
        self.generation = 0
        self.retired: dict[str, int] = {}  # removed upstream key -> leases still open
        self._index = {u.key: i for i, u in enumerate(self.upstreams)}

    def index_of(self, key: str) -> int | None:
        return self._index.get(key)

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
        return sum(self.active) + sum(self.retired.values())

    def health_of(self, lease: Lease) -> HealthMachine | None:
        """The health machine of the lease's upstream, if it is still in the pool."""
        index = self._current_index(lease)
        return None if index is None else self.health[index]

    def reconfigure(
        self, upstreams: Sequence[Upstream], strategy: Strategy, *, rise: int, fall: int
    ) -> None:
        counts = dict(self.retired)
        machines: dict[str, HealthMachine] = {}
        for i, upstream in enumerate(self.upstreams):
            counts[upstream.key] = self.active[i]
            machines[upstream.key] = self.health[i]
        self.upstreams = tuple(upstreams)
        self.strategy = strategy
        self._index = {u.key: i for i, u in enumerate(self.upstreams)}
        self.active = [counts.pop(u.key, 0) for u in self.upstreams]
        self.health = []
        for upstream in self.upstreams:
            machine = machines.get(upstream.key) or HealthMachine(rise, fall)
            machine.rise, machine.fall = rise, fall
            self.health.append(machine)
        self.retired = {key: count for key, count in counts.items() if count > 0}
        self.generation += 1

    def _current_index(self, lease: Lease) -> int | None:
        if lease.generation == self.generation:
            return lease.index
        return self._index.get(lease.upstream.key)

    def _release(self, lease: Lease) -> None:
        index = self._current_index(lease)
        if index is None:
            key = lease.upstream.key
            left = self.retired.get(key, 0) - 1
            if left < 0:
                raise RuntimeError(f"active count of retired upstream {key} would go negative")
            if left:
                self.retired[key] = left
            else:
                del self.retired[key]
            return
        if self.active[index] <= 0:
            raise RuntimeError(f"active count of upstream {index} would go negative")
        self.active[index] -= 1
