"""Who gets where: authorization, rate limits, balancing, identities — through the proxy."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import uvloop

from tests.support.harness import Lab
from tests.support.loops import await_condition, wait_for
from tests.support.tlsclient import End, TlsClient, client_context, exchange

REPLY = "Reply from upstream "


def replies(lab: Lab, stem: str, n: int) -> list[str | None]:
    """``n`` sequential connections from ``stem``: the upstream named in each reply,
    or None when the proxy closed the connection without a reply."""

    async def main() -> list[str | None]:
        ctx = client_context(lab.certs, stem)
        names: list[str | None] = []
        for _ in range(n):
            data, end = await exchange(lab.address, ctx)
            assert end is End.CLOSE_NOTIFY, f"{stem}: stream ended with {end}"
            text = data.decode()
            names.append(text.removeprefix(REPLY) if text.startswith(REPLY) else None)
        return names

    return uvloop.run(main())


def reference_rules(lab: Lab) -> list[dict[str, object]]:
    u1, u2, _ = (u.address for u in lab.upstreams)
    return [
        {"client": "client.a", "action": "deny", "upstream": u1},
        {"client": "client.c", "action": "deny", "upstream": [u1, u2]},
    ]


def test_reference_authorization_table(lab: Lab) -> None:
    lab.start_upstreams(["reply"] * 3)
    lab.start_proxy(lab.config(authorization={"default": "allow", "rules": reference_rules(lab)}))
    assert set(replies(lab, "client.a", 6)) == {"u2", "u3"}
    assert set(replies(lab, "client.c", 6)) == {"u3"}
    assert set(replies(lab, "client.b", 6)) == {"u1", "u2", "u3"}  # ties rotate
    # CN 'Client.A' is client.a (X.509 names are case-insensitive): denied u1 as well.
    assert set(replies(lab, "mixedcase", 6)) == {"u2", "u3"}
    lines = lab.logs.wait_for("access", count=24)
    assert {r["decision"] for r in lines} == {"forwarded"}
    assert [r["client"] for r in lines[18:]] == ["client.a"] * 6  # the normalized form
    assert lab.active() == [0, 0, 0]


def test_no_allowed_upstream_is_denied_cleanly_and_costs_no_slot(lab: Lab) -> None:
    lab.start_upstreams(["reply"] * 2)
    rules = [{"client": "client.b", "action": "allow", "upstream": "*"}]
    lab.start_proxy(lab.config(authorization={"default": "deny", "rules": rules}))
    assert replies(lab, "client.d", 3) == [None, None, None]
    assert replies(lab, "client.b", 1) != [None]
    denied = lab.logs.wait_for("access", count=3, decision="denied")
    assert {r["reason"] for r in denied} == {"no_allowed_upstream"}
    assert all(r["client"] == "client.d" and r["upstream"] is None for r in denied)
    assert sum(u.stats.accepted - u.stats.empty for u in lab.upstreams) == 1
    assert lab.active() == [0, 0]


def test_no_healthy_upstream_is_a_different_outcome_from_denied(lab: Lab) -> None:
    lab.start_upstreams(["reply"] * 2)
    u1, u2 = (u.address for u in lab.upstreams)
    rules = [{"client": "client.c", "action": "deny", "upstream": u1}]
    lab.start_proxy(lab.config(authorization={"rules": rules}))
    lab.up_loop.run(lab.upstreams[1].stop())
    lab.logs.wait_for("health", upstream=u2, new="down")
    assert replies(lab, "client.c", 2) == [None, None]
    (line, _) = lab.logs.wait_for("access", count=2, decision="no_healthy_upstream")
    assert line["client"] == "client.c"
    assert replies(lab, "client.b", 1) == ["u1"]
    lab.logs.wait_for("access", decision="forwarded")  # its slot has been given back
    assert lab.active() == [0, 0]


def test_rate_limit_admits_the_burst_rejects_the_rest_and_spares_other_clients(lab: Lab) -> None:
    lab.start_upstreams(["reply"])
    lab.start_proxy(lab.config(rate_limit={"rate": 0.2, "burst": 4, "cleanup_interval": "1m"}))
    # 8 connections in well under a second: at 0.2 tokens/s no token comes back in time.
    got = replies(lab, "client.b", 8)
    assert got[:4] == ["u1"] * 4
    assert got[4:] == [None] * 4
    limited = lab.logs.wait_for("access", count=4, decision="rate_limited")
    assert len(limited) == 4
    assert {r["reason"] for r in limited} == {"rate"}
    # A refused connection cost no upstream slot: only admitted ones reached the upstream.
    upstream = lab.upstreams[0]
    assert upstream.stats.accepted - upstream.stats.empty == 4
    # Another identity has its own bucket.
    assert replies(lab, "client.e", 4) == ["u1"] * 4
    # (At once in one process; with workers, once the supervisor has the close.)
    wait_for("every slot back", lambda: lab.active() == [0])


def test_the_running_proxy_forgets_a_bucket_once_unused_and_full_again(lab: Lab) -> None:
    """The clean-up loop runs in the proxy (``rate_limit.cleanup_interval``): a client's
    bucket is forgotten once unused for the interval *and* full again, never sooner
    (forgetting it must not hand out tokens), and not much later either."""
    rate, burst, interval = 2.0, 2, 0.2
    lab.start_upstreams(["reply"])
    proxy = lab.start_proxy(
        lab.config(rate_limit={"rate": rate, "burst": burst, "cleanup_interval": "200ms"})
    )
    limiter = proxy.router.limiter
    assert replies(lab, "client.b", 2) == ["u1", "u1"]  # the whole burst: the bucket is empty

    seen: list[tuple[float, float, float, float]] = []  # last_used, tokens, updated, at
    gone_at: list[float] = []

    def forgotten() -> bool:
        def look() -> bool:
            now = proxy.loop.time()
            bucket = limiter.buckets.get("client.b")
            if bucket is None:
                gone_at.append(now)
                return True
            seen.append((bucket.last_used, bucket.tokens, bucket.updated, now))
            return False

        return lab.proxy_loop.call(look)

    wait_for("client.b's bucket forgotten", forgotten, timeout=5)
    assert seen, "the bucket was gone at the first look: too late to check when it went"
    last_used, tokens, updated, _ = seen[-1]
    full_again = updated + (burst - tokens) / rate
    # uvloop's clock is in whole milliseconds: one of slack.
    assert gone_at[0] >= last_used + interval - 0.001, (gone_at, seen[-1])
    assert gone_at[0] >= full_again - 0.001, (gone_at, full_again)
    # At the first clean-up after both hold (one interval apart), with slack for a busy box.
    assert gone_at[0] <= max(last_used + interval, full_again) + interval + 0.5, gone_at
    assert lab.proxy_loop.call(lambda: dict(limiter.buckets)) == {}
    # A client that comes back starts from a full bucket: its whole burst again.
    assert replies(lab, "client.b", 2) == ["u1", "u1"]


def test_max_concurrent_caps_open_connections_per_identity(lab: Lab) -> None:
    lab.start_upstreams(["hold"])
    lab.start_proxy(lab.config(rate_limit={"enabled": False, "max_concurrent": 2}))

    async def main() -> None:
        ctx = client_context(lab.certs, "client.b")
        held = [await TlsClient.connect(lab.address, ctx) for _ in range(2)]
        for client in held:
            await client.send(b"x")
        await await_condition("both held at the upstream", lambda: lab.carrying() == [2])
        data, end = await exchange(lab.address, ctx)
        assert (data, end) == (b"", End.CLOSE_NOTIFY)
        (line,) = lab.logs.wait_for("access", decision="rate_limited")
        assert line["reason"] == "max_concurrent"
        other = await TlsClient.connect(lab.address, client_context(lab.certs, "client.c"))
        await other.send(b"y")
        await held[0].aclose()
        lab.logs.wait_for("access", decision="forwarded")
        third = await TlsClient.connect(lab.address, ctx)  # a slot is free again
        await third.send(b"z")
        await await_condition("the freed slot used again", lambda: lab.carrying() == [3])
        for client in (held[1], other, third):
            await client.aclose()

    uvloop.run(main())
    lab.logs.wait_for("access", count=4, decision="forwarded")
    wait_for("every slot back", lambda: lab.active() == [0])
    assert lab.proxy_loop.call(lambda: dict(lab.proxy.router.limiter.open)) == {}  # type: ignore[union-attr]


def test_concurrent_connections_are_spread_exactly_by_least_connections(lab: Lab) -> None:
    """Counts are reserved at pick time, so 30 simultaneous connections land 10/10/10
    (a proxy that counted only after dialing would pile them onto one upstream)."""
    lab.start_upstreams(["hold"] * 3)
    lab.start_proxy()

    async def main() -> None:
        ctx = client_context(lab.certs, "client.b")
        clients = await asyncio.gather(*(TlsClient.connect(lab.address, ctx) for _ in range(30)))
        await asyncio.gather(*(c.send(b"x") for c in clients))
        await await_condition("30 connections at the upstreams", lambda: sum(lab.carrying()) >= 30)
        assert lab.active() == [10, 10, 10]
        assert lab.carrying() == [10, 10, 10]
        await asyncio.gather(*(c.aclose() for c in clients))

    uvloop.run(main())
    lab.logs.wait_for("access", count=30)
    assert lab.active() == [0, 0, 0]
    assert lab.open_connections() == 0


def test_identity_with_a_hyphen_matches_its_rule_exactly(lab: Lab) -> None:
    lab.start_upstreams(["reply"] * 3)
    u1, u2, _ = (u.address for u in lab.upstreams)
    rules = [
        {"client": "client-x", "action": "deny", "upstream": [u1, u2]},
        {"client": "client", "action": "deny", "upstream": "*"},  # a prefix: must not match
    ]
    lab.start_proxy(lab.config(authorization={"rules": rules}))
    assert set(replies(lab, "client-x", 4)) == {"u3"}
    lines = lab.logs.wait_for("access", count=4)
    assert {r["client"] for r in lines} == {"client-x"}


@pytest.mark.parametrize(
    ("source", "identity"),
    [("san_uri", "spiffe://layer4lab/client.a"), ("san_dns", "client.a"), ("cn", "client.a")],
)
def test_identity_source_is_configurable(lab: Lab, source: str, identity: str) -> None:
    lab.start_upstreams(["reply"] * 2)
    u1 = lab.upstreams[0].address
    tls = {
        "ca": str(lab.certs / "ca.pem"),
        "cert": str(lab.certs / "server.pem"),
        "key": str(lab.certs / "server.key"),
        "identity": source,
    }
    rules = [{"client": identity, "action": "deny", "upstream": u1}]
    lab.start_proxy(lab.config(tls=tls, authorization={"rules": rules}))
    assert set(replies(lab, "client.a", 3)) == {"u2"}
    (line, *_) = lab.logs.wait_for("access", count=3)
    assert line["client"] == identity


def test_consistent_hash_keeps_a_client_on_one_upstream(lab: Lab) -> None:
    lab.start_upstreams(["reply"] * 3)
    lab.start_proxy(lab.config(balancer="consistent_hash"))
    seen = {
        stem: Counter(replies(lab, stem, 5))
        for stem in ("client.a", "client.b", "client.c", "client.d", "client.e")
    }
    assert all(len(c) == 1 and None not in c for c in seen.values()), seen


@pytest.mark.parametrize("balancer", ["least_connections", "round_robin", "power_of_two"])
def test_every_balancer_spreads_sequential_connections(lab: Lab, balancer: str) -> None:
    lab.start_upstreams(["reply"] * 3)
    lab.start_proxy(lab.config(balancer=balancer))
    seen = Counter(replies(lab, "client.b", 60))
    if balancer == "power_of_two":
        assert set(seen) == {"u1", "u2", "u3"}, seen  # random: all seen, P(miss) ~ 1e-10
    else:
        assert seen == {"u1": 20, "u2": 20, "u3": 20}
    assert lab.active() == [0, 0, 0]
