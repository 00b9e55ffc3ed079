"""Which peers may send PROXY protocol headers (``--trusted-proxy``), pure.

A PROXY header carries the client's address and identity; an upstream that believes it
from anyone lets anyone claim to be anyone. With ``--trusted-proxy`` entries (CIDRs,
addresses or host names) only connections from those peers are served; the rest end at
once with the outcome ``untrusted_proxy``. Loopback peers (the upstream's own host or
container, e.g. its health check) are always trusted.

Names are resolved by the shell (:mod:`upstream.server`) on demand: the proxy usually
starts after its upstreams, so its name cannot be looked up at start-up. A peer that
matches nothing is judged only against a look-up that started after it connected (it
waits, reading paused, until one has finished): a peer is never refused because of an
answer older than itself, which is what a new proxy (or a new upstream task on a swarm,
whose first look-ups can miss) would otherwise meet. Look-ups start at most once per
``refresh_interval``, so peers that match nothing cost one look-up per interval, not one
each. A name whose look-up failed (timeout, server failure) keeps its last answer; a
name that does not exist (any more) trusts nobody. Time comes in as a parameter.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Verdict = Literal["trusted", "untrusted", "resolve"]

REFRESH_INTERVAL = 1.0  # seconds between two look-ups of the trusted names
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*$")


class TrustError(ValueError):
    """A ``--trusted-proxy`` entry is neither an address, a CIDR nor a host name."""


@dataclass(frozen=True, slots=True)
class TrustSpec:
    networks: tuple[Network, ...] = ()
    names: tuple[str, ...] = ()
    loopback: bool = True  # the host's (container's) own loopback, e.g. its health check

    @property
    def enabled(self) -> bool:
        return bool(self.networks or self.names)

    def describe(self) -> list[str]:
        return [str(n) for n in self.networks] + list(self.names)


def parse_trusted(entries: Sequence[str], *, loopback: bool = True) -> TrustSpec:
    """``["10.0.0.0/24", "10.1.2.3", "proxy"]`` -> a :class:`TrustSpec`."""
    networks: list[Network] = []
    names: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        if not _HOSTNAME.match(entry) or entry.replace(".", "").isdigit():
            raise TrustError(f"expected an address, a CIDR or a host name, got {raw!r}")
        names.append(entry.lower())
    return TrustSpec(tuple(networks), tuple(dict.fromkeys(names)), loopback)


def peer_address(text: str) -> Address | None:
    """The peer's IP (an IPv4-mapped IPv6 address becomes IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass
class TrustedPeers:
    """The trusted peers and what their names resolved to last."""

    spec: TrustSpec
    refresh_interval: float = REFRESH_INTERVAL
    by_name: dict[str, frozenset[Address]] = field(default_factory=dict)
    resolved: frozenset[Address] = field(default_factory=frozenset)
    resolved_at: float | None = None  # when the look-up behind ``resolved`` started

    @property
    def enabled(self) -> bool:
        return self.spec.enabled

    def verdict(self, peer: str, arrived: float) -> Verdict:
        """``trusted``, ``untrusted``, or ``resolve``: wait for a look-up that starts at
        ``arrived`` or later (:meth:`lookup_delay` says when one may), then ask again."""
        address = peer_address(peer)
        if address is None:
            return "untrusted"
        if address.is_loopback and self.spec.loopback:
            return "trusted"
        if any(address in network for network in self.spec.networks):
            return "trusted"
        if address in self.resolved:
            return "trusted"
        if self.spec.names and (self.resolved_at is None or self.resolved_at < arrived):
            return "resolve"
        return "untrusted"

    def lookup_delay(self, now: float) -> float:
        """How long until the next look-up may start (0: now)."""
        if self.resolved_at is None:
            return 0.0
        return max(0.0, self.resolved_at + self.refresh_interval - now)

    def update(self, answers: Mapping[str, Iterable[str] | None], started: float) -> bool:
        """A look-up of the names that started at ``started``: each name's addresses, or
        None where its look-up failed (its last answer stays). True if the trusted
        addresses changed."""
        before = self.resolved
        for name in self.spec.names:
            addresses = answers.get(name)
            if addresses is None:
                continue
            found = {peer_address(a) for a in addresses}
            self.by_name[name] = frozenset(a for a in found if a is not None)
        self.resolved = frozenset().union(*self.by_name.values())
        self.resolved_at = started
        return self.resolved != before
