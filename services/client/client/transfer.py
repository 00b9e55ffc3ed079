"""Transfer mode's pure parts: the payload, its pacing, and the check of its echo.

The payload of an attempt is a deterministic pseudo-random byte stream seeded by the
client's id and the attempt number, cut into :data:`CHUNK`-byte chunks; chunk ``i`` is
``random.Random(f"{seed}/{i}").randbytes(CHUNK)`` (the last one cut short), so any
part of it can be produced again from its offset without keeping what was sent.
No I/O and no clocks here: times are passed in.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

CHUNK = 16 * 1024  # bytes per write (one TLS record) and per pacing step


def payload_seed(client_id: str, attempt: int) -> str:
    """The seed of one attempt's payload: the same id and number give the same bytes."""
    return f"{client_id}#{attempt}"


def chunk_count(total: int) -> int:
    return math.ceil(total / CHUNK)


def chunk(seed: str, index: int, total: int) -> bytes:
    """Chunk ``index`` of the ``total``-byte payload seeded by ``seed``."""
    size = min(CHUNK, total - index * CHUNK)
    if size <= 0:
        return b""
    rng = random.Random(f"{seed}/{index}")  # noqa: S311 - test data, not a secret
    return rng.randbytes(CHUNK)[:size]


def payload(seed: str, total: int) -> bytes:
    """The whole payload at once (for tests; the client streams it chunk by chunk)."""
    return b"".join(chunk(seed, i, total) for i in range(chunk_count(total)))


def due(index: int, total: int, duration: float) -> float:
    """Seconds after the start of the transfer at which chunk ``index`` is sent: evenly
    spaced so that the last chunk leaves at about ``duration`` (0: all at once)."""
    count = chunk_count(total)
    if duration <= 0 or count <= 1:
        return 0.0
    return duration * index / (count - 1)


class Sender:
    """What has been sent so far: the count and the SHA-256 of the bytes."""

    def __init__(self, seed: str, total: int) -> None:
        self.seed = seed
        self.total = total
        self.sent = 0
        self._hash = hashlib.sha256()

    def chunks(self) -> Iterator[tuple[int, bytes]]:
        """``(index, bytes)`` of every chunk, in order."""
        for index in range(chunk_count(self.total)):
            yield index, chunk(self.seed, index, self.total)

    def sent_ok(self, data: bytes) -> None:
        """``data`` (the next chunk) has been handed to the connection."""
        self.sent += len(data)
        self._hash.update(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


class EchoCheck:
    """Compares the echo with the payload as it arrives: counts the bytes, hashes them
    and finds the first byte that differs (or the first one beyond the payload)."""

    def __init__(self, seed: str, total: int) -> None:
        self.seed = seed
        self.total = total
        self.received = 0
        self.mismatch_at: int | None = None
        self._hash = hashlib.sha256()
        self._index = -1
        self._expected = b""

    def _chunk(self, index: int) -> bytes:
        if index != self._index:
            self._index = index
            self._expected = chunk(self.seed, index, self.total)
        return self._expected

    def feed(self, data: bytes) -> None:
        self._hash.update(data)
        if self.mismatch_at is None:
            self.mismatch_at = self._first_difference(data)
        self.received += len(data)

    def _first_difference(self, data: bytes) -> int | None:
        pos = 0
        while pos < len(data):
            offset = self.received + pos
            if offset >= self.total:
                return offset  # more bytes than were sent
            index, within = divmod(offset, CHUNK)
            expected = self._chunk(index)
            size = min(len(data) - pos, len(expected) - within)
            got = data[pos : pos + size]
            want = expected[within : within + size]
            if got != want:
                return offset + next(i for i in range(size) if got[i] != want[i])
            pos += size
        return None

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True, slots=True)
class Progress:
    """How far a transfer got, for the classifier and the log line."""

    planned: int  # --transfer-bytes
    sent: int  # bytes handed to the connection
    received: int  # bytes of echo read
    sha256_sent: str
    sha256_received: str
    mismatch_at: int | None = None  # the first echoed byte that differs from the payload
    end: str | None = None  # how the echo ended: close_notify | tcp_eof | None (it did not)

    @property
    def match(self) -> bool:
        """The echo equals what was sent: same length, same SHA-256, no differing byte."""
        return (
            self.mismatch_at is None
            and self.received == self.sent
            and self.sha256_received == self.sha256_sent
        )

    @property
    def complete(self) -> bool:
        """Every planned byte was sent and came back unchanged."""
        return self.match and self.sent == self.planned


def progress(sender: Sender, check: EchoCheck, end: str | None) -> Progress:
    return Progress(
        planned=sender.total,
        sent=sender.sent,
        received=check.received,
        sha256_sent=sender.sha256,
        sha256_received=check.sha256,
        mismatch_at=check.mismatch_at,
        end=end,
    )
