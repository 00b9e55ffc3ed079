"""One end of the supervisor-worker socketpair, on the event loop (``workers: N``).

Frames are :mod:`~l4proxy.ipc`'s. What one loop iteration sends goes in one write
(under load, several connections' messages share a system call). A request's answer
is given to its callback: each side answers in the order it was asked, so no ids are
needed. If the channel is lost, every open request is answered ``None``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from .ipc import Decoder, FrameError, encode

Message = tuple[Any, ...]


class Channel(asyncio.Protocol):
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[Message], None],
        on_lost: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.on_message = on_message
        self.on_lost = on_lost
        self.decoder = Decoder()
        self.waiting: deque[Callable[[Any], None]] = deque()
        self.outbox: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send(self, message: Message) -> None:
        if self.lost:
            return
        if not self.outbox:
            self.loop.call_soon(self.flush)
        self.outbox.append(encode(message))

    def request(self, message: Message, answer: Callable[[Any], None]) -> None:
        """Send ``message``; ``answer`` gets the other side's reply (None if lost)."""
        if self.lost:
            answer(None)
            return
        self.waiting.append(answer)
        self.send(message)

    def reply(self, value: object) -> None:
        self.send(("r", value))

    def flush(self) -> None:
        if not self.outbox:
            return
        data = b"".join(self.outbox)
        self.outbox.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.decoder.feed(data)
        except FrameError:
            if self.transport is not None:
                self.transport.abort()  # connection_lost follows
            return
        for message in messages:
            if message[0] == "r":
                self.waiting.popleft()(message[1])
            else:
                self.on_message(message)

    def eof_received(self) -> bool:
        return False  # the other side is gone: close ours

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        waiting, self.waiting = self.waiting, deque()
        for answer in waiting:
            answer(None)
        self.on_lost()

    def close(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()
