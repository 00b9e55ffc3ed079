"""``workers: 2``: a supervisor and two worker processes, through real sockets.

What a user relies on when the proxy uses more than one core: connections land on
both workers; the per-identity token bucket, ``max_concurrent`` and least connections
are proxy-wide, not per worker; a worker that dies is restarted and gives back every
slot its connections held; ``/status`` and ``/metrics`` count the whole proxy; drain
reaches every worker. (The whole integration tier also runs with ``workers: 2``:
``L4PROXY_TEST_WORKERS=2``; see the README.)
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections import Counter
from pathlib import Path

import uvloop

from l4proxy import adminctl
from l4proxy.ratelimit import TokenBucket
from l4proxy.router import Admission, Rejected
from l4proxy.supervisor import Supervisor
from tests.integration.test_cli import Child, child_env, command, write_config
from tests.integration.test_tls import blocking_exchange
from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, TlsClient, client_context, exchange, read_plain

ATTEMPTS = 120


def burst(lab: Lab, stem: str, n: int, concurrency: int = 8) -> list[End | None]:
    """``n`` connections from ``stem``, ``concurrency`` at a time, each a whole exchange."""

    async def main() -> list[End | None]:
        ctx = client_context(lab.certs, stem)
        gate = asyncio.Semaphore(concurrency)

        async def one() -> End | None:
            async with gate:
                _, end = await exchange(lab.address, ctx)
                return end

        return list(await asyncio.gather(*(one() for _ in range(n))))

    return uvloop.run(main())


def by_worker(records: list[dict[str, object]]) -> Counter[object]:
    return Counter(r.get("worker") for r in records)


def test_connections_land_on_both_workers_and_the_counts_are_the_whole_proxys(lab: Lab) -> None:
    lab.start_upstreams(["echo"] * 3)
    lab.start_proxy(lab.config(workers=2))
    ends = burst(lab, "client.a", ATTEMPTS)
    assert set(ends) == {End.CLOSE_NOTIFY}
    lines = lab.logs.wait_for("access", count=ATTEMPTS)
    assert {r["decision"] for r in lines} == {"forwarded"}
    spread = by_worker(lines)
    assert set(spread) == {1, 2}, spread
    assert min(spread.values()) >= ATTEMPTS // 4, spread  # SO_REUSEPORT hashes 4-tuples
    assert len({r["conn"] for r in lines}) == ATTEMPTS  # ids unique across workers
    # Least connections over both workers' connections: all three upstreams served.
    assert set(Counter(r["upstream"] for r in lines)) == {u.address for u in lab.upstreams}
    # Health checks and their lines are the supervisor's alone.
    assert all("worker" not in r for r in lab.logs.events("health"))
    status, body = lab.admin_json("/status")
    assert status == 200
    assert body["connections"]["accepted"] == ATTEMPTS
    _, _, metrics = lab.admin("/metrics")
    assert f"l4proxy_connections_accepted_total {float(ATTEMPTS)}" in metrics.decode()
    assert (
        'l4proxy_connections_closed_total{decision="forwarded"} ' + str(float(ATTEMPTS))
        in metrics.decode()
    )
    assert lab.active() == [0, 0, 0]
    assert lab.open_connections() == 0


def test_one_token_bucket_for_both_workers(lab: Lab) -> None:
    """A burst client gets exactly ``burst`` connections proxy-wide: with a bucket per
    worker it would get up to twice that. (The refill, one token per 1,000 s, adds
    none during the test.)"""
    lab.start_upstreams(["echo"] * 2)
    rate_limit = {"enabled": True, "rate": 0.001, "burst": 7, "cleanup_interval": "1h"}
    lab.start_proxy(lab.config(workers=2, rate_limit=rate_limit))
    burst(lab, "client.b", 60, concurrency=6)
    lines = lab.logs.wait_for("access", count=60)
    decisions = Counter(r["decision"] for r in lines)
    assert decisions == {"forwarded": 7, "rate_limited": 53}, decisions
    limited = [r for r in lines if r["decision"] == "rate_limited"]
    assert set(by_worker(limited)) == {1, 2}  # both workers asked the one bucket
    assert lab.active() == [0, 0]


def test_admissions_replay_exactly_on_one_token_bucket(lab: Lab) -> None:
    """With a refill that matters (20 tokens/s, burst 5) and 100 connections over about
    two seconds from both workers, every admit decision the supervisor made is the one
    a single bucket makes when replayed at the same times: one bucket for the whole
    proxy, not one per worker (which would admit about twice as many)."""
    lab.start_upstreams(["echo"])
    rate_limit = {"enabled": True, "rate": 20, "burst": 5, "cleanup_interval": "1h"}
    proxy = lab.start_proxy(lab.config(workers=2, rate_limit=rate_limit))
    assert isinstance(proxy, Supervisor)
    decisions: list[tuple[float, int, bool]] = []  # (time, worker, admitted)
    admit = proxy.ledger.admit

    def recording(worker: int, conn: int, identity: str, now: float) -> Admission | Rejected:
        result = admit(worker, conn, identity, now)
        decisions.append((now, worker, isinstance(result, Admission)))
        return result

    proxy.ledger.admit = recording  # type: ignore[method-assign]
    burst(lab, "client.a", 100, concurrency=4)
    lab.logs.wait_for("access", count=100)
    assert len(decisions) == 100
    bucket = TokenBucket.full(20, 5, decisions[0][0])
    replayed = [bucket.take(now) for now, _, _ in decisions]
    assert replayed == [admitted for _, _, admitted in decisions]
    admitted = [worker for _, worker, ok in decisions if ok]
    refused = [worker for _, worker, ok in decisions if not ok]
    assert set(admitted) == {1, 2}
    assert set(refused) == {1, 2}
    span = decisions[-1][0] - decisions[0][0]
    assert len(admitted) <= 5 + 20 * span + 1


def test_max_concurrent_never_lets_a_fourth_stream_open(lab: Lab) -> None:
    lab.start_upstreams(["echo"] * 2)
    rate_limit = {"enabled": True, "rate": 1000, "burst": 1000, "max_concurrent": 3}
    lab.start_proxy(lab.config(workers=2, rate_limit=rate_limit))
    ctx = client_context(lab.certs, "client.c")

    async def main() -> tuple[list[bytes], bytes]:
        held = [await TlsClient.connect(lab.address, ctx) for _ in range(3)]
        for client in held:  # each one forwarding: its echo came back
            await client.send(b"ping")
            assert await client.recv() == b"ping"
        refused = []
        for _ in range(40):
            data, _ = await exchange(lab.address, ctx)
            refused.append(data)
        await held[0].aclose()
        lab.logs.wait_for("access", count=41)  # 40 refused + the one closed
        data, _ = await exchange(lab.address, ctx, b"again")
        for client in held[1:]:
            await client.aclose()
        return refused, data

    refused, data = uvloop.run(main())
    assert refused == [b""] * 40  # not one byte through
    assert data == b"again"
    lines = lab.logs.wait_for("access", count=44)
    limited = [r for r in lines if r["decision"] == "rate_limited"]
    assert len(limited) == 40
    assert {r["reason"] for r in limited} == {"max_concurrent"}
    assert set(by_worker(limited)) == {1, 2}
    assert lab.active() == [0, 0]


def test_max_connections_is_the_whole_proxys_and_so_are_its_capacity_lines(lab: Lab) -> None:
    """``max_connections: 2`` with one connection on each worker: the third is refused,
    and the capacity lines are the supervisor's, one per episode, with the whole
    proxy's counts (a worker wrote its own, with its own counts); ``available`` comes
    when either one closes."""
    lab.start_upstreams(["echo"])
    proxy = lab.start_proxy(lab.config(workers=2, max_connections=2))
    assert isinstance(proxy, Supervisor)
    ctx = client_context(lab.certs, "client.b")

    def workers_holding() -> set[int]:
        books = lab.proxy_loop.call(lambda: dict(proxy.ledger.books))
        return {slot for slot, book in books.items() if book.counted}

    async def main() -> bytes:
        held = [await TlsClient.connect(lab.address, ctx)]
        # A second connection on the other worker (SO_REUSEPORT hashes the 4-tuple:
        # a new source port is a new draw).
        for _ in range(40):
            client = await TlsClient.connect(lab.address, ctx)
            await client.send(b"x")
            assert await client.recv() == b"x"
            if len(workers_holding()) == 2:
                held.append(client)
                break
            await client.aclose()
            # Counted no more (else the next one would meet the cap): its close is in.
            wait_for("closed", lambda: lab.proxy_loop.call(lambda: proxy.ledger.connections) == 1)
        assert len(held) == 2, "40 connections in a row landed on one worker"
        refused = await read_plain(lab.address)  # closed at once, before any TLS
        await held[0].aclose()
        lab.logs.wait_for("capacity", state="available")
        for client in held[1:]:
            await client.aclose()
        return refused

    assert uvloop.run(main()) == b""
    (full,) = lab.logs.events("capacity", state="full")
    assert (full["open_connections"], full["max_connections"]) == (2, 2), full
    assert "worker" not in full  # the supervisor's line
    (available,) = lab.logs.events("capacity", state="available")
    assert (available["refused"], available["open_connections"]) == (1, 1), available
    (over,) = lab.logs.wait_for("access", decision="over_capacity")
    assert over["reason"] == "max_connections 2 reached"


def test_a_killed_worker_is_restarted_and_gives_back_its_slots(lab: Lab) -> None:
    lab.start_upstreams(["echo"] * 2)
    rate_limit = {"enabled": True, "rate": 1000, "burst": 1000, "max_concurrent": 4}
    proxy = lab.start_proxy(lab.config(workers=2, rate_limit=rate_limit))
    listening = lab.logs.wait_for("listening")[0]
    pids = listening["pids"]
    ctx = client_context(lab.certs, "client.d")

    async def hold(n: int) -> list[TlsClient]:
        clients = [await TlsClient.connect(lab.address, ctx) for _ in range(n)]
        for client in clients:
            await client.send(b"x")
            assert await client.recv() == b"x"
        return clients

    async def main() -> None:
        clients = await hold(4)  # max_concurrent: all of client.d's slots
        wait_for("four admitted", lambda: sum(lab.active()) == 4)
        os.kill(pids[0], signal.SIGKILL)
        exited = lab.logs.wait_for("worker_exited")[0]
        assert exited["worker"] == 1
        assert exited["signal"] == "SIGKILL"
        lab.logs.wait_for("worker_started", worker=1)
        # The dead worker's connections gave their slots back; the other's kept theirs.
        survivors = sum(lab.active())
        assert survivors == 4 - exited["released"]
        replaced = await hold(4 - survivors)  # room again, on either worker
        for client in clients + replaced:
            await client.aclose()

    uvloop.run(main())
    wait_for("all slots back", lambda: lab.active() == [0, 0])
    assert proxy.serving


def test_a_ticket_from_one_worker_resumes_on_the_other(lab: Lab) -> None:
    """Every worker has the supervisor's session ticket keys: a returning client resumes
    wherever its connection lands (with each worker's own keys, half would not)."""
    lab.start_upstreams(["echo"])
    lab.start_proxy(lab.config(workers=2))
    ctx = client_context(lab.certs, "client.b")
    reply, resumed, session = blocking_exchange(lab, ctx, b"first")
    assert (reply, resumed) == (b"first", False)
    results = [blocking_exchange(lab, ctx, b"again", session)[:2] for _ in range(16)]
    assert results == [(b"again", True)] * 16
    lines = lab.logs.wait_for("access", count=17)
    assert set(by_worker(lines[1:])) == {1, 2}  # resumed on both workers
    assert not lab.logs.events("error")


def test_a_reload_is_settled_once_every_worker_has_the_new_ca(lab: Lab, tmp_path: Path) -> None:
    """A reload is settled (what POST /reload waits for before it answers) once every
    worker has taken it: from then on it applies to every new connection, whichever
    worker accepts it. Each worker builds its own TLS context from the reload, so an
    answer before theirs would let a client reach a worker that still has the old CA.
    The workers are stopped (SIGSTOP) across the reload to make that window certain."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", workers=2)
    proxy = lab.start_proxy(path=path)
    pids = lab.logs.wait_for("listening")[0]["pids"]
    other = lab.certs / "other"
    tls = {"ca": str(other / "ca.pem"), "cert": str(other / "server.pem")}
    lab.write_config(path, workers=2, tls={**tls, "key": str(other / "server.key")})
    ctx = client_context(other, "client.a", ca=other / "ca.pem")

    async def reload_then_connect() -> list[End | None]:
        # On the supervisor's loop, as the admin listener does it.
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert proxy.reload().ok
            settled = asyncio.ensure_future(proxy.reload_settled())
            for _ in range(10):  # loop turns, not time: nothing can answer meanwhile
                await asyncio.sleep(0)
            assert not settled.done(), "settled while no worker could have taken it"
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        await asyncio.wait_for(settled, 10)
        ends = []
        for _ in range(6):  # at once; two at a time, so that both workers take some
            pair = await asyncio.gather(exchange(lab.address, ctx), exchange(lab.address, ctx))
            ends += [end for _, end in pair]
        return ends

    assert lab.proxy_loop.run(reload_then_connect()) == [End.CLOSE_NOTIFY] * 12
    lines = lab.logs.wait_for("access", count=12)
    assert {r["decision"] for r in lines} == {"forwarded"}, lines
    assert set(by_worker(lines)) == {1, 2}
    # The admin listener's POST /reload waits the same way before it answers.
    assert proxy.admin_address is not None
    status, body = adminctl.request(*proxy.admin_address, "POST", "/reload")
    assert (status, json.loads(body)["result"]) == (200, "ok"), body


def test_a_reload_names_the_worker_that_did_not_take_it_in_time(lab: Lab, tmp_path: Path) -> None:
    """A worker whose loop is blocked cannot take a reload. After the supervisor's settle
    timeout, POST /reload answers and names it, and so does the reload line: the answer
    neither waits for ever nor claims that every worker has the new config. Once the
    worker runs again it takes the next reload like the other."""
    lab.start_upstreams(["echo"])
    path = lab.write_config(tmp_path / "proxy.yaml", workers=2)
    proxy = lab.start_proxy(path=path)
    assert isinstance(proxy, Supervisor)
    proxy.settle_timeout = 0.5  # the deadline under test (10 s in production)
    stuck = lab.logs.wait_for("listening")[0]["pids"][1]  # worker 2's
    os.kill(stuck, signal.SIGSTOP)
    try:
        status, body = lab.admin_json("/reload", "POST")
    finally:
        os.kill(stuck, signal.SIGCONT)
    assert (status, body["result"], body["unanswered_workers"]) == (200, "ok", [2]), body
    assert "did not take the new config" in body["message"]
    (line,) = lab.logs.wait_for("reload")
    assert (line["result"], line["unanswered_workers"]) == ("ok", [2]), line

    status, body = lab.admin_json("/reload", "POST")
    assert (status, body["result"], body.get("unanswered_workers")) == (200, "ok", None), body
    again = lab.logs.wait_for("reload", count=2)[1]
    assert (again["result"], again.get("unanswered_workers")) == ("ok", None), again
    assert not lab.logs.events("error")


def test_drain_reaches_every_worker_and_waits_for_their_connections(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    proxy = lab.start_proxy(lab.config(workers=2, timeouts={"drain": "10s"}))
    ctx = client_context(lab.certs, "client.e")

    async def main() -> bytes:
        clients = [await TlsClient.connect(lab.address, ctx) for _ in range(6)]
        for client in clients:
            await client.send(b"before")
            assert await client.recv() == b"before"
        draining = asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(proxy.drain(10.0), lab.proxy_loop.loop)
        )
        lab.logs.wait_for("draining")
        # New connections are refused; open ones keep flowing until they end.
        for client in clients:
            await client.send(b"during")
            assert await client.recv() == b"during"
            await client.close_notify()
            await client.recv_all()
            await client.aclose()
        return str(await draining).encode()

    assert uvloop.run(main()) == b"drained"
    stopped = lab.logs.wait_for("stopped", where=lambda r: "worker" not in r)[0]
    assert stopped["reason"] == "drained"
    assert stopped["workers"] == 2
    lab.proxy = None  # stopped: nothing left for the harness to stop


def test_sigterm_to_the_whole_process_group_drains_instead_of_cutting(
    lab: Lab, tmp_path: Path
) -> None:
    """systemd stops a service by signalling every process in it, and Ctrl-C reaches the
    terminal's whole group: the workers leave it to the supervisor, so open streams
    still finish and the proxy exits 0 after the drain."""
    (upstream,) = lab.start_upstreams(["echo"])
    config = write_config(
        tmp_path / "proxy.yaml",
        lab.certs,
        [upstream.address],
        workers=2,
        timeouts={"drain": "20s"},
    )
    with subprocess.Popen(
        command(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(),
        start_new_session=True,  # its own process group, as under systemd
    ) as proc:
        child = Child(proc)
        try:
            child.wait_for("health", upstream=upstream.address, new="up")
            address = child.address()

            async def main() -> bytes:
                ctx = client_context(lab.certs, "client.b")
                clients = [await TlsClient.connect(address, ctx) for _ in range(4)]
                for client in clients:
                    await client.send(b"before")
                    assert await client.recv_exactly(6) == b"before"
                os.killpg(proc.pid, signal.SIGTERM)
                await asyncio.to_thread(child.wait_for, "draining")
                received = b""
                for client in clients:  # every stream still works, on either worker
                    await client.send(b"after")
                    received += await client.recv_exactly(5)
                    await client.close_notify()
                    await client.recv_all()
                    await client.aclose()
                return received

            assert uvloop.run(main()) == b"after" * 4
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            child.join()
    stopped = child.wait_for("stopped")
    assert (stopped["reason"], stopped["workers"]) == ("drained", 2)
    assert not child.events("worker_exited")
    ends = {r["reason"] for r in child.events("access")}
    assert ends == {"eof"}, ends
