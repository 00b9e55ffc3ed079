"""Upstream health through the real proxy: active checks (prompt first check, rise/fall
hysteresis, pacing, no application bytes) and passive health (a failed dial marks the
upstream down at once and the connection moves on), on real sockets with real TLS."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import time
from collections.abc import Callable, Iterator

import pytest
import uvloop

from l4proxy.health import Transition
from l4proxy.server import Proxy
from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, TlsClient, client_context, exchange
from tests.support.upstreams import free_port

REPLY = b"Reply from upstream "


def running(lab: Lab) -> Proxy:
    assert lab.proxy is not None
    return lab.proxy


def completed_checks(proxy: Proxy, index: int) -> int:
    """Active checks completed so far for the upstream at ``index``."""
    found = proxy.stats.checks.get(proxy.router.pool.upstreams[index].key)
    return 0 if found is None else found.ok + found.failed


def checks(lab: Lab) -> list[int]:
    proxy = running(lab)
    return lab.proxy_loop.call(
        lambda: [completed_checks(proxy, i) for i in range(len(proxy.router.pool.upstreams))]
    )


# One active check as the proxy saw it: (checks completed, ok, new state).
Check = tuple[int, bool, str | None]


def record_checks(
    lab: Lab, monkeypatch: pytest.MonkeyPatch, index: int
) -> Callable[[], list[Check]]:
    """Spy on the router's check results for one upstream, without changing them.

    ``Proxy._health_loop`` counts the check in ``proxy.stats`` and feeds the result to
    ``router.check_result`` in the same step, so each entry holds the exact check count
    at which a result (and any transition it caused) happened."""
    proxy = running(lab)
    router = proxy.router
    original = router.check_result
    trace: list[Check] = []

    def spy(i: int, ok: bool, now: float, reason: str) -> Transition | None:
        transition = original(i, ok, now, reason)
        if i == index:
            count = completed_checks(proxy, i)
            trace.append((count, ok, transition.new.value if transition else None))
        return transition

    lab.proxy_loop.call(lambda: monkeypatch.setattr(router, "check_result", spy))
    return lambda: lab.proxy_loop.call(lambda: list(trace))


def test_first_check_settles_every_upstream_promptly_even_with_a_long_interval(lab: Lab) -> None:
    lab.start_upstreams(["echo", "echo"])
    config = lab.config(health_check={"interval": "1h", "timeout": "500ms"})
    started = time.monotonic()
    lab.start_proxy(config, wait_healthy=False)
    settled = lab.logs.wait_for(
        "health", count=2, timeout=2.0, where=lambda r: r["old"] == "unknown"
    )
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    by_upstream = {r["upstream"]: r for r in settled}
    assert set(by_upstream) == {u.address for u in lab.upstreams}
    for record in settled:
        assert (record["old"], record["new"], record["source"]) == ("unknown", "up", "active")
    assert checks(lab) == [1, 1]  # one prompt check each; the next one is an hour away
    assert lab.health() == ["up", "up"]


def test_rise_and_fall_hysteresis_with_a_real_upstream(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    (upstream,) = lab.start_upstreams(["echo"])
    hc = {"interval": "100ms", "timeout": "500ms", "rise": 2, "fall": 2}
    lab.start_proxy(lab.config(health_check=hc))
    trace = record_checks(lab, monkeypatch, 0)

    # Fall: the upstream stops listening; it goes down after two failed checks in a row.
    before_stop = checks(lab)[0]
    lab.up_loop.run(upstream.stop())
    (down,) = lab.logs.wait_for(
        "health", timeout=5, upstream=upstream.address, old="up", new="down"
    )
    assert down["source"] == "active"
    seen = trace()
    (at_down,) = [c for c, _, new in seen if new == "down"]
    # Every failure comes after the stop: the upstream was listening until then.
    failed = [c for c, ok, _ in seen if before_stop < c <= at_down and not ok]
    assert len(failed) >= 2, seen
    assert at_down - before_stop >= 2, seen
    assert failed[-2:] == [at_down - 1, at_down], seen  # the last two checks both failed
    assert checks(lab)[0] - before_stop >= 2

    # Rise: back on the same port; up again only after two successful checks in a row.
    before_start = checks(lab)[0]
    lab.up_loop.run(upstream.start())
    (up,) = lab.logs.wait_for("health", timeout=5, upstream=upstream.address, old="down", new="up")
    assert up["source"] == "active"
    seen = trace()
    (at_up,) = [c for c, _, new in seen if new == "up"]
    passed = [c for c, ok, _ in seen if before_start < c <= at_up and ok]
    assert len(passed) >= 2, seen
    assert passed[-2:] == [at_up - 1, at_up], seen
    first_success = next(entry for entry in seen if entry[0] == at_up - 1)
    assert first_success == (at_up - 1, True, None), seen  # one success did not flip it
    assert [new for _, _, new in seen if new is not None] == ["down", "up"], seen
    assert lab.health() == ["up"]


def test_health_checks_are_paced_not_a_busy_loop(lab: Lab) -> None:
    interval = 0.1
    config = lab.config(
        upstreams=[f"127.0.0.1:{free_port()}"],  # nothing listens: every check is refused
        health_check={"interval": "100ms", "timeout": "500ms"},
    )
    started = time.monotonic()
    lab.start_proxy(config, wait_healthy=False)
    samples: list[tuple[float, int]] = []

    def five_checks() -> bool:
        count = checks(lab)[0]
        samples.append((time.monotonic() - started, count))
        return count >= 5

    reached = wait_for("5 health checks", five_checks) - started
    assert reached >= 4 * interval * 0.9, samples
    for elapsed, count in samples:
        assert count <= elapsed / interval + 2, (elapsed, count, samples)
    (settled,) = lab.logs.wait_for("health")
    assert (settled["old"], settled["new"], settled["reason"]) == (
        "unknown",
        "down",
        "ECONNREFUSED",
    )


def test_health_checks_write_no_application_bytes(lab: Lab) -> None:
    (upstream,) = lab.start_upstreams(["record"])
    lab.start_proxy()

    def stats() -> tuple[int, int, int, list[bytes]]:
        s = upstream.stats
        return s.accepted, s.empty, s.open, list(s.received)

    wait_for("3 finished check connections", lambda: lab.up_loop.call(stats)[1] >= 3)
    accepted, empty, still_open, received = lab.up_loop.call(stats)
    assert empty >= 3
    assert received == []
    # Every connection that ended was empty; the others are a check still closing.
    assert accepted == empty + still_open
    assert still_open <= 1  # checks are one at a time
    assert checks(lab)[0] >= 3
    assert lab.logs.events("access") == []


def test_failed_dial_marks_the_upstream_down_and_retries_the_next(lab: Lab) -> None:
    u1, u2 = lab.start_upstreams(["reply", "reply"])
    config = lab.config(balancer="round_robin", health_check={"interval": "1h", "timeout": "500ms"})
    lab.start_proxy(config)
    assert lab.health() == ["up", "up"]
    lab.up_loop.run(u1.stop())

    async def main() -> list[tuple[bytes, End | None]]:
        ctx = client_context(lab.certs, "client.b")
        return [await exchange(lab.address, ctx, b"hi") for _ in range(4)]

    results = uvloop.run(main())
    assert results == [(REPLY + b"u2", End.CLOSE_NOTIFY)] * 4
    lines = lab.logs.wait_for("access", count=4)
    assert all(r["decision"] == "forwarded" and r["upstream"] == u2.address for r in lines)
    retried = [r for r in lines if r["attempts"] == 2]
    assert len(retried) == 1, lines
    assert all(r["attempts"] == 1 for r in lines if r not in retried)
    (passive,) = lab.logs.wait_for("health", upstream=u1.address, source="passive")
    assert (passive["old"], passive["new"]) == ("up", "down")
    assert passive["reason"] == "dial failed: ECONNREFUSED"
    assert lab.health() == ["down", "up"]
    assert lab.active() == [0, 0]
    assert lab.open_connections() == 0


async def refused(lab: Lab) -> tuple[bytes, End | None]:
    """A client that completes the handshake and waits for the server to speak: what it
    receives and how the stream ends. (It sends nothing: a client still writing when the
    proxy closes may get a reset for bytes sent after the close, which is plain TCP.)"""
    client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
    try:
        async with asyncio.timeout(10):
            return await client.recv_all(), client.end
    finally:
        await client.aclose()


def test_all_dials_failing_is_dial_failed_then_no_healthy_upstream(lab: Lab) -> None:
    upstreams = lab.start_upstreams(["reply", "reply"])
    lab.start_proxy(lab.config(health_check={"interval": "1h", "timeout": "500ms"}))
    assert lab.health() == ["up", "up"]
    for upstream in upstreams:
        lab.up_loop.run(upstream.stop())

    assert uvloop.run(refused(lab)) == (b"", End.CLOSE_NOTIFY)
    (failed,) = lab.logs.wait_for("access")
    assert failed["decision"] == "dial_failed"
    assert failed["attempts"] == 2
    assert failed["reason"] == "ECONNREFUSED (after 2 attempt(s))"
    assert failed["client"] == "client.b"
    assert failed["bytes_up"] == failed["bytes_down"] == 0
    marked = lab.logs.wait_for("health", count=2, source="passive", new="down")
    assert {r["upstream"] for r in marked} == {u.address for u in upstreams}
    assert lab.health() == ["down", "down"]

    assert uvloop.run(refused(lab)) == (b"", End.CLOSE_NOTIFY)
    _, second = lab.logs.wait_for("access", count=2)
    assert second["decision"] == "no_healthy_upstream"
    assert second["reason"] == "all 2 allowed upstreams are down"
    assert second["attempts"] == 0
    assert second["upstream"] is None
    accepted = lab.up_loop.call(lambda: [u.stats.accepted for u in upstreams])
    assert accepted == [1, 1]  # only the start-up checks: no dial ever connected
    assert lab.active() == [0, 0]
    assert lab.open_connections() == 0


@contextlib.contextmanager
def full_accept_queue() -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listener that never accepts, with a backlog of 0 (Linux queues one connection)."""
    listener = socket.socket()
    pending: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        yield listener, pending
    finally:
        for sock in pending:
            sock.close()
        listener.close()


def fill(listener: socket.socket, pending: list[socket.socket], n: int) -> None:
    for _ in range(n):
        sock = socket.socket()
        pending.append(sock)
        sock.setblocking(False)
        code = sock.connect_ex(listener.getsockname())
        assert code in (0, errno.EINPROGRESS), errno.errorcode.get(code, code)


def connect_hangs(address: tuple[str, int], wait: float) -> bool:
    """Does a plain connect to ``address`` still hang after ``wait`` seconds?"""
    with socket.socket() as sock:
        sock.settimeout(wait)
        try:
            sock.connect(address)
        except TimeoutError:
            return True
        except OSError:
            return False
        return False


def test_connect_timeout_is_dial_failed_with_reason_timeout(lab: Lab) -> None:
    with full_accept_queue() as (listener, pending):
        host, port = listener.getsockname()
        config = lab.config(
            upstreams=[f"{host}:{port}"],
            health_check={"interval": "1h", "timeout": "500ms"},
            timeouts={"connect": "300ms"},
        )
        # The one start-up check connects while the queue has room (its connection
        # stays queued, never accepted), so the upstream is up...
        lab.start_proxy(config)
        assert lab.health() == ["up"]
        # ...and from now on the queue is full: new SYNs are dropped, connects hang.
        fill(listener, pending, 2)
        if not connect_hangs((host, port), 0.5):
            pytest.skip("this kernel does not leave a connect to a full accept queue hanging")

        assert uvloop.run(refused(lab)) == (b"", End.CLOSE_NOTIFY)
        (line,) = lab.logs.wait_for("access")
    assert line["decision"] == "dial_failed"
    assert "timeout" in line["reason"], line
    assert line["attempts"] == 1
    assert 300 <= line["duration_ms"] < 3000, line
    (passive,) = lab.logs.wait_for("health", source="passive")
    assert (passive["new"], passive["reason"]) == ("down", "dial failed: timeout")
    assert lab.active() == [0]
    assert lab.open_connections() == 0
