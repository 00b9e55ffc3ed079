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
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from .config import Address

# host, port -> the first address found (an IP literal)
Lookup = Callable[[str, int], Awaitable[str]]
GONE = {socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)}


def is_ip(host: str) -> bool:
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
        self.pending: dict[Address, asyncio.Future[str]] = {}
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
        """The running lookup for ``address``, or a new one."""
        running = self.pending.get(address)
        if running is not None and not running.done():
            return running
        task = self.loop.create_task(self._refresh(address), name=f"resolve-{address}")
        self.pending[address] = task
        task.add_done_callback(_retrieve)
        return task

    async def _refresh(self, address: Address) -> str:
        try:
            found = await self.lookup(address.host, address.port)
        except socket.gaierror as exc:
            if exc.errno in GONE and self.addresses.pop(address, None) is not None:
                self.changed(address, None)
            raise
        if self.addresses.get(address) != found:
            self.addresses[address] = found
            self.changed(address, found)
        return found

    async def _getaddrinfo(self, host: str, port: int) -> str:
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, f"{host}: no address")
        return str(infos[0][4][0])

    def cancel(self) -> None:
        for task in self.pending.values():
            task.cancel()
        self.pending.clear()


def _retrieve(task: asyncio.Future[str]) -> None:
    """A failed lookup nobody awaited (the cache answered) is not an unhandled error:
    the health check that needs it sees the failure through its own await."""
    if not task.cancelled():
        with contextlib.suppress(Exception):
            task.exception()
