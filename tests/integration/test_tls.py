"""mTLS at the door: who is refused, how it is logged, and that bad clients cost
nobody else anything."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.support.harness import Lab
from tests.support.tlsclient import End, TlsClient, client_context, exchange


async def attempt(address: tuple[str, int], ctx: ssl.SSLContext) -> tuple[bytes, str]:
    """What a client gets: (bytes received, how it ended or the handshake error)."""
    try:
        data, end = await exchange(address, ctx)
    except ssl.SSLError as exc:
        return b"", f"handshake: {exc.reason}"
    except ConnectionError as exc:
        return b"", f"handshake: {exc!r}"
    return data, str(end)


def bad_context(certs: Path, case: str) -> ssl.SSLContext:
    if case == "no_certificate":
        return client_context(certs, None)
    if case == "other_ca":
        ctx = client_context(certs, None)
        ctx.load_cert_chain(
            str(certs / "other" / "client.a.pem"), str(certs / "other" / "client.a.key")
        )
        return ctx
    return client_context(certs, case)  # expired, noeku, servereku, server


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no_certificate", "peer_did_not_return_a_certificate"),
        ("other_ca", "certificate: unable to get local issuer certificate"),
        ("expired", "certificate: certificate has expired"),
        ("server", "certificate: unsuitable certificate purpose"),  # the proxy's own cert
        ("servereku", "certificate: unsuitable certificate purpose"),
        ("noeku", "client_auth_eku_missing"),
        ("trailingspace", "identity_has_whitespace: U+0020 at 8"),  # CN 'client.a '
        ("cyrillic", "identity_not_ascii: U+0441 at 0"),  # CN 'client.a', Cyrillic c
    ],
)
def test_bad_client_is_refused_logged_and_never_reaches_an_upstream(
    lab: Lab, case: str, reason: str
) -> None:
    lab.start_upstreams(["reply"])
    lab.start_proxy()
    data, how = uvloop.run(attempt(lab.address, bad_context(lab.certs, case)))
    assert data == b""
    assert how != str(End.CLOSE_NOTIFY) or case == "noeku", how
    if reason.startswith("identity_"):
        # The chain is good, so the client's TLS 1.3 handshake is over before the proxy
        # reads the identity: it sees no byte and a bare FIN, never close_notify.
        assert how == str(End.TCP_EOF), how
    (line,) = lab.logs.wait_for("access", decision="tls_failed")
    assert line["reason"] == reason
    assert line["client"] is None
    assert line["upstream"] is None
    upstream = lab.upstreams[0]
    assert upstream.stats.accepted == upstream.stats.empty  # health checks only
    # ...and a good client is served right after.
    good, end = uvloop.run(exchange(lab.address, client_context(lab.certs, "client.b")))
    assert good == b"Reply from upstream u1"
    assert end is End.CLOSE_NOTIFY
    lab.logs.wait_for("access", decision="forwarded")  # its slot has been given back
    assert lab.active() == [0]


async def raw_send(address: tuple[str, int], payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    writer.write(payload)
    try:
        async with asyncio.timeout(10):
            return await reader.read()
    except ConnectionResetError:
        return b"<reset>"
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "http_request"),
        (bytes(range(256)) * 4, "wrong_version_number"),
        (b"\x16\x03\x01\x00\x05hello", "unexpected_message"),  # a record, not a ClientHello
    ],
    ids=["http", "binary_garbage", "truncated_record"],
)
def test_garbage_is_refused_without_harm(lab: Lab, payload: bytes, reason: str) -> None:
    lab.start_upstreams(["reply"])
    lab.start_proxy(lab.config(timeouts={"handshake": "1s"}))
    uvloop.run(raw_send(lab.address, payload))
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("tls_failed", reason)
    assert lab.open_connections() == 0
    good, _ = uvloop.run(exchange(lab.address, client_context(lab.certs, "client.b")))
    assert good == b"Reply from upstream u1"


def test_silent_clients_are_cut_at_the_handshake_timeout_and_delay_nobody(lab: Lab) -> None:
    """Cut at the configured timeout: not before it, and not at the 5 s default either
    (the upper bounds are well under 5 s, measured by the clients and in the log)."""
    timeout = 1.5  # long enough for a good client to be served before any cut
    margin = 1.0  # cut within timeout + margin; the default (5 s) is far beyond
    lab.start_upstreams(["reply"])
    lab.start_proxy(lab.config(timeouts={"handshake": f"{round(timeout * 1000)}ms"}))
    address = lab.address

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        opened: list[float] = []
        conns = []
        for _ in range(50):
            conns.append(await asyncio.open_connection(*address))
            opened.append(loop.time())
        # One more that starts a record and stalls half-way.
        stalled = await asyncio.open_connection(*address)
        opened.append(loop.time())
        stalled[1].write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
        conns.append(stalled)
        last_opened = loop.time()
        # A good client is served at once while 51 handshakes hang.
        data, _ = await exchange(address, client_context(lab.certs, "client.b"))
        assert data == b"Reply from upstream u1"
        assert loop.time() - last_opened < 1.2  # served before any silent client was cut
        assert lab.open_connections() >= 51

        # Each silent client is closed by the proxy (EOF), not left holding a slot; the
        # clients wait concurrently, so each one's time is its own.
        async def cut_after(reader: asyncio.StreamReader, since: float) -> float:
            async with asyncio.timeout(10):
                assert await reader.read() == b""
            return loop.time() - since

        waited = await asyncio.gather(
            *(cut_after(reader, since) for (reader, _), since in zip(conns, opened, strict=True))
        )
        for _, writer in conns:
            writer.close()
        return waited

    waited = uvloop.run(main())
    # Lower bounds with slack: a client's clock starts a little after the proxy's.
    assert min(waited) >= timeout - 0.1, sorted(waited)[:3]
    assert max(waited) < timeout + margin, sorted(waited)[-3:]
    lines = lab.logs.wait_for("access", count=51, decision="handshake_timeout")
    durations = sorted(r["duration_ms"] for r in lines)
    assert durations[0] >= (timeout - 0.1) * 1000, durations[:3]
    assert durations[-1] < (timeout + margin) * 1000, durations[-3:]
    assert lab.open_connections() == 0


def test_tls12_needs_ecdhe_and_aead(lab: Lab) -> None:
    lab.start_upstreams(["reply"])
    lab.start_proxy()
    ok = client_context(lab.certs, "client.b")
    ok.maximum_version = ssl.TLSVersion.TLSv1_2
    data, end = uvloop.run(exchange(lab.address, ok))
    assert end is End.CLOSE_NOTIFY
    assert data == b"Reply from upstream u1"
    line = lab.logs.wait_for("access", decision="forwarded")[0]
    assert line["tls_version"] == "TLSv1.2"

    cbc = client_context(lab.certs, "client.b")
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")  # no AEAD
    data, how = uvloop.run(attempt(lab.address, cbc))
    assert data == b""
    assert how.startswith("handshake:")
    refused = lab.logs.wait_for("access", decision="tls_failed")[0]
    assert "cipher" in refused["reason"]


def test_client_verifies_the_proxy_by_name(lab: Lab) -> None:
    """The server certificate carries the names the lab uses (localhost, 127.0.0.1, proxy)."""
    lab.start_upstreams(["reply"])
    lab.start_proxy()

    async def main() -> None:
        for name in ("localhost", "proxy", "127.0.0.1"):
            client = await TlsClient.connect(
                lab.address, client_context(lab.certs, "client.b"), server_hostname=name
            )
            await client.aclose()
        with pytest.raises(ssl.SSLCertVerificationError):
            await TlsClient.connect(
                lab.address, client_context(lab.certs, "client.b"), server_hostname="evil.example"
            )

    uvloop.run(main())


def test_a_tcp_probe_is_logged_as_closed_without_data(lab: Lab) -> None:
    """Load-balancer and container health probes connect and close; the log says so
    rather than blaming a TLS failure."""
    lab.start_upstreams(["reply"])
    lab.start_proxy()

    async def probe() -> None:
        _, writer = await asyncio.open_connection(*lab.address)
        writer.close()
        await writer.wait_closed()

    async def partial_then_fin() -> None:
        reader, writer = await asyncio.open_connection(*lab.address)
        writer.write(b"\x16\x03\x01")  # the start of a record, then FIN
        writer.write_eof()
        async with asyncio.timeout(10):
            await reader.read()
        writer.close()

    uvloop.run(probe())
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("tls_failed", "closed_without_data")
    uvloop.run(partial_then_fin())
    (_, second) = lab.logs.wait_for("access", count=2)
    assert second["reason"] == "eof_during_handshake"


def accepted_at(record: dict[str, Any]) -> float:
    """When an access line's connection was accepted: its ``ts`` less ``duration_ms``."""
    ended = dt.datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))
    return ended.timestamp() - float(record["duration_ms"]) / 1000


def test_identity_charset_unicode_admits_other_scripts_as_distinct_identities(lab: Lab) -> None:
    """The proxy applies ``tls.identity_charset``: under ``unicode`` the Cyrillic CN is an
    identity of its own (not client.a, whose rule does not apply), logged normalized."""
    lab.start_upstreams(["reply"] * 2)
    u1 = lab.upstreams[0].address
    tls = {
        "ca": str(lab.certs / "ca.pem"),
        "cert": str(lab.certs / "server.pem"),
        "key": str(lab.certs / "server.key"),
        "identity_charset": "unicode",
    }
    rules = [{"client": "CLIENT.a", "action": "deny", "upstream": u1}]
    lab.start_proxy(lab.config(tls=tls, authorization={"rules": rules, "default": "allow"}))

    async def main() -> list[bytes]:
        got = []
        for stem in ("mixedcase", "mixedcase", "cyrillic", "cyrillic", "trailingspace"):
            data, _ = await attempt(lab.address, client_context(lab.certs, stem))
            got.append(data)
        return got

    got = uvloop.run(main())
    assert got[:2] == [b"Reply from upstream u2"] * 2  # Client.A is client.a: denied u1
    assert sorted(got[2:4]) == [b"Reply from upstream u1", b"Reply from upstream u2"]
    assert got[4] == b""
    # In the order the connections were accepted (conn ids are unique, but with
    # workers: N each worker numbers its own block).
    lines = sorted(lab.logs.wait_for("access", count=5), key=accepted_at)
    assert [r["client"] for r in lines[:4]] == ["client.a"] * 2 + ["\u0441lient.a"] * 2
    assert (lines[4]["decision"], lines[4]["reason"]) == (
        "tls_failed",
        "identity_has_whitespace: U+0020 at 8",
    )


# --- TLS 1.3 session resumption (tls.session_tickets) ------------------------------------


def blocking_exchange(
    lab: Lab, ctx: ssl.SSLContext, payload: bytes, session: ssl.SSLSession | None = None
) -> tuple[bytes, bool, ssl.SSLSession | None]:
    """One connection from this thread: send, half-close, read to the end. The reply,
    whether the proxy resumed the session offered, and the session to offer next time
    (it holds the ticket sent after the handshake, read with the reply)."""
    with (
        socket.create_connection(lab.address, timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(payload)
        chunks = []
        while chunk := tls.recv(65536):
            chunks.append(chunk)
            if sum(map(len, chunks)) >= len(payload):
                break
        return b"".join(chunks), bool(tls.session_reused), tls.session


def test_a_returning_client_resumes_and_keeps_its_identity_and_its_rules(lab: Lab) -> None:
    """With the default one ticket, a returning client resumes its TLS 1.3 session. The
    identity comes from the certificate the session carries: the access line names the
    same client, and a denied client stays denied on a resumed session."""
    lab.start_upstreams(["echo"])
    rules = [{"client": "client.d", "action": "deny", "upstream": "*"}]
    lab.start_proxy(lab.config(authorization={"default": "allow", "rules": rules}))
    ctx = client_context(lab.certs, "client.b")
    reply, resumed, session = blocking_exchange(lab, ctx, b"first")
    assert (reply, resumed) == (b"first", False)
    assert session is not None
    assert session.has_ticket
    reply, resumed, _ = blocking_exchange(lab, ctx, b"again", session)
    assert (reply, resumed) == (b"again", True)
    denied = client_context(lab.certs, "client.d")
    _, _, d_session = blocking_exchange(lab, denied, b"x")
    reply, resumed, _ = blocking_exchange(lab, denied, b"x", d_session)
    assert (reply, resumed) == (b"", True)
    records = lab.logs.wait_for("access", count=4)
    assert [(r["client"], r["decision"]) for r in records] == [
        ("client.b", "forwarded"),
        ("client.b", "forwarded"),
        ("client.d", "denied"),
        ("client.d", "denied"),
    ]


def test_no_session_tickets_means_no_resumption(lab: Lab) -> None:
    lab.start_upstreams(["echo"])
    tls = {**lab.config_raw()["tls"], "session_tickets": 0}
    lab.start_proxy(lab.config(tls=tls))
    ctx = client_context(lab.certs, "client.b")
    reply, _, session = blocking_exchange(lab, ctx, b"first")
    assert reply == b"first"
    assert session is None or not session.has_ticket
    reply, resumed, _ = blocking_exchange(lab, ctx, b"again", session)
    assert (reply, resumed) == (b"again", False)
