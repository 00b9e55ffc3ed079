"""The client's transfer mode, pure parts: payload, pacing, echo check, outcomes."""

from __future__ import annotations

import hashlib
import itertools
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client import config as client_config
from client import decide
from client import transfer as tr

SEED = tr.payload_seed("client.b", 3)


def test_payload_is_deterministic_per_client_and_attempt() -> None:
    size = 3 * tr.CHUNK + 123
    data = tr.payload(SEED, size)
    assert len(data) == size
    assert data == tr.payload(tr.payload_seed("client.b", 3), size)
    assert data != tr.payload(tr.payload_seed("client.b", 4), size)
    assert data != tr.payload(tr.payload_seed("client.c", 3), size)
    # A shorter payload is a prefix of a longer one with the same seed.
    assert tr.payload(SEED, 1000) == data[:1000]
    assert [len(tr.chunk(SEED, i, size)) for i in range(5)] == [tr.CHUNK] * 3 + [123, 0]


def test_sender_counts_and_hashes_what_was_sent() -> None:
    size = 2 * tr.CHUNK + 7
    sender = tr.Sender(SEED, size)
    chunks = list(sender.chunks())
    assert [i for i, _ in chunks] == [0, 1, 2]
    for _, data in chunks:
        sender.sent_ok(data)
    assert sender.sent == size
    assert sender.sha256 == hashlib.sha256(tr.payload(SEED, size)).hexdigest()


def test_pacing_spreads_the_chunks_over_the_duration() -> None:
    size = 11 * tr.CHUNK  # 11 chunks: 10 gaps
    times = [tr.due(i, size, 5.0) for i in range(11)]
    assert times[0] == 0.0
    assert times[-1] == pytest.approx(5.0)
    assert all(b - a == pytest.approx(0.5) for a, b in itertools.pairwise(times))
    assert tr.due(3, size, 0.0) == 0.0  # no --transfer-time: as fast as possible
    assert tr.due(0, 10, 5.0) == 0.0  # a single chunk


@given(
    size=st.integers(min_value=1, max_value=3 * tr.CHUNK),
    cuts=st.lists(st.integers(min_value=0, max_value=3 * tr.CHUNK), max_size=6),
)
def test_an_exact_echo_matches_however_it_is_split(size: int, cuts: list[int]) -> None:
    data = tr.payload(SEED, size)
    check = tr.EchoCheck(SEED, size)
    edges = sorted({0, size, *(c for c in cuts if c < size)})
    for start, end in itertools.pairwise(edges):
        check.feed(data[start:end])
    assert (check.received, check.mismatch_at) == (size, None)
    assert check.sha256 == hashlib.sha256(data).hexdigest()


@given(size=st.integers(min_value=2, max_value=2 * tr.CHUNK + 5), data=st.data())
def test_the_first_differing_byte_is_found(size: int, data: st.DataObject) -> None:
    where = data.draw(st.integers(min_value=0, max_value=size - 1))
    split = data.draw(st.integers(min_value=0, max_value=size))
    echo = bytearray(tr.payload(SEED, size))
    echo[where] ^= 0x01
    check = tr.EchoCheck(SEED, size)
    check.feed(bytes(echo[:split]))
    check.feed(bytes(echo[split:]))
    assert check.mismatch_at == where
    assert check.received == size


def test_bytes_beyond_the_payload_are_a_mismatch() -> None:
    check = tr.EchoCheck(SEED, 100)
    check.feed(tr.payload(SEED, 100) + b"x")
    assert (check.mismatch_at, check.received) == (100, 101)


def progress(
    *,
    planned: int = 1000,
    sent: int = 1000,
    received: int = 1000,
    sha256_received: str = "a" * 64,
    mismatch_at: int | None = None,
    end: str | None = "close_notify",
) -> tr.Progress:
    return tr.Progress(
        planned=planned,
        sent=sent,
        received=received,
        sha256_sent="a" * 64,
        sha256_received=sha256_received,
        mismatch_at=mismatch_at,
        end=end,
    )


RESET = ConnectionResetError(104, "reset")


@pytest.mark.parametrize(
    ("prog", "error", "timed_out", "outcome"),
    [
        (progress(), None, False, "ok"),
        (progress(end="tcp_eof"), None, False, "ok"),  # byte-exact, noted
        (progress(), None, True, "ok"),  # all back, the end came late
        (progress(mismatch_at=10), None, False, "mismatch"),
        (progress(received=1001, mismatch_at=1000), None, False, "mismatch"),
        (progress(sha256_received="b" * 64), None, False, "mismatch"),
        (progress(received=400), None, False, "truncated"),
        (progress(received=400), RESET, False, "truncated"),
        (progress(sent=400, received=400), RESET, False, "truncated"),
        (progress(received=400), None, True, "timeout"),
        (progress(received=0), None, True, "timeout"),
        (progress(received=0), None, False, "rejected"),
        (progress(received=0), RESET, False, "rejected"),
        (progress(received=0), ssl.SSLError(1, "alert"), False, "rejected"),
        (progress(received=400), ValueError("bug"), False, "error"),
    ],
)
def test_classify_transfer(
    prog: tr.Progress, error: BaseException | None, timed_out: bool, outcome: str
) -> None:
    verdict = decide.classify_transfer("exchange", prog, error, timed_out=timed_out)
    assert verdict.outcome == outcome
    assert verdict.upstream is None
    assert (verdict.error is None) == (
        outcome == "ok" and prog.end == "close_notify" and not timed_out
    )
    if verdict.error is not None:
        assert len(verdict.error) <= 200


def test_classify_transfer_before_the_exchange_is_classify() -> None:
    refused = ConnectionRefusedError(111, "refused")
    assert decide.classify_transfer("connect", None, refused, timed_out=False).outcome == "refused"
    handshake = decide.classify_transfer("handshake", None, RESET, timed_out=False)
    assert handshake.outcome == "tls_error"
    assert decide.classify_transfer("handshake", None, None, timed_out=True).outcome == "timeout"


def test_summary_counts_the_transfer_outcomes() -> None:
    tally = decide.Tally()
    tally.add(decide.Verdict("truncated", None, "x"))
    tally.add(decide.Verdict("mismatch", None, "y"))
    summary = tally.summary()
    assert list(summary["outcomes"]) == list(decide.OUTCOMES)
    assert (summary["outcomes"]["truncated"], summary["outcomes"]["mismatch"]) == (1, 1)


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("65536", 65536), ("512KiB", 512 << 10), ("4MiB", 4 << 20), ("4m", 4 << 20)],
)
def test_sizes(text: str, size: int) -> None:
    assert client_config.parse_size(text, "--transfer-bytes") == size


@pytest.mark.parametrize("text", ["", "1.5MiB", "-1", "4 TB", "MiB"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(client_config.ConfigError, match="--transfer-bytes"):
        client_config.parse_size(text, "--transfer-bytes")
