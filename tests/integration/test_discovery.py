"""Upstreams discovered through DNS, through a real proxy, real TLS and real upstreams on
loopback (127.0.0.1-127.0.0.5, one port): the name's records change while clients come
and go, and traffic follows; members that leave finish what they carry.

DNS is the test's: the proxy's resolver takes a ``lookup`` callable, here a
:class:`Records` whose answer the test replaces. The last test uses the system's own
``getaddrinfo`` for ``localhost``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import uvloop

from l4proxy.server import Proxy
from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, TlsClient, client_context, exchange

HOSTS = [f"127.0.0.{i}" for i in range(1, 6)]
INTERVAL = 0.3  # health_check.interval: checks of each member, and lookups of the name
NAME = "upstream.test"  # never resolved by the system: Records answers


class Records:
    """The test's DNS for one name: the addresses it answers now (or the error it
    raises), replaced by the test while the proxy runs (an attribute assignment, so
    the proxy's thread sees one answer or the other, never half of one)."""

    def __init__(self, *ips: str) -> None:
        self.answer: list[str] | BaseException = list(ips)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        assert host == NAME
        self.calls += 1
        answer = self.answer
        if isinstance(answer, BaseException):
            raise answer
        return list(answer)


def group_config(lab: Lab, port: int, **overrides: Any) -> dict[str, Any]:
    return lab.config_raw(
        [{"discover": f"{NAME}:{port}", "name": "up"}],
        health_check={"interval": f"{int(INTERVAL * 1000)}ms", "timeout": "1s"},
        **overrides,
    )


def key(host: str, port: int) -> str:
    return f"{host}:{port}"


def group_lines(lab: Lab) -> list[dict[str, Any]]:
    return lab.logs.events("resolve", group="up")


def wait_resolved(lab: Lab, count: int, timeout: float = 10.0) -> dict[str, Any]:
    """The ``count``-th resolve line of the group (lookups run every INTERVAL)."""
    return lab.logs.wait_for("resolve", count=count, timeout=timeout, group="up")[count - 1]


def wait_line(lab: Lab, **match: Any) -> dict[str, Any]:
    """The group's first resolve line with these fields."""
    return lab.logs.wait_for("resolve", group="up", **match)[0]


def wait_up(lab: Lab, keys: list[str]) -> dict[str, dict[str, Any]]:
    """Each member's first health line (all ``unknown -> up``), by key."""
    lines: dict[str, dict[str, Any]] = {}
    for member in keys:
        (line, *_) = lab.logs.wait_for("health", upstream=member)
        assert (line["old"], line["new"], line["source"]) == ("unknown", "up", "active"), line
        lines[member] = line
    return lines


def when(line: dict[str, Any]) -> dt.datetime:
    return dt.datetime.fromisoformat(str(line["ts"]).replace("Z", "+00:00"))


def started(line: dict[str, Any]) -> dt.datetime:
    """When an access line's connection was accepted."""
    return when(line) - dt.timedelta(milliseconds=float(line["duration_ms"]))


def pool_counts(lab: Lab, proxy: Proxy) -> tuple[dict[str, int], dict[str, int]]:
    """Open connections per upstream in the pool, and per retired upstream."""
    pool = proxy.router.pool
    return lab.proxy_loop.call(
        lambda: (
            {u.key: n for u, n in zip(pool.upstreams, pool.active, strict=True)},
            dict(pool.retired),
        )
    )


def running_loops(lab: Lab, proxy: Proxy) -> list[str]:
    return lab.proxy_loop.call(
        lambda: sorted(
            task.get_name()
            for task in asyncio.all_tasks(proxy.loop)
            if task.get_name().startswith(("health-", "discover-")) and not task.done()
        )
    )


async def ping(lab: Lab, payload: bytes = b"ping") -> bytes:
    data, end = await exchange(lab.address, client_context(lab.certs, "client.b"), payload)
    assert end is End.CLOSE_NOTIFY, (data, end)
    return data


async def echo(client: TlsClient, payload: bytes) -> bytes:
    """Send ``payload`` and read its echo at the same time (flow control both ways)."""
    sender = asyncio.ensure_future(client.send(payload))
    received = await client.recv_exactly(len(payload))
    await sender
    return received


async def finish(client: TlsClient) -> tuple[bytes, End | None]:
    await client.close_notify()
    rest = await client.recv_all()
    return rest, client.end


def test_records_changing_from_3_to_5_to_1_move_traffic_and_removed_members_finish(
    lab: Lab,
) -> None:
    """The done-when: a name whose records go from 3 to 5 to 1 addresses moves traffic
    accordingly, and an open stream to a removed member completes byte-exact.

    Three streams are opened on the three first members and held. After 3 -> 5 the two
    new members get the next connections within one interval of their first passing
    check (least connections: they carry nothing). After 5 -> 1 no new connection goes
    to a removed member, the two held streams on removed members are retired (counted
    apart, in /status too) and each then moves 1 MiB each way byte-exact; in the end no
    count is left anywhere."""
    upstreams = lab.start_upstreams_on(HOSTS, "echo")
    port = upstreams[0].port
    k1, k2, k3, k4, k5 = (key(h, port) for h in HOSTS)
    records = Records(*HOSTS[:3])
    proxy = lab.start_proxy(
        lab.config(**group_config(lab, port)), wait_healthy=False, lookup=records
    )
    first = wait_resolved(lab, 1)
    assert (first["result"], first["added"], first["removed"]) == ("ok", [k1, k2, k3], [])
    assert (first["members"], first["discover"], first["ignored"]) == (
        [k1, k2, k3],
        f"{NAME}:{port}",
        [],
    )
    wait_up(lab, [k1, k2, k3])
    payloads = [os.urandom(1 << 20) for _ in range(3)]

    Streams = list[tuple[bytes, bytes, End | None]]

    async def main() -> tuple[Streams, dict[str, Any]]:
        ctx = client_context(lab.certs, "client.b")
        held = [await TlsClient.connect(lab.address, ctx) for _ in range(3)]
        try:
            for i, client in enumerate(held):
                assert await echo(client, b"first %d" % i) == b"first %d" % i
            active, retired = pool_counts(lab, proxy)
            assert (active, retired) == ({k1: 1, k2: 1, k3: 1}, {})

            # 3 -> 5: the new members are checked at once, then carry the next connections.
            records.answer = list(HOSTS)
            grown = await asyncio.to_thread(wait_resolved, lab, 2)
            assert (grown["added"], grown["removed"]) == ([k4, k5], [])
            assert grown["members"] == [k1, k2, k3, k4, k5]
            up = await asyncio.to_thread(wait_up, lab, [k4, k5])
            assert await ping(lab) == b"ping"
            assert await ping(lab) == b"ping"
            lines = await asyncio.to_thread(lab.logs.wait_for, "access", 2)
            assert sorted(line["upstream"] for line in lines) == [k4, k5]
            for line in lines:
                late = (started(line) - when(up[line["upstream"]])).total_seconds()
                assert late < INTERVAL, (line, up[line["upstream"]])

            # 5 -> 1: the four others are retired; two of them still carry a stream.
            records.answer = [HOSTS[0]]
            shrunk = await asyncio.to_thread(wait_resolved, lab, 3)
            assert (shrunk["added"], shrunk["removed"]) == ([], [k2, k3, k4, k5])
            assert shrunk["members"] == [k1]
            assert pool_counts(lab, proxy) == ({k1: 1}, {k2: 1, k3: 1})
            status = (await asyncio.to_thread(lab.admin_json, "/status"))[1]
            for _ in range(6):
                assert await ping(lab, b"after") == b"after"

            results = []
            for client, payload in zip(held, payloads, strict=True):
                received = await echo(client, payload)
                rest, end = await finish(client)
                results.append((received, rest, end))
            return results, status
        finally:
            for client in held:
                await client.aclose()

    results, status = uvloop.run(main())
    for (received, rest, end), payload in zip(results, payloads, strict=True):
        assert received == payload  # 1 MiB, byte-exact, also through retired members
        assert (rest, end) == (b"", End.CLOSE_NOTIFY)
    # Connections that carried bytes, per upstream: u1 its stream and the six after the
    # change; u2 and u3 their stream; u4 and u5 one ping each before it; none since.
    # (An echo upstream keeps a connection both sides half-closed: open or not, count it.)
    carried = lab.up_loop.call(lambda: [u.carrying() + len(u.stats.received) for u in upstreams])
    assert carried == [7, 1, 1, 1, 1]

    assert [g["name"] for g in status["groups"]] == ["up"]
    (group,) = status["groups"]
    assert group["members"] == [{"name": "up@127.0.0.1", "address": k1}]
    assert group["discover"] == f"{NAME}:{port}"
    assert group["last_lookup"]["result"] == "ok"
    assert [(u["name"], u["address"], u["group"]) for u in status["upstreams"]] == [
        ("up@127.0.0.1", k1, "up")
    ]
    assert status["retired_upstreams"] == [
        {"address": k2, "active_connections": 1},
        {"address": k3, "active_connections": 1},
    ]

    lines = lab.logs.wait_for("access", count=11)
    after = [line for line in lines if line["bytes_up"] == 5]
    assert [line["upstream"] for line in after] == [k1] * 6  # no new one to a removed member
    streams = [line for line in lines if line["bytes_up"] > 5]
    assert sorted(line["upstream"] for line in streams) == [k1, k2, k3]
    for line in streams:
        assert (line["decision"], line["reason"]) == ("forwarded", "eof")
        assert line["bytes_up"] == line["bytes_down"] == len(b"first 0") + (1 << 20)
        assert line["upstream_name"] == "up@" + line["upstream"].rsplit(":", 1)[0]
    assert all(line["decision"] == "forwarded" for line in lines)

    # Nothing is left counted, and only the member's check loop and the lookups run.
    assert pool_counts(lab, proxy) == ({k1: 0}, {})
    assert lab.active() == [0]
    assert lab.open_connections() == 0
    assert running_loops(lab, proxy) == ["discover-up", "health-up@127.0.0.1"]
    assert len(group_lines(lab)) == 3  # one line per change; repeated answers are quiet
    assert lab.logs.events("health", new="down") == []
    _, _, metrics = lab.admin("/metrics")
    text = metrics.decode()
    assert 'l4proxy_discovered_members{group="up"} 1.0' in text
    assert f'l4proxy_upstream_active_connections{{name="up@127.0.0.1",upstream="{k1}"}} 0.0' in text
    assert 'l4proxy_discovery_lookups_total{group="up",result="ok"}' in text


def test_a_failed_lookup_keeps_the_members_and_an_empty_answer_retires_them(lab: Lab) -> None:
    """NXDOMAIN and a resolver that fails keep the last members (and traffic keeps
    flowing to them); an answer with no records retires them all (new clients get
    ``no_healthy_upstream``, an open stream finishes); records that come back are
    members again, under the same names, checked afresh."""
    upstreams = lab.start_upstreams_on(HOSTS[:2], "echo")
    port = upstreams[0].port
    k1, k2 = (key(h, port) for h in HOSTS[:2])
    records = Records(*HOSTS[:2])
    proxy = lab.start_proxy(
        lab.config(**group_config(lab, port)), wait_healthy=False, lookup=records
    )
    wait_resolved(lab, 1)
    wait_up(lab, [k1, k2])

    def members() -> list[str]:
        return lab.proxy_loop.call(lambda: [u.key for u in proxy.router.groups["up"].members])

    async def main() -> None:
        held = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            assert await echo(held, b"before") == b"before"
            for error in (
                socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
                socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            ):
                records.answer = error
                line = await asyncio.to_thread(wait_line, lab, reason=f"dns: {error.strerror}")
                assert (line["result"], line["added"], line["removed"]) == ("failed", [], [])
                assert line["members"] == [k1, k2]
                assert members() == [k1, k2]
                assert await ping(lab) == b"ping"  # still served by the members

            # The name exists but has no records: every member retires.
            records.answer = socket.gaierror(socket.EAI_NODATA, "No address associated")
            empty = await asyncio.to_thread(wait_line, lab, result="empty")
            assert (empty["removed"], empty["members"]) == ([k1, k2], [])
            assert empty["reason"] == "no address records"
            assert members() == []
            assert sum(pool_counts(lab, proxy)[1].values()) == 1  # the held stream
            data, end = await exchange(lab.address, client_context(lab.certs, "client.b"))
            assert (data, end) == (b"", End.CLOSE_NOTIFY)  # refused, cleanly
            assert await echo(held, b"still here") == b"still here"
            assert await finish(held) == (b"", End.CLOSE_NOTIFY)

            # The records come back: the same names, checked at once, served again.
            checks = lab.logs.events("health")
            records.answer = [HOSTS[1]]
            back = await asyncio.to_thread(wait_line, lab, result="ok", added=[k2])
            assert back["members"] == [k2]
            before = len([c for c in checks if c["upstream"] == k2])
            await asyncio.to_thread(
                lambda: lab.logs.wait_for("health", count=before + 1, upstream=k2)
            )
            assert await ping(lab) == b"ping"
        finally:
            await held.aclose()

    uvloop.run(main())
    refused = lab.logs.wait_for("access", decision="no_healthy_upstream")
    assert refused[0]["reason"] == "discovered group up has no members"
    lines = lab.logs.wait_for("access", decision="forwarded", count=4)
    assert lines[-1]["upstream"] == k2
    assert lines[-1]["upstream_name"] == "up@127.0.0.2"
    # The member that came back started unknown again (a new member for its health).
    comeback = lab.logs.events("health", upstream=k2)[-1]
    assert (comeback["old"], comeback["new"]) == ("unknown", "up")
    assert pool_counts(lab, proxy) == ({k2: 0}, {})
    assert lab.open_connections() == 0
    statuses = [(r["result"], r["reason"]) for r in group_lines(lab)]
    assert statuses == [
        ("ok", "answer"),
        ("failed", "dns: Name or service not known"),
        ("failed", "dns: Temporary failure in name resolution"),
        ("empty", "no address records"),
        ("ok", "answer"),
    ]


def test_a_reload_keeps_a_kept_groups_members_and_retires_a_removed_groups(
    lab: Lab, tmp_path: Path
) -> None:
    """Reloading with the group kept keeps its members (no new check from unknown, the
    open connection still counted on its member) and the rules apply to them; reloading
    without it retires its members: the open stream finishes, the counts empty, the
    group's loops stop."""
    upstreams = lab.start_upstreams_on(HOSTS[:3], "echo")
    port = upstreams[0].port
    k1, k2, k3 = (key(h, port) for h in HOSTS[:3])
    records = Records(*HOSTS[:2])
    path = tmp_path / "proxy.yaml"
    lab.write_config(path, **group_config(lab, port))
    proxy = lab.start_proxy(path=path, wait_healthy=False, lookup=records)
    wait_resolved(lab, 1)
    wait_up(lab, [k1, k2])

    def reload() -> None:
        assert lab.proxy_loop.call(proxy.reload).ok

    async def main() -> None:
        held = await TlsClient.connect(lab.address, client_context(lab.certs, "client.b"))
        try:
            assert await echo(held, b"one") == b"one"
            (on,) = [k for k, n in pool_counts(lab, proxy)[0].items() if n == 1]
            health_lines = len(lab.logs.events("health"))

            # Kept, with a rule naming the group: client.c may not reach its members.
            deny_c = {"rules": [{"client": "client.c", "action": "deny", "upstream": "up"}]}
            lab.write_config(path, **group_config(lab, port, authorization=deny_c))
            await asyncio.to_thread(reload)
            assert pool_counts(lab, proxy) == ({k1: int(on == k1), k2: int(on == k2)}, {})
            assert lab.health() == ["up", "up"]
            assert len(lab.logs.events("health")) == health_lines  # no one checked afresh
            data, _ = await exchange(lab.address, client_context(lab.certs, "client.c"))
            assert data == b""
            assert await ping(lab) == b"ping"

            # Dropped: the group's members retire; a fixed upstream takes over.
            lab.write_config(path, [k3], health_check={"interval": "300ms"})
            await asyncio.to_thread(reload)
            assert pool_counts(lab, proxy) == ({k3: 0}, {on: 1})
            assert await echo(held, b"two") == b"two"
            assert await finish(held) == (b"", End.CLOSE_NOTIFY)
        finally:
            await held.aclose()

    uvloop.run(main())
    denied = lab.logs.wait_for("access", decision="denied")
    assert denied[0]["client"] == "client.c"
    wait_for("the retired member's last connection", lambda: pool_counts(lab, proxy)[1] == {})
    assert lab.proxy_loop.call(lambda: dict(proxy.router.groups)) == {}
    wait_for("the group's loops to end", lambda: running_loops(lab, proxy) == [f"health-{k3}"])
    reloads = lab.logs.events("reload")
    assert [(r["added"], r["removed"]) for r in reloads] == [([], []), ([k3], [k1, k2])]
    assert reloads[-1]["groups"] == {}
    assert lab.open_connections() == 0


def test_localhost_as_a_discovered_name_through_the_real_getaddrinfo(lab: Lab) -> None:
    """Nothing scripted: the group's name is ``localhost``, looked up by the system's
    ``getaddrinfo`` (answered offline from the hosts file). Its members are every
    address the system gives, each with an upstream listening on it."""
    port_probe = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    hosts = list(dict.fromkeys(str(info[4][0]) for info in port_probe))
    upstreams = lab.start_upstreams_on(hosts, "reply")
    port = upstreams[0].port
    keys = [u.address for u in upstreams]
    config = lab.config([{"discover": f"localhost:{port}", "name": "local"}])
    proxy = lab.start_proxy(config, wait_healthy=False)
    assert lab.proxy_loop.call(lambda: proxy.resolver.lookup == proxy.resolver._getaddrinfo)
    (line,) = lab.logs.wait_for("resolve", group="local")
    assert (line["result"], line["discover"]) == ("ok", f"localhost:{port}")
    assert sorted(line["added"]) == sorted(line["members"]) == sorted(keys)
    for member in keys:
        lab.logs.wait_for("health", upstream=member, new="up")
    data, end = uvloop.run(exchange(lab.address, client_context(lab.certs, "client.b")))
    assert data.startswith(b"Reply from upstream u")
    assert end is End.CLOSE_NOTIFY
    (access,) = lab.logs.wait_for("access", decision="forwarded")
    assert access["upstream"] in keys
    assert access["upstream_name"].startswith("local@")
    _, status = lab.admin_json("/status")
    assert sorted(m["address"] for m in status["groups"][0]["members"]) == sorted(keys)


@pytest.mark.parametrize("hosts", [HOSTS[:1]])
def test_an_address_a_fixed_upstream_has_is_not_a_member(lab: Lab, hosts: list[str]) -> None:
    """One address, one upstream: a record naming a fixed upstream's address is
    ignored (said in the resolve line), not made a second upstream with the same key."""
    (upstream,) = lab.start_upstreams_on(hosts, "reply")
    records = Records(hosts[0])
    config = lab.config(
        [upstream.address, {"discover": f"{NAME}:{upstream.port}", "name": "up"}],
        health_check={"interval": "300ms"},
    )
    proxy = lab.start_proxy(config, lookup=records)
    (line,) = lab.logs.wait_for("resolve", group="up")
    assert (line["added"], line["members"], line["ignored"]) == ([], [], [upstream.address])
    assert lab.proxy_loop.call(lambda: [u.key for u in proxy.router.pool.upstreams]) == [
        upstream.address
    ]
