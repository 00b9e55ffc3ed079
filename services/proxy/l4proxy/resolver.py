"""Upstream name resolution, kept off the dial path.

A dial goes to the address the last lookup found, so a client connection never waits
for DNS. Lookups are started by the health checks, at most one at a time per name.
Why: lookups run on libuv's small worker-thread pool, and a resolver that hangs (Docker's
embedded DNS takes about 10 s to give up on the name of a stopped container) would
otherwise tie up every worker, and with them every dial to every healthy upstream. Now
a hanging name holds one worker, and nothing waits for it but its own health check.

An address stays in use while lookups fail for a temporary reason (a timeout, a
resolver that cannot be reached); a name that no longer exists drops it, so a stale
address that the network may hand to someone else is not dialled for long.

A lookup finds every address of a name. A named upstream uses the first (``resolve``,
``cached``); a discovered group uses them all (:meth:`Resolver.resolution`), as a value
for :func:`l4proxy.discovery.plan`. Both share the one lookup in flight per name.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence

from .config import Address
from .connection import describe_os_error
from .discovery import Answer, LookupFailed, Resolution

# host, port -> every address found (IP literals), in the order the system gives them
Lookup = Callable[[str, int], Awaitable[Sequence[str]]]
# The name exists but has no address (A/AAAA) records.
NODATA = getattr(socket, "EAI_NODATA", None)
GONE = {socket.EAI_NONAME, NODATA if NODATA is not None else socket.EAI_NONAME}


@functools.lru_cache(maxsize=256)
def is_ip(host: str) -> bool:
    """Is ``host`` an IP literal (every dial asks, so the answer is kept)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class Resolver:
    def __init__(self, loop: asyncio.AbstractEventLoop, lookup: Lookup | None = None) -> None:
        self.loop = loop
        self.lookup: Lookup = lookup or self._getaddrinfo
        self.addresses: dict[Address, str] = {}
        self.pending: dict[Address, asyncio.Future[str]] = {}  # refresh(): the first address
        self.lookups: dict[Address, asyncio.Future[tuple[str, ...]]] = {}  # every address
        self.changed: Callable[[Address, str | None], None] = lambda _address, _ip: None

    def cached(self, address: Address) -> str | None:
        """The IP to dial for ``address`` without a lookup, if one is known."""
        if is_ip(address.host):
            return address.host
        return self.addresses.get(address)

    async def resolve(self, address: Address) -> str:
        """The IP to connect to now. Starts a lookup (unless one is running) so the
        cache follows DNS changes, but answers from the cache when it can; only a name
        never resolved yet waits for its lookup. Raises ``OSError`` if that fails."""
        if is_ip(address.host):
            return address.host
        lookup = self.refresh(address)
        known = self.addresses.get(address)
        if known is not None:
            return known
        # Shielded: a caller's timeout must not cancel the lookup the next check shares.
        return await asyncio.shield(lookup)

    def refresh(self, address: Address) -> asyncio.Future[str]:
        """The running refresh of ``address``'s first IP, or a new one."""
        running = self.pending.get(address)
        if running is not None and not running.done():
            return running
        task = self.loop.create_task(self._refresh(address), name=f"resolve-{address}")
        self.pending[address] = task
        task.add_done_callback(_retrieve)
        return task

    def lookup_all(self, address: Address) -> asyncio.Future[tuple[str, ...]]:
        """The running lookup of every address of ``address``'s name, or a new one (one
        in flight per name, whoever asks)."""
        running = self.lookups.get(address)
        if running is not None and not running.done():
            return running
        task = self.loop.create_task(self._lookup(address), name=f"lookup-{address}")
        self.lookups[address] = task
        task.add_done_callback(_retrieve)
        return task

    async def _lookup(self, address: Address) -> tuple[str, ...]:
        found = await self.lookup(address.host, address.port)
        return tuple(dict.fromkeys(str(ip) for ip in found))  # each address once, in order

    async def _refresh(self, address: Address) -> str:
        try:
            # Shielded: the lookup may be shared with a group's resolution.
            found = await asyncio.shield(self.lookup_all(address))
        except socket.gaierror as exc:
            if exc.errno in GONE:
                self._forget(address)
            raise
        if not found:
            self._forget(address)
            raise socket.gaierror(socket.EAI_NONAME, f"{address.host}: no address")
        first = found[0]
        if self.addresses.get(address) != first:
            self.addresses[address] = first
            self.changed(address, first)
        return first

    def _forget(self, address: Address) -> None:
        """The name is gone: its address is not dialled any more."""
        if self.addresses.pop(address, None) is not None:
            self.changed(address, None)

    async def resolution(self, address: Address) -> Resolution:
        """Every address ``address``'s name has now, as a value: an :class:`Answer`
        (empty when the name exists without address records: ``EAI_NODATA``, or an
        empty list from the lookup) or :class:`LookupFailed` (the name does not exist,
        the resolver failed or timed out). Waits for the lookup in flight, if any."""
        if is_ip(address.host):
            return Answer((address.host,))
        try:
            found = await asyncio.shield(self.lookup_all(address))
        except socket.gaierror as exc:
            if NODATA is not None and exc.errno == NODATA:
                return Answer(())
            return LookupFailed(describe_os_error(exc))
        except OSError as exc:  # TimeoutError included
            return LookupFailed(describe_os_error(exc))
        return Answer(found)

    async def _getaddrinfo(self, host: str, port: int) -> list[str]:
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [str(info[4][0]) for info in infos]

    def cancel(self) -> None:
        for task in self.pending.values():
            task.cancel()
        for lookup in self.lookups.values():
            lookup.cancel()
        self.pending.clear()
        self.lookups.clear()


def _retrieve(task: asyncio.Future[str] | asyncio.Future[tuple[str, ...]]) -> None:
    """A failed lookup nobody awaited (the cache answered) is not an unhandled error:
    the health check that needs it sees the failure through its own await."""
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
