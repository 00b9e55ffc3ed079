"""Hot reload through a real proxy: new rules for new connections, open ones untouched,
invalid configs refused, certificates rotated."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509

import certgen
from l4proxy.config import Upstream
from l4proxy.server import Proxy, ReloadResult, State
from tests.support.harness import Lab
from tests.support.loops import await_condition, wait_for
from tests.support.tlsclient import End, TlsClient, client_context, exchange

REPLY = "Reply from upstream "


def reload(lab: Lab) -> ReloadResult:
    """A reload, as POST /reload does it: answered once it applies to every new
    connection (with workers: N, once every worker has taken it)."""
    proxy = lab.proxy
    assert proxy is not None
    result = lab.proxy_loop.call(proxy.reload)
    lab.proxy_loop.run(proxy.reload_settled())
    return result


def running(lab: Lab) -> Proxy:
    assert lab.proxy is not None
    return lab.proxy


def test_reload_applies_new_rules_to_new_connections_and_keeps_open_ones(
    lab: Lab, tmp_path: Path
) -> None:
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml")
    lab.start_proxy(path=path)
    deny_b = {
        "default": "allow",
        "rules": [{"client": "client.b", "action": "deny", "upstream": "*"}],
    }

    async def main() -> tuple[bytes, bytes, End | None, tuple[bytes, End | None]]:
        ctx = client_context(lab.certs, "client.b")
        client = await TlsClient.connect(lab.address, ctx)
        try:
            await client.send(b"one")
            first = await client.recv_exactly(3)
            lab.write_config(path, authorization=deny_b)
            status, body = await asyncio.to_thread(lab.admin_json, "/reload", "POST")
            assert (status, body["result"]) == (200, "ok"), body
            new = await exchange(lab.address, ctx)  # a new connection: denied now
            await client.send(b"two")  # the open one keeps working both ways
            second = await client.recv_exactly(3)
            await client.close_notify()
            await client.recv_all()
            return first, second, client.end, new
        finally:
            await client.aclose()

    first, second, end, new = uvloop.run(main())
    assert (first, second, end) == (b"one", b"two", End.CLOSE_NOTIFY)
    assert new == (b"", End.CLOSE_NOTIFY)
    access = lab.logs.wait_for("access", count=2)
    by_decision = {r["decision"]: r for r in access}
    assert by_decision["denied"]["client"] == "client.b"
    assert by_decision["forwarded"]["reason"] == "eof"
    assert by_decision["forwarded"]["bytes_up"] == 6
    (event,) = lab.logs.events("reload")
    assert event["result"] == "ok"
    assert event["open_connections"] == 1
    _status, body = lab.admin_json("/status")
    assert body["config"]["last_reload"]["result"] == "ok"
    assert body["config"]["sha256"] == event["config_sha256"]


def test_an_invalid_config_is_refused_and_the_old_one_stays_in_force(
    lab: Lab, tmp_path: Path
) -> None:
    lab.start_upstreams(["reply"])
    path = lab.write_config(tmp_path / "proxy.yaml")
    lab.start_proxy(path=path)
    before = running(lab).config_sha256
    cases: list[tuple[str, str | None]] = [
        ("tls: [unclosed\n", None),
        ("upstreams: []\ntls: {ca: a, cert: b, key: c}\n", "upstreams"),
    ]
    for broken, key in cases:
        path.write_text(broken, encoding="utf-8")
        result = reload(lab)
        assert not result.ok
        event = lab.logs.events("reload", result="error")[-1]
        assert (event["key"], event["message"]) == (key, result.message)
    # A valid file that names a key that does not load: refused too, naming the key.
    lab.write_config(path, tls={"ca": str(tmp_path / "missing.pem"), "cert": "x", "key": "y"})
    status, body = lab.admin_json("/reload", "POST")
    assert status == 422
    assert body["result"] == "error"
    assert body["message"].startswith("tls.ca: ")
    # Changing the listen address needs a restart: refused, with a message that says so.
    lab.write_config(path, listen="127.0.0.1:1")
    result = reload(lab)
    assert not result.ok
    assert result.message.startswith("listen: ")
    assert "restart" in result.message

    assert running(lab).config_sha256 == before
    data, _end = uvloop.run(exchange(lab.address, client_context(lab.certs, "client.b")))
    assert data.decode().startswith(REPLY)
    _, status_body = lab.admin_json("/status")
    assert status_body["config"]["last_reload"]["result"] == "error"
    assert status_body["config"]["sha256"] == before


def test_a_removed_upstream_finishes_its_open_connections_and_gets_no_new_ones(
    lab: Lab, tmp_path: Path
) -> None:
    u1, u2 = lab.start_upstreams(["echo", "reply"])
    path = lab.write_config(tmp_path / "proxy.yaml", [u1.address])
    lab.start_proxy(path=path)

    async def main() -> tuple[bytes, list[bytes], dict[str, Any]]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"ping")
            assert await client.recv_exactly(4) == b"ping"
            lab.write_config(path, [u2.address])
            assert (await asyncio.to_thread(reload, lab)).removed == (u1.address,)
            status = (await asyncio.to_thread(lab.admin_json, "/status"))[1]
            replies = []
            for _ in range(3):
                data, _ = await exchange(lab.address, client_context(lab.certs, "client.c"))
                replies.append(data)
            await client.send(b"still here")
            echoed = await client.recv_exactly(10)
            await client.close_notify()
            await client.recv_all()
            return echoed, replies, status
        finally:
            await client.aclose()

    echoed, replies, status = uvloop.run(main())
    assert echoed == b"still here"
    assert replies == [f"{REPLY}u2".encode()] * 3
    assert status["retired_upstreams"] == [{"address": u1.address, "active_connections": 1}]
    assert [u["address"] for u in status["upstreams"]] == [u2.address]
    forwarded = lab.logs.wait_for("access", count=4, decision="forwarded")
    old = [r for r in forwarded if r["upstream"] == u1.address]
    assert len(old) == 1
    assert old[0]["reason"] == "eof"
    proxy = running(lab)
    assert lab.proxy_loop.call(lambda: dict(proxy.router.pool.retired)) == {}
    assert lab.proxy_loop.call(lambda: sorted(proxy.health_tasks)) == [u2.address]


def test_an_added_upstream_is_checked_and_used(lab: Lab, tmp_path: Path) -> None:
    u1, u2 = lab.start_upstreams(["reply", "reply"])
    path = lab.write_config(tmp_path / "proxy.yaml", [u1.address])
    lab.start_proxy(path=path)
    lab.write_config(path, [u1.address, u2.address], balancer="round_robin")
    assert reload(lab).added == (u2.address,)
    lab.logs.wait_for("health", upstream=u2.address, new="up")

    async def main() -> set[bytes]:
        seen = set()
        for _ in range(4):
            data, _ = await exchange(lab.address, client_context(lab.certs, "client.b"))
            seen.add(data)
        return seen

    assert uvloop.run(main()) == {f"{REPLY}u1".encode(), f"{REPLY}u2".encode()}


def serial_seen(lab: Lab, ctx_certs: Path, stem: str) -> int:
    async def main() -> int:
        client = await TlsClient.connect(lab.address, client_context(ctx_certs, stem))
        try:
            der = client.tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der).serial_number
        finally:
            await client.aclose()

    return uvloop.run(main())


def test_reload_rotates_the_server_certificate(lab: Lab, tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    shutil.copytree(lab.certs, certs)
    lab.start_upstreams(["echo"])
    path = lab.write_config(
        tmp_path / "proxy.yaml",
        tls={
            "ca": str(certs / "ca.pem"),
            "cert": str(certs / "server.pem"),
            "key": str(certs / "server.key"),
        },
    )
    lab.start_proxy(path=path)
    old_serial = serial_seen(lab, certs, "client.b")
    rotated = certgen.make_server(certgen.load_issued(certs, "ca"))
    certgen.write_issued(certs, "server", rotated)
    assert serial_seen(lab, certs, "client.b") == old_serial  # not before the reload
    assert reload(lab).ok
    assert serial_seen(lab, certs, "client.b") == rotated.cert.serial_number
    _, body = lab.admin_json("/status")
    assert body["tls"]["certificate"]["serial"] == format(rotated.cert.serial_number, "x")


def test_reload_rotates_the_client_ca(lab: Lab, tmp_path: Path) -> None:
    """After the reload only clients of the new CA get in; before it, only the old."""
    lab.start_upstreams(["reply"])
    path = lab.write_config(tmp_path / "proxy.yaml")
    lab.start_proxy(path=path)
    other = lab.certs / "other"

    def attempt(certs: Path, trust: Path) -> bytes:
        ctx = client_context(certs, "client.a", ca=trust / "ca.pem")
        return uvloop.run(exchange(lab.address, ctx))[0]

    assert attempt(lab.certs, lab.certs).startswith(REPLY.encode())
    lab.write_config(
        path,
        tls={
            "ca": str(other / "ca.pem"),
            "cert": str(other / "server.pem"),
            "key": str(other / "server.key"),
        },
    )
    assert reload(lab).ok
    assert attempt(other, other).startswith(REPLY.encode())
    # A client certificate from the old CA no longer verifies at the proxy.
    try:
        refused = attempt(lab.certs, other)
    except OSError:  # TLS 1.3: the alert may arrive as the first read fails
        refused = b""
    assert refused == b""
    (failed,) = lab.logs.wait_for("access", decision="tls_failed")
    assert failed["reason"].startswith("certificate: "), failed


# --- reload races -------------------------------------------------------------------------


def health_loops(lab: Lab) -> list[str]:
    """The names of the health-check tasks still running on the proxy's loop."""
    proxy = running(lab)
    return lab.proxy_loop.call(
        lambda: sorted(
            task.get_name()
            for task in asyncio.all_tasks(proxy.loop)
            if task.get_name().startswith("health-") and not task.done()
        )
    )


def test_a_reload_during_a_drain_applies_and_the_drain_ends_when_connections_finish(
    lab: Lab, tmp_path: Path
) -> None:
    """SIGHUP (or ``POST /reload``) while SIGTERM's drain waits for an open connection.
    The reload applies (nothing in it reopens the listener), the proxy stays not ready,
    the open connection carries on, and the drain ends ``drained`` once it finishes,
    with every count at zero and no check loop left running."""
    u1, u2 = lab.start_upstreams(["echo", "echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", [u1.address])
    proxy = lab.start_proxy(path=path)

    async def main() -> tuple[str, ReloadResult]:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"one")
            assert await client.recv_exactly(3) == b"one"
            draining = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(proxy.drain(30.0), lab.proxy_loop.loop)
            )
            await asyncio.to_thread(lab.logs.wait_for, "draining")
            lab.write_config(path, [u1.address, u2.address], balancer="round_robin")
            result = await asyncio.to_thread(reload, lab)
            ready = await asyncio.to_thread(lab.admin_json, "/ready")
            assert ready == (503, {"ready": False, "reason": "draining"})
            try:  # the listener stays closed
                refused = await asyncio.open_connection(*lab.address)
            except ConnectionRefusedError:
                pass
            else:
                refused[1].close()
                raise AssertionError("a reload during a drain reopened the listener")
            await client.send(b"two")  # the open connection keeps working both ways
            assert await client.recv_exactly(3) == b"two"
            assert not draining.done()
            await client.close_notify()
            assert await client.recv_all() == b""
        finally:
            await client.aclose()
        async with asyncio.timeout(5):  # the grace is 30 s: it ends because the stream did
            outcome = await draining
        return outcome, result

    outcome, result = uvloop.run(main())
    assert outcome == "drained"
    assert (result.ok, result.added, result.removed) == (True, (u2.address,), ())
    (event,) = lab.logs.events("reload")
    assert (event["result"], event["open_connections"]) == ("ok", 1)
    (stopped,) = lab.logs.events("stopped")
    assert (stopped["reason"], stopped["open_connections"]) == ("drained", 0)
    (line,) = lab.logs.events("access")
    assert (line["decision"], line["reason"], line["bytes_up"]) == ("forwarded", "eof", 6)
    assert lab.open_connections() == 0
    assert lab.active() == [0, 0]
    assert lab.proxy_loop.call(lambda: dict(proxy.router.limiter.open)) == {}
    assert lab.proxy_loop.call(lambda: dict(proxy.health_tasks)) == {}
    assert health_loops(lab) == []
    assert lab.logs.events("error") == []


def test_a_reload_that_lands_while_the_drain_stops_leaves_no_check_loop_running(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP's handler stays installed until the process exits, so a reload can run
    between the awaits of ``stop()``: here, as the admin listener stops (after the check
    loops were cancelled). Once the drain is over, no check loop may be running."""
    u1, u2 = lab.start_upstreams(["echo", "echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", [u1.address])
    proxy = lab.start_proxy(path=path)
    admin = proxy.admin
    assert admin is not None
    admin_stop = admin.stop
    results: list[ReloadResult] = []

    async def stop_after_a_reload() -> None:
        results.append(proxy.reload())  # the signal handler runs while stop() awaits
        await admin_stop()

    monkeypatch.setattr(admin, "stop", stop_after_a_reload)
    lab.write_config(path, [u1.address, u2.address])
    assert lab.proxy_loop.run(proxy.drain(5.0)) == "drained"
    assert len(results) == 1
    assert lab.logs.events("stopped")[0]["reason"] == "drained"
    assert health_loops(lab) == []
    assert lab.proxy_loop.call(lambda: dict(proxy.health_tasks)) == {}


def test_a_reload_removing_an_upstream_mid_check_ends_its_check_loop_quietly(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The removed upstream's probe is in flight (held by the test) when the reload
    lands: its loop ends, its result, if it ever comes, moves nobody's health, no
    transition is logged for it, and ``/status`` knows only the upstream that stays.

    The held upstream is the first one, so a stale index would land on the one that
    stays (at index 0 after the reload) and mark it down."""
    gone, stays = lab.start_upstreams(["echo", "echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", [gone.address, stays.address])
    held = threading.Event()  # the probe of ``gone`` is waiting
    hold = {"on": False}
    probes_after_reload: list[str] = []
    reloaded = {"done": False}
    release: dict[str, asyncio.Event] = {}
    original = Proxy.probe

    async def probe(self: Proxy, upstream: Upstream) -> tuple[bool, str]:
        if reloaded["done"]:
            probes_after_reload.append(upstream.key)
        if upstream.key == gone.address and hold["on"]:
            held.set()
            await release.setdefault("event", asyncio.Event()).wait()
            return False, "ECONNREFUSED"  # what a decommissioned upstream would answer
        return await original(self, upstream)

    monkeypatch.setattr(Proxy, "probe", probe)
    proxy = lab.start_proxy(path=path)
    assert lab.health() == ["up", "up"]
    hold["on"] = True
    assert held.wait(5), "the next check of the first upstream never started"
    loop_of_gone = lab.proxy_loop.call(lambda: proxy.health_tasks[gone.address])
    lines_before = len(lab.logs.records)

    lab.write_config(path, [stays.address])

    def reload_and_mark() -> ReloadResult:
        result = proxy.reload()
        reloaded["done"] = True
        return result

    result = lab.proxy_loop.call(reload_and_mark)
    assert (result.ok, result.removed) == (True, (gone.address,))
    lab.proxy_loop.call(lambda: release.setdefault("event", asyncio.Event()).set())
    wait_for("the removed upstream's check loop to end", loop_of_gone.done, timeout=5)
    checks_then = lab.proxy_loop.call(lambda: proxy.stats.checks[stays.address].ok)
    wait_for(
        "three more checks of the upstream that stays",
        lambda: (
            lab.proxy_loop.call(lambda: proxy.stats.checks[stays.address].ok) >= checks_then + 3
        ),
    )
    after = lab.logs.records[lines_before:]
    assert [r for r in after if r["event"] in ("health", "error")] == []
    assert gone.address not in probes_after_reload
    assert lab.health() == ["up"]
    assert health_loops(lab) == [f"health-{stays.address}"]
    _, status = lab.admin_json("/status")
    assert [(u["address"], u["health"]) for u in status["upstreams"]] == [(stays.address, "up")]
    assert status["retired_upstreams"] == []


def pending_idle_check(proxy: Proxy) -> asyncio.TimerHandle | None:
    """The one connection's armed idle check; None once none is (or it has ended)."""
    conns = list(proxy.connections)
    if len(conns) != 1 or conns[0].state is not State.FORWARDING:
        return None
    return conns[0].timer


@pytest.mark.single_process("reads the connection's idle timer")
def test_a_longer_idle_timeout_reaches_an_open_connection_at_its_next_idle_check(
    lab: Lab, tmp_path: Path
) -> None:
    """Opened under ``idle: 1s``, reloaded to ``idle: 1h`` before that second is over:
    when the check armed for 1 s fires, it re-reads the timeout and re-arms for the new
    one instead of closing the connection."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", timeouts={"idle": "1s"})
    proxy = lab.start_proxy(path=path)
    lab.write_config(path, timeouts={"idle": "1h"})

    async def main() -> None:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"hi")
            assert await client.recv_exactly(2) == b"hi"
            armed = lab.proxy_loop.call(lambda: pending_idle_check(proxy))
            assert armed is not None
            left = lab.proxy_loop.call(lambda: armed.when() - proxy.loop.time())
            assert left <= 1.001  # armed for the idle in force when it was opened
            assert (await asyncio.to_thread(reload, lab)).ok
            await await_condition(
                "the idle check armed for 1 s to run",
                lambda: lab.proxy_loop.call(lambda: pending_idle_check(proxy)) is not armed,
                timeout=5,
            )
            now = lab.proxy_loop.call(lambda: pending_idle_check(proxy))
            ended = [(r["reason"], r["duration_ms"]) for r in lab.logs.events("access")]
            assert now is not None, f"closed by the check: {ended}"
            assert now.when() - lab.proxy_loop.call(proxy.loop.time) > 600  # re-armed: 1 h
            await client.send(b"still")
            assert await client.recv_exactly(5) == b"still"
            await client.close_notify()
            assert await client.recv_all() == b""
        finally:
            await client.aclose()

    uvloop.run(main())
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "eof")


@pytest.mark.single_process("reads the connection's idle timer")
def test_reloading_idle_to_zero_disables_it_for_open_connections(lab: Lab, tmp_path: Path) -> None:
    """``timeouts.idle: 0`` disables the idle timeout, and a new idle applies to open
    connections at their next idle check: so a connection opened under ``idle: 500ms``
    and reloaded to ``0`` must survive that check, not be closed as idle by it."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", timeouts={"idle": "500ms"})
    proxy = lab.start_proxy(path=path)
    lab.write_config(path, timeouts={"idle": 0})

    async def main() -> str:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"hi")
            assert await client.recv_exactly(2) == b"hi"
            armed = lab.proxy_loop.call(lambda: pending_idle_check(proxy))
            assert armed is not None
            assert (await asyncio.to_thread(reload, lab)).ok
            await await_condition(
                "the idle check armed under 500ms to run",
                lambda: lab.proxy_loop.call(lambda: pending_idle_check(proxy)) is not armed,
                timeout=5,
            )
            state = lab.proxy_loop.call(lambda: [c.state.value for c in proxy.connections])
            ended = [
                (r["decision"], r["reason"], r["duration_ms"]) for r in lab.logs.events("access")
            ]
            assert state == ["forwarding"], f"closed by the check: {ended}"
            await client.send(b"still")
            assert await client.recv_exactly(5) == b"still"
            await client.close_notify()
            assert await client.recv_all() == b""
            return "ok"
        finally:
            await client.aclose()

    assert uvloop.run(main()) == "ok"
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "eof")


@pytest.mark.parametrize("before", ["10s", 0], ids=["shorter", "from-off"])
def test_a_new_idle_timeout_reaches_an_open_connection_at_once(
    lab: Lab, tmp_path: Path, before: str | int
) -> None:
    """A reload to a shorter ``timeouts.idle`` applies to open connections now, not
    when the check armed under the old one comes: opened under 10 s (or with the idle
    timeout off), reloaded to 300 ms, the quiet connection is closed about 300 ms after
    the reload."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", timeouts={"idle": before})
    lab.start_proxy(path=path)

    async def main() -> float:
        client = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            await client.send(b"hi")
            assert await client.recv_exactly(2) == b"hi"
            lab.write_config(path, timeouts={"idle": "300ms"})
            assert (await asyncio.to_thread(reload, lab)).ok
            reloaded = time.monotonic()
            async with asyncio.timeout(3):
                assert await client.recv_all() == b""
            return time.monotonic() - reloaded
        finally:
            await client.aclose()

    after = uvloop.run(main())
    assert 0.2 <= after < 1.5, after
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("forwarded", "idle_timeout")
