"""Upstreams discovered through DNS: what one lookup of a group's name does to its
members (pure: no sockets, no clocks; ``now`` is passed in).

A group (``{discover: "tasks.upstream:8000", name: up}``) has as members the addresses
its name answers, each an upstream keyed ``ip:port`` and named ``up@ip``
(:func:`l4proxy.config.member`), so a member's name and key depend on its address only.
:func:`plan` turns (the members now, one lookup's result, now) into a
:class:`MemberChange`: who is added, who is removed, who is kept, and why. The router
applies it to the pool through the same ``reconfigure`` a reload uses, so a removed
member is retired exactly like an upstream a reload removed.

The rules:

- an answer makes the members exactly the answered addresses (duplicates and other
  spellings of one address count once);
- an empty answer (the name exists and has no A/AAAA records) removes every member;
- a failed lookup (the name does not exist, the resolver failed or timed out) changes
  nothing: the last answer's members stay, and their health checks judge them;
- an address that another upstream already has (a fixed one, or a member of another
  group) is left out and reported as ignored: one address, one upstream in the pool.

An address that comes back after it was removed is added again under the same name
and key: a new member for its health (unknown, checked at once), while connections it
still carried from before count against it again (the pool keys counts by address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from .config import Group, Upstream, member

Result = Literal["ok", "empty", "failed"]


@dataclass(frozen=True, slots=True)
class Answer:
    """The name answered with these addresses (IP literals). Empty: the name exists but
    has no A/AAAA records."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class LookupFailed:
    """No answer: the name does not exist (NXDOMAIN), or the lookup failed or timed out."""

    reason: str


Resolution = Answer | LookupFailed


@dataclass(frozen=True, slots=True)
class MemberChange:
    """What one lookup does to a group. ``kept`` + ``added`` are the members afterwards;
    ``removed`` are retired (no new connections; open ones finish)."""

    group: str
    result: Result
    reason: str
    at: float
    added: tuple[Upstream, ...] = ()
    removed: tuple[Upstream, ...] = ()
    kept: tuple[Upstream, ...] = ()
    ignored: tuple[str, ...] = ()  # answered, but not members: taken (keys) or not an IP

    @property
    def members(self) -> tuple[Upstream, ...]:
        return ordered((*self.kept, *self.added))

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def _address_order(upstream: Upstream) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(upstream.address.host)
    except ValueError:  # cannot happen for members; keeps the order total anyway
        return (9, 0, upstream.key)
    return (ip.version, int(ip), upstream.key)


def ordered(upstreams: Iterable[Upstream]) -> tuple[Upstream, ...]:
    """Members in address order (IPv4 first): the order of the pool and of log lines."""
    return tuple(sorted(upstreams, key=_address_order))


def plan(
    group: Group,
    current: Sequence[Upstream],
    resolution: Resolution,
    now: float,
    taken: Collection[str] = (),
) -> MemberChange:
    """The change one lookup makes to ``group`` whose members are ``current``.

    ``taken``: keys (``ip:port``) of upstreams outside the group; an answered address
    among them is ignored, not a member."""
    if isinstance(resolution, LookupFailed):
        return MemberChange(group.name, "failed", resolution.reason, now, kept=ordered(current))
    wanted: dict[str, Upstream] = {}
    ignored: dict[str, None] = {}
    for ip in resolution.addresses:
        try:
            found = member(group, ip)
        except ValueError:
            ignored[ip] = None
            continue
        if found.key in taken:
            ignored[found.key] = None
        else:
            wanted.setdefault(found.key, found)
    have = {u.key: u for u in current}
    result: Result = "ok" if resolution.addresses else "empty"
    return MemberChange(
        group.name,
        result,
        "answer" if resolution.addresses else "no address records",
        now,
        added=ordered(u for key, u in wanted.items() if key not in have),
        removed=ordered(u for key, u in have.items() if key not in wanted),
        kept=ordered(u for key, u in have.items() if key in wanted),
        ignored=tuple(ignored),
    )


def noteworthy(previous: MemberChange | None, change: MemberChange) -> bool:
    """Whether ``change`` gets a ``resolve`` line: the members changed, or lookups end
    differently than last time (the first lookup, a failure beginning or changing its
    reason, answers again, other addresses ignored). A lookup that repeats the last
    outcome is not logged: a name re-resolved every interval would flood the log."""
    if change.changed or previous is None:
        return True
    return (previous.result, previous.reason, previous.ignored) != (
        change.result,
        change.reason,
        change.ignored,
    )


@dataclass(slots=True)
class GroupState:
    """One configured group at run time: its members and its last lookup's change."""

    group: Group
    members: tuple[Upstream, ...] = ()
    last: MemberChange | None = None
