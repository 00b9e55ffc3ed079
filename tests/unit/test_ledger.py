"""The supervisor's ledger (``workers: N``): proxy-wide caps, admissions held per
worker's connection, and every slot given back once, by a close or a worker's death.
And the frames the supervisor and its workers exchange."""

from __future__ import annotations

import dataclasses
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from l4proxy.ipc import HEADER, MAX_FRAME, Decoder, FrameError, encode
from l4proxy.ledger import Ledger
from l4proxy.router import Admission, Rejected, Router
from l4proxy.worker import ID_BLOCK, IdBlocks
from tests.unit.test_router import router_config


def make_ledger(*, max_connections: int = 0, max_handshakes: int = 0, **options: object) -> Ledger:
    config = dataclasses.replace(
        router_config(**options),  # type: ignore[arg-type]
        max_connections=max_connections,
        max_handshakes=max_handshakes,
    )
    return Ledger(Router(config, random.Random(0)))


def settled(ledger: Ledger) -> None:
    """Every slot is back: no upstream counts a connection, no client holds a ticket."""
    assert list(ledger.router.pool.active) == [0, 0, 0]
    assert sum(ledger.router.limiter.open.values()) == 0
    assert ledger.connections == 0
    assert ledger.handshakes == 0


def test_the_caps_count_every_workers_connections() -> None:
    ledger = make_ledger(max_connections=3)
    assert ledger.open(1, 10) is None
    assert ledger.open(2, 20) is None
    assert ledger.open(1, 11) is None
    # The fourth, on either worker, is over the cap (counted: its worker makes room or
    # closes it, and says so).
    assert ledger.open(2, 21) == "max_connections"
    assert ledger.connections == 4
    ledger.close(2, 21)
    ledger.close(1, 10)
    assert ledger.open(2, 22) is None
    for worker, conn in ((1, 11), (2, 20), (2, 22)):
        ledger.close(worker, conn)
    settled(ledger)


def test_a_handshake_ends_at_admission_and_frees_the_handshake_cap() -> None:
    ledger = make_ledger(max_handshakes=2)
    ledger.open(1, 1)
    ledger.open(2, 1)
    assert ledger.open(1, 2) == "max_handshakes"
    ledger.close(1, 2)
    assert isinstance(ledger.admit(1, 1, "client.a", 0.0), Admission)
    assert ledger.handshakes == 1
    assert ledger.open(1, 3) is None  # one handshake finished: room for one
    ledger.close(1, 1)
    ledger.close(2, 1)
    ledger.close(1, 3)
    settled(ledger)


def test_one_token_bucket_and_one_concurrency_cap_for_all_workers() -> None:
    # The third takes a token (the bucket is asked first), then meets max_concurrent.
    ledger = make_ledger(rate=1.0, burst=4, max_concurrent=2)
    first = ledger.admit(1, 1, "client.a", 0.0)
    second = ledger.admit(2, 1, "client.a", 0.0)
    assert isinstance(first, Admission)
    assert isinstance(second, Admission)
    third = ledger.admit(1, 2, "client.a", 0.0)
    assert third == Rejected("rate_limited", "max_concurrent")
    ledger.close(1, 2)
    ledger.close(2, 1)
    assert isinstance(ledger.admit(2, 2, "client.a", 0.0), Admission)  # the bucket's last
    ledger.close(2, 2)
    assert ledger.admit(1, 3, "client.a", 0.0) == Rejected("rate_limited", "rate")
    ledger.close(1, 3)
    ledger.close(1, 1)
    settled(ledger)


def test_least_connections_counts_both_workers() -> None:
    ledger = make_ledger()
    picks = []
    for conn in range(6):
        result = ledger.admit(conn % 2 + 1, conn, "client.a", 0.0)
        assert isinstance(result, Admission)
        picks.append(result.lease.index)
    assert sorted(picks) == [0, 0, 1, 1, 2, 2]
    assert list(ledger.router.pool.active) == [2, 2, 2]


def test_a_dead_workers_connections_give_everything_back() -> None:
    ledger = make_ledger(max_connections=10, max_concurrent=5)
    for conn in range(4):
        ledger.open(1, conn)
        ledger.open(2, conn)
        ledger.admit(1, conn, "client.a", 0.0)
    assert ledger.gone(1) == 4
    assert ledger.connections == 4  # worker 2's, still in their handshake
    assert ledger.handshakes == 4
    assert ledger.router.limiter.open.get("client.a", 0) == 0
    ledger.close(1, 0)  # a message from the dead worker, late: nothing happens
    ledger.gone(2)
    settled(ledger)


def test_a_failed_dial_moves_the_lease_and_the_last_failure_gives_it_back() -> None:
    ledger = make_ledger()
    admitted = ledger.admit(1, 7, "client.a", 0.0)
    assert isinstance(admitted, Admission)
    first = admitted.lease.upstream
    transition, failed, picked = ledger.dial_failed(1, 7, "ECONNREFUSED", 1.0)
    assert failed == first
    assert transition is not None  # passive health: that upstream is down
    assert not isinstance(picked, Rejected)
    assert picked.upstream != first
    ledger.dial_failed(1, 7, "ECONNREFUSED", 1.0)
    _, _, last = ledger.dial_failed(1, 7, "ECONNREFUSED", 1.0)
    assert isinstance(last, Rejected)
    assert last.decision == "dial_failed"
    ledger.close(1, 7)
    settled(ledger)
    assert ledger.dial_failed(1, 99, "timeout", 1.0)[2] == Rejected(
        "dial_failed", "timeout (connection unknown)"
    )


def test_revocations_name_each_workers_denied_connections() -> None:
    ledger = make_ledger()
    for conn in range(3):
        ledger.admit(1, conn, "client.a", 0.0)
        ledger.admit(2, conn, "client.b", 0.0)
    u1 = ledger.router.pool.upstreams[0].key
    deny = [{"client": "client.b", "action": "deny", "upstream": u1}]
    ledger.router.reconfigure(router_config(rules=deny))
    revoked = ledger.revocations()
    assert list(revoked) == [2]
    assert len(revoked[2]) == 1  # the one of client.b's three on u1


OPS = st.lists(
    st.tuples(
        st.sampled_from(["open", "admit", "dial_failed", "close", "gone"]),
        st.integers(1, 3),  # worker
        st.integers(0, 5),  # connection
        st.sampled_from(["client.a", "client.b"]),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_any_sequence_gives_every_slot_back(ops: list[tuple[str, int, int, str]]) -> None:
    ledger = make_ledger(max_connections=4, max_handshakes=3, max_concurrent=2, rate=5.0)
    now = 0.0
    for op, worker, conn, client in ops:
        now += 0.1
        if op == "open":
            ledger.open(worker, conn)
        elif op == "admit":
            ledger.admit(worker, conn, client, now)
        elif op == "dial_failed":
            ledger.dial_failed(worker, conn, "ECONNREFUSED", now)
        elif op == "close":
            ledger.close(worker, conn)
        else:
            ledger.gone(worker)
        books = ledger.books.values()
        assert ledger.connections == sum(len(b.counted) for b in books)
        assert ledger.handshakes == sum(len(b.handshaking) for b in books)
        assert sum(ledger.router.pool.active) == ledger.admitted()
        assert sum(ledger.router.limiter.open.values()) == ledger.admitted()
    for worker in (1, 2, 3):
        ledger.gone(worker)
    settled(ledger)


# --- frames ----------------------------------------------------------------------------


MESSAGES = st.lists(
    st.tuples(st.sampled_from(["admit", "close", "r"]), st.integers(), st.text(max_size=50)),
    max_size=20,
)


@given(MESSAGES, st.lists(st.integers(1, 64), max_size=20))
def test_frames_come_out_whole_whatever_the_chunking(
    messages: list[tuple[str, int, str]], cuts: list[int]
) -> None:
    data = b"".join(encode(m) for m in messages)
    decoder = Decoder()
    out: list[tuple[object, ...]] = []
    at = 0
    for size in cuts:
        out += decoder.feed(data[at : at + size])
        at += size
    out += decoder.feed(data[at:])
    assert out == messages
    assert decoder.pending == 0


def test_a_frame_announcing_more_than_the_limit_is_refused() -> None:
    with pytest.raises(FrameError):
        Decoder().feed(HEADER.pack(MAX_FRAME + 1) + b"x")
    assert pickle.loads(encode(("close", 1))[HEADER.size :]) == ("close", 1)


def test_connection_ids_roll_to_the_next_block_asked_for_half_way() -> None:
    asked: list[Callable[[Any], None]] = []
    ids = IdBlocks(1, asked.append)
    taken = [next(ids) for _ in range(ID_BLOCK // 2 + 1)]
    assert taken[:3] == [1, 2, 3]
    assert len(asked) == 1
    asked[0](5 * ID_BLOCK + 1)  # the supervisor's answer: a later block
    for _ in range(ID_BLOCK // 2 - 2):
        next(ids)
    assert next(ids) == ID_BLOCK  # the block's last
    assert next(ids) == 5 * ID_BLOCK + 1
    assert len(asked) == 1
