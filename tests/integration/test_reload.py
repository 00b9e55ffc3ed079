"""Hot reload through a real proxy: new rules for new connections, open ones untouched,
invalid configs refused, certificates rotated."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import uvloop
from cryptography import x509

import certgen
from l4proxy.server import Proxy, ReloadResult
from tests.support.harness import Lab
from tests.support.tlsclient import End, TlsClient, client_context, exchange

REPLY = "Reply from upstream "


def reload(lab: Lab) -> ReloadResult:
    proxy = lab.proxy
    assert proxy is not None
    return lab.proxy_loop.call(proxy.reload)


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
