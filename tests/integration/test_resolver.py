"""Upstream names: dials never wait for DNS, and a hanging resolver cannot starve them;
discovered groups get every address of a name, or why there is none.

The first group drives :class:`l4proxy.resolver.Resolver` with a scripted lookup on a
real event loop; then the proxy resolves an upstream named ``localhost`` through the
real lookup (``loop.getaddrinfo``, answered offline by the hosts file); the last makes
every lookup hang, as Docker's resolver does for a stopped container's name.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import uvloop

from l4proxy.config import Address
from l4proxy.discovery import Answer, LookupFailed, Resolution
from l4proxy.resolver import Resolver
from tests.support.harness import Lab
from tests.support.loops import wait_for
from tests.support.tlsclient import End, client_context, exchange

NAME = Address("upstream.test", 8000)


class ScriptedLookup:
    """A lookup that answers from a queue the test fills (or never, to hang)."""

    def __init__(self) -> None:
        self.calls = 0
        self.answers: asyncio.Queue[str | BaseException] = asyncio.Queue()
        self.started = asyncio.Event()

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        self.started.set()
        answer = await self.answers.get()
        if isinstance(answer, BaseException):
            raise answer
        return [answer]


def test_one_lookup_at_a_time_and_the_cache_answers_while_it_hangs() -> None:
    async def main() -> None:
        lookup = ScriptedLookup()
        resolver = Resolver(asyncio.get_running_loop(), lookup)
        assert resolver.refresh(NAME) is resolver.refresh(NAME)  # one lookup in flight
        first = asyncio.ensure_future(resolver.resolve(NAME))
        second = asyncio.ensure_future(resolver.resolve(NAME))
        await lookup.started.wait()  # the lookup is in flight; both callers wait on it
        lookup.answers.put_nowait("10.0.0.7")
        assert await first == await second == "10.0.0.7"
        assert lookup.calls == 1  # both waited for that same lookup
        assert resolver.cached(NAME) == "10.0.0.7"
        # Now the resolver hangs: answers come from the cache, one lookup stays pending.
        for _ in range(5):
            assert await asyncio.wait_for(resolver.resolve(NAME), 1) == "10.0.0.7"
        assert lookup.calls == 2
        lookup.answers.put_nowait("10.0.0.8")  # the pending lookup ends: a new address
        await resolver.pending[NAME]
        assert resolver.cached(NAME) == "10.0.0.8"
        resolver.cancel()

    uvloop.run(main())


@pytest.mark.parametrize(
    ("error", "kept"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), False),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
    ],
)
def test_a_name_that_is_gone_drops_its_address_a_temporary_failure_keeps_it(
    error: socket.gaierror, kept: bool
) -> None:
    async def main() -> tuple[str | None, list[tuple[Address, str | None]]]:
        lookup = ScriptedLookup()
        resolver = Resolver(asyncio.get_running_loop(), lookup)
        changes: list[tuple[Address, str | None]] = []
        resolver.changed = lambda address, ip: changes.append((address, ip))
        lookup.answers.put_nowait("10.0.0.7")
        await resolver.resolve(NAME)
        lookup.answers.put_nowait(error)
        with pytest.raises(socket.gaierror):
            await resolver.refresh(NAME)
        return resolver.cached(NAME), changes

    cached, changes = uvloop.run(main())
    assert cached == ("10.0.0.7" if kept else None)
    assert changes == [(NAME, "10.0.0.7")] + ([] if kept else [(NAME, None)])


def test_ip_literals_are_never_looked_up() -> None:
    async def main() -> None:
        lookup = ScriptedLookup()
        resolver = Resolver(asyncio.get_running_loop(), lookup)
        assert await resolver.resolve(Address("::1", 1)) == "::1"
        assert resolver.cached(Address("127.0.0.1", 1)) == "127.0.0.1"
        assert lookup.calls == 0

    uvloop.run(main())


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (["10.0.0.2", "10.0.0.1", "10.0.0.2"], Answer(("10.0.0.2", "10.0.0.1"))),
        ([], Answer(())),
        (socket.gaierror(socket.EAI_NODATA, "No address associated with hostname"), Answer(())),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            LookupFailed("dns: Name or service not known"),
        ),
        (
            socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"),
            LookupFailed("dns: Temporary failure in name resolution"),
        ),
        (TimeoutError(), LookupFailed("timeout")),
    ],
    ids=["answer", "empty-list", "nodata", "nxdomain", "again", "timeout"],
)
def test_a_groups_lookup_is_a_value_every_address_or_why_none(
    outcome: list[str] | BaseException, expected: Resolution
) -> None:
    """What a discovered group gets from one lookup: every address (each once, in the
    system's order), an empty answer when the name exists without address records, or
    the failure (the name does not exist, the resolver failed or timed out)."""

    async def lookup(host: str, port: int) -> list[str]:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def main() -> Resolution:
        return await Resolver(asyncio.get_running_loop(), lookup).resolution(NAME)

    assert uvloop.run(main()) == expected


def test_a_group_and_a_named_upstream_share_one_lookup_per_name() -> None:
    """A named upstream and a group naming the same name wait for the same lookup; the
    upstream dials the first address, the group gets them all."""

    async def main() -> None:
        lookup = ScriptedLookup()
        resolver = Resolver(asyncio.get_running_loop(), lookup)
        changes: list[tuple[Address, str | None]] = []
        resolver.changed = lambda address, ip: changes.append((address, ip))
        first = asyncio.ensure_future(resolver.resolve(NAME))
        group = asyncio.ensure_future(resolver.resolution(NAME))
        await lookup.started.wait()
        lookup.answers.put_nowait("10.0.0.7")
        assert await first == "10.0.0.7"
        assert await group == Answer(("10.0.0.7",))
        assert lookup.calls == 1
        assert changes == [(NAME, "10.0.0.7")]
        # A group's lookup alone updates no named upstream's address.
        again = asyncio.ensure_future(resolver.resolution(NAME))
        lookup.answers.put_nowait("10.0.0.8")
        assert await again == Answer(("10.0.0.8",))
        assert resolver.cached(NAME) == "10.0.0.7"
        assert changes == [(NAME, "10.0.0.7")]
        assert await resolver.resolution(Address("10.1.2.3", 80)) == Answer(("10.1.2.3",))
        assert lookup.calls == 2
        resolver.cancel()

    uvloop.run(main())


def test_a_name_is_resolved_by_the_real_lookup_checked_and_served(lab: Lab) -> None:
    """Nothing scripted: the proxy asks the system for ``localhost`` through the
    resolver's own ``loop.getaddrinfo`` path, logs the address it found, checks the
    upstream there and dials it for clients."""
    # What the system answers first for localhost (127.0.0.1, or ::1 on some hosts):
    # the upstream listens there, so the test holds wherever localhost points.
    expected = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0][4][0]
    (upstream,) = lab.start_upstreams(["reply"], host=str(expected))
    named = f"localhost:{upstream.port}"
    proxy = lab.start_proxy(lab.config([named]))
    # The real lookup is in force: no test replaced it.
    assert lab.proxy_loop.call(lambda: proxy.resolver.lookup == proxy.resolver._getaddrinfo)
    (checked,) = lab.logs.wait_for("health", upstream=named)  # after the lookup
    assert (checked["old"], checked["new"], checked["reason"]) == ("unknown", "up", "connected")
    (resolved,) = lab.logs.events("resolve", upstream=named)
    assert resolved["address"] == expected
    key = Address("localhost", upstream.port)
    assert lab.proxy_loop.call(lambda: proxy.resolver.cached(key)) == expected

    ctx = client_context(lab.certs, "client.b")
    data, end = uvloop.run(exchange(lab.address, ctx))
    assert (data, end) == (b"Reply from upstream u1", End.CLOSE_NOTIFY)
    (line,) = lab.logs.wait_for("access", decision="forwarded")
    assert (line["upstream"], line["reason"]) == (named, "eof")
    # Later checks look the name up again (one at a time) and find the same address:
    # no second resolve line, which is written only when the address changes.
    wait_for(
        "two more passing checks",
        lambda: lab.proxy_loop.call(lambda: proxy.stats.checks[named].ok) >= 3,
    )
    assert len(lab.logs.events("resolve")) == 1
    assert lab.logs.events("health", new="down") == []


def test_a_hanging_resolver_does_not_stop_clients_or_checks(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The defect this prevents: with names resolved on every dial, one upstream whose
    name hangs in DNS filled libuv's worker threads, every dial to the healthy upstreams
    timed out, and they were all marked down: a total outage.

    The upstream is named ``upstream.invalid`` (a name no real resolver answers, RFC
    6761): the scripted lookup answers 127.0.0.1 once, then hangs. Clients reaching the
    upstream prove that dials use the address from the cache and never ask DNS."""
    lookups: list[str] = []

    async def scripted(_self: Resolver, host: str, port: int) -> list[str]:
        lookups.append(host)
        if len(lookups) == 1:
            return ["127.0.0.1"]
        await asyncio.Event().wait()  # hangs until the proxy stops (cancelled)
        raise AssertionError("unreachable")

    monkeypatch.setattr(Resolver, "_getaddrinfo", scripted)
    (upstream,) = lab.start_upstreams(["reply"])
    named = f"upstream.invalid:{upstream.port}"
    proxy = lab.start_proxy(lab.config([named]))
    (resolved,) = lab.logs.wait_for("resolve", upstream=named)
    assert resolved["address"] == "127.0.0.1"
    checks_before = lab.proxy_loop.call(lambda: proxy.stats.checks[named].ok)

    async def clients() -> list[tuple[bytes, End | None]]:
        ctx = client_context(lab.certs, "client.b")
        return [await exchange(lab.address, ctx) for _ in range(5)]

    results = uvloop.run(clients())
    assert all(data == b"Reply from upstream u1" for data, _ in results), results
    wait_for(
        "three more passing checks while the lookup hangs",
        lambda: lab.proxy_loop.call(lambda: proxy.stats.checks[named].ok) >= checks_before + 3,
    )
    assert lookups == ["upstream.invalid", "upstream.invalid"]  # one hanging, not one per check
    assert lab.health() == ["up"]
    assert lab.logs.events("health", new="down") == []
    assert lab.logs.events("access", decision="forwarded") != []
