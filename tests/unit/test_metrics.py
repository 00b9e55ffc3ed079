"""The proxy's counters (pure) and the admin listener's HTTP edge (pure parts)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from l4proxy.admin import BODY_LIMIT, Request, Response, parse_request
from l4proxy.metrics import MAX_CLIENT_LABELS, OTHER_CLIENTS, Histogram, Stats


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    h = Histogram(bounds=(0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert h.count == 4
    assert h.total == pytest.approx(3.65)


@given(st.lists(st.floats(0, 100, allow_nan=False), max_size=50))
def test_histogram_last_bucket_counts_everything_and_buckets_never_decrease(
    values: list[float],
) -> None:
    h = Histogram()
    for value in values:
        h.observe(value)
    counts = [count for _, count in h.cumulative()]
    assert counts == sorted(counts)
    assert counts[-1] == len(values)


def test_each_decision_lands_in_its_counter() -> None:
    stats = Stats()
    closed = stats.connection_closed
    closed("forwarded", "eof", identity="a", upstream="u:1", bytes_up=10, bytes_down=20)
    closed("forwarded", "eof", identity="a", upstream="u:1", bytes_up=1, bytes_down=2)
    closed(
        "tls_failed", "closed_without_data", identity=None, upstream=None, bytes_up=0, bytes_down=0
    )
    closed("handshake_timeout", "x", identity=None, upstream=None, bytes_up=0, bytes_down=0)
    closed("rate_limited", "rate", identity="a", upstream=None, bytes_up=0, bytes_down=0)
    closed("denied", "no_allowed_upstream", identity="b", upstream=None, bytes_up=0, bytes_down=0)
    assert stats.closed == {
        "forwarded": 2,
        "tls_failed": 1,
        "handshake_timeout": 1,
        "rate_limited": 1,
        "denied": 1,
    }
    assert stats.bytes_closed == {("u:1", "up"): 11, ("u:1", "down"): 22}
    assert stats.handshake_failures == {"closed_without_data": 1, "timeout": 1}
    assert stats.rate_limited == {("a", "rate"): 1}
    assert stats.denied == {"b": 1}


def test_client_labels_are_bounded() -> None:
    stats = Stats()
    for i in range(MAX_CLIENT_LABELS):
        assert stats.client_label(f"c{i}") == f"c{i}"
    assert stats.client_label("one too many") == OTHER_CLIENTS
    assert stats.client_label("c0") == "c0"  # known ones keep their label
    assert stats.client_label(None) == "-"


def test_check_done_keeps_the_last_result() -> None:
    stats = Stats()
    stats.check_done("u:1", ok=True, reason="connected", latency=0.002, wall_time=100.0)
    stats.check_done("u:1", ok=False, reason="ECONNREFUSED", latency=0.001, wall_time=101.0)
    check = stats.checks["u:1"]
    assert (check.ok, check.failed, check.last_ok, check.last_reason) == (
        1,
        1,
        False,
        "ECONNREFUSED",
    )
    assert check.latency.count == 2


def test_lookup_done_counts_results_per_group_and_keeps_the_last() -> None:
    stats = Stats()
    stats.lookup_done("up", result="ok", reason="answer", wall_time=100.0)
    stats.lookup_done("up", result="failed", reason="timeout", wall_time=101.0)
    stats.lookup_done("up", result="failed", reason="timeout", wall_time=102.0)
    stats.lookup_done("other", result="empty", reason="no address records", wall_time=103.0)
    up = stats.lookups["up"]
    assert dict(up.results) == {"ok": 1, "failed": 2}
    assert (up.last_result, up.last_reason, up.last_at) == ("failed", "timeout", 102.0)
    assert dict(stats.lookups["other"].results) == {"empty": 1}


# --- HTTP edge ------------------------------------------------------------------------------


def test_parse_a_plain_get() -> None:
    got = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n")
    assert got == Request("GET", "/metrics", {"host": "a", "accept": "*/*"})


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /\r\n\r\n", 400),
        (b"GET / HTTP/2\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n : x\r\n\r\n", 400),
        (b"POST /reload HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"POST /reload HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (f"POST /reload HTTP/1.1\r\nContent-Length: {BODY_LIMIT + 1}\r\n\r\n".encode(), 413),
    ],
)
def test_bad_requests_get_an_error_response(head: bytes, status: int) -> None:
    got = parse_request(head)
    assert isinstance(got, Response)
    assert got.status == status


# RFC 9112's request line as the admin listener takes it: an upper-case method, an
# origin-form target of visible ASCII, HTTP/1.0 or HTTP/1.1.
REQUEST_LINE = re.compile(rb"[A-Z]+ /[\x21-\x7e]* HTTP/1\.[01]")


@given(
    st.binary(max_size=200)
    | st.tuples(
        st.sampled_from([b"GET / HTTP/1.1", b"POST /reload HTTP/1.0", b"GET /status HTTP/1.1"]),
        st.binary(max_size=60),
    ).map(lambda parts: parts[0] + b"\r\n" + parts[1])
)
def test_any_bytes_parse_to_a_request_or_an_error_never_an_exception(head: bytes) -> None:
    got = parse_request(head + b"\r\n\r\n")
    line = head.split(b"\r\n", 1)[0]
    if not head.isascii():
        assert isinstance(got, Response), got
        assert (got.status, got.body) == (400, b"bad request: the head must be ASCII\n")
    elif not REQUEST_LINE.fullmatch(line):
        assert isinstance(got, Response), got
        assert got.status == 400
        assert got.body.startswith(b"bad request line"), got.body
    elif isinstance(got, Request):  # a good request line: the headers decided
        method, target, _ = line.decode().split(" ")
        assert (got.method, got.path) == (method, target.split("?", 1)[0])
    else:  # refused for a header, never for the request line
        assert got.status in (400, 413), got
        assert not got.body.startswith(b"bad request"), got.body


def test_response_encoding_and_head() -> None:
    response = Response(405, b"no\n", headers={"Allow": "POST"})
    encoded = response.encode()
    assert encoded.startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"\r\nContent-Length: 3\r\n" in encoded
    assert b"\r\nAllow: POST\r\n" in encoded
    assert encoded.endswith(b"\r\n\r\nno\n")
    assert response.encode(head_only=True) == encoded[: -len(b"no\n")]
