"""Taking in what a listener has queued before it closes.

Closing a listening socket resets every connection the kernel has already completed on
it but the program has not accepted yet (the listen backlog). Their clients connected
before the stop began, and a proxy that dialed a moment before would lose its client's
request without a reply. A graceful stop therefore accepts what is queued, serves it
like the connections already open, and only then closes the listener."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable


async def adopt_queued(
    loop: asyncio.AbstractEventLoop,
    server: asyncio.Server,
    factory: Callable[[], asyncio.BaseProtocol],
) -> None:
    """Accept every connection queued on ``server``'s sockets now, each with a protocol
    from ``factory``, as the server itself would. Whatever
    arrives after this returns is reset by the close that follows: the window is that of
    one call, not of the whole backlog."""
    for listener in server.sockets:
        # A second descriptor for the listening socket: the loop keeps polling its own.
        queued = socket.socket(fileno=os.dup(listener.fileno()))
        try:
            queued.setblocking(False)
            while True:
                try:
                    conn, _ = queued.accept()
                except OSError:  # BlockingIOError: nothing more is queued
                    break
                await loop.connect_accepted_socket(factory, conn)
        finally:
            queued.close()
