"""Frames between the supervisor and its workers (pure): a 4-byte length, then a pickle.

The channel is a socketpair the supervisor makes and hands to the worker it starts
(inherited file descriptors, never a path or a port), so both ends are the same program
in the same trust domain: pickle carries configs, upstreams and counters as they are.
Messages are tuples whose first item names the kind; a reply is ``("r", value)`` and
answers the oldest request still open in that direction (each side answers in order).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a config or a counters snapshot; far above either


class FrameError(ValueError):
    """A frame longer than :data:`MAX_FRAME`: the stream is not ours, or is corrupt."""


def encode(message: tuple[Any, ...]) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if len(body) > MAX_FRAME:
        raise FrameError(f"a {message[0]!r} message of {len(body)} bytes is too long")
    return HEADER.pack(len(body)) + body


class Decoder:
    """Bytes in, whole messages out, whatever the chunking."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        buffer = self._buffer
        buffer += data
        messages: list[tuple[Any, ...]] = []
        start = 0
        end = len(buffer)
        while end - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME:
                raise FrameError(f"a frame of {size} bytes announced; at most {MAX_FRAME}")
            if end - start - HEADER.size < size:
                break
            body = start + HEADER.size
            # Our own child or parent over an inherited socketpair (see the docstring).
            messages.append(pickle.loads(buffer[body : body + size]))  # noqa: S301
            start = body + size
        if start:
            del buffer[:start]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of a message not yet whole."""
        return len(self._buffer)
