"""The lab's synthetic mTLS client (services/client): ``python -m client`` as a subprocess
against small TLS servers on 127.0.0.1 (port 0), with certificates made by certgen.

Nothing sleeps to wait: every wait is for a process, a line or a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import random
import signal
import socket
import ssl
import sys
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import uvloop

import certgen
from client import cli as client_cli
from client import config as client_config
from client import decide as client_decide
from client import transfer as client_transfer
from client.tlsstream import TlsStream
from tests.support.harness import Lab
from tests.support.paths import service_env

CLIENT_DIR = Path(__file__).resolve().parents[2] / "services" / "client"
REPLY = b"Reply from upstream u-test"
ATTEMPT_KEYS = {
    "ts",
    "event",
    "client",
    "attempt",
    "outcome",
    "upstream",
    "reply",
    "started",
    "latency_ms",
    "error",
}
TRANSFER_KEYS = ATTEMPT_KEYS | {
    "transfer_bytes",
    "bytes_sent",
    "bytes_received",
    "match",
    "sha256_sent",
    "sha256_received",
    "end",
    "transfer_ms",
}
OUTCOMES = (
    "ok",
    "rejected",
    "tls_error",
    "refused",
    "timeout",
    "error",
    "truncated",
    "mismatch",
)
WAIT = 10.0  # deadline for one client run or one wait
FAST = ("--interval-min", "5ms", "--interval-max", "20ms", "--seed", "1")


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca/server/client.b/client.c, an expired client pair, and ``other/``: a set from
    another CA."""
    out = tmp_path_factory.mktemp("client-certs")
    certgen.generate(out, ["client.b", "client.c"])
    ca = certgen.load_issued(out, "ca")
    now = dt.datetime.now(dt.UTC)
    expired = certgen.make_client(
        ca, "client.x", not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1)
    )
    certgen.write_issued(out, "expired", expired)
    certgen.generate(out / "other", ["client.b"])
    return out


# --- test servers ----------------------------------------------------------------------------


@dataclass
class Served:
    port: int = 0
    messages: list[bytes] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # the client certificate's CN, per connection
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


def mtls_server_context(certs: Path) -> ssl.SSLContext:
    """A server context that requires a client certificate signed by ``ca.pem``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.load_verify_locations(certs / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def peer_name(writer: asyncio.StreamWriter) -> str:
    """The commonName of the client certificate on a server-side TLS stream."""
    cert = writer.get_extra_info("peercert") or {}
    return next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), "")


@contextlib.asynccontextmanager
async def tls_server(certs: Path, behaviour: Literal["reply", "close"]) -> AsyncIterator[Served]:
    """TLS with CERT_REQUIRED against ca.pem; ``reply`` answers each connection with
    ``Reply from upstream u-test`` after the first bytes, ``close`` closes at once."""
    ctx = mtls_server_context(certs)
    served = Served()
    served.idle.set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.active += 1
        served.idle.clear()
        served.peers.append(peer_name(writer))
        try:
            if behaviour == "reply":
                async with asyncio.timeout(WAIT):
                    served.messages.append(await reader.read(1024))
                    writer.write(REPLY)
                    await writer.drain()
        except (OSError, TimeoutError) as exc:
            served.messages.append(repr(exc).encode())
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            served.active -= 1
            if not served.active:
                served.idle.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()
        async with asyncio.timeout(WAIT):  # every handler (task) has finished
            await served.idle.wait()
            await server.wait_closed()


@contextlib.contextmanager
def silent_listener() -> Any:
    """Accepts TCP (the kernel's backlog completes the handshake) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Any:
    """A bound, non-listening port: connects to it are refused, and it stays reserved."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# --- running the client ------------------------------------------------------------------------


async def start_client(
    certs: Path, port: int, *args: str, ids: tuple[str, ...] = ("client.b",)
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        *(arg for client_id in ids for arg in ("--id", client_id)),
        "--proxy",
        f"127.0.0.1:{port}",
        "--certs",
        str(certs),
        *args,
        cwd=CLIENT_DIR,
        env=service_env(CLIENT_DIR),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    """Wait for the client to exit; it must exit 0 with nothing on stderr."""
    try:
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert err == b""
    return [json.loads(line) for line in out.decode().splitlines()]


async def run_client(
    certs: Path, port: int, *args: str, ids: tuple[str, ...] = ("client.b",)
) -> list[dict[str, Any]]:
    return await finish(await start_client(certs, port, *args, ids=ids))


def split(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The attempt lines and the summary (the last line), checking the line schema."""
    assert records[0]["event"] == "started"
    assert records[-1]["event"] == "summary"
    attempts = [r for r in records if r["event"] == "attempt"]
    assert len(attempts) == len(records) - 2
    transfer = records[0]["mode"] == "transfer"
    for record in attempts:
        assert set(record) == (TRANSFER_KEYS if transfer else ATTEMPT_KEYS)
        assert record["outcome"] in OUTCOMES
        assert isinstance(record["latency_ms"], float)
    summary = records[-1]
    assert summary["attempts"] == len(attempts)
    assert list(summary["outcomes"]) == list(OUTCOMES)
    return attempts, summary


# --- outcomes ----------------------------------------------------------------------------------


def test_three_ok_attempts_name_the_upstream(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(certs, served.port, "--count", "3", *FAST)
        assert served.messages == [b"Hello from client.b\n"] * 3
        attempts, summary = split(records)
        assert [a["attempt"] for a in attempts] == [1, 2, 3]
        for a in attempts:
            assert (a["client"], a["outcome"], a["upstream"]) == ("client.b", "ok", "u-test")
            assert a["reply"] == REPLY.decode()
            assert a["error"] is None
            assert a["latency_ms"] > 0
        assert summary["outcomes"] == dict.fromkeys(OUTCOMES, 0) | {"ok": 3}
        assert summary["upstreams"] == {"u-test": 3}
        assert (summary["client"], summary["reason"]) == ("client.b", "count")
        assert records[0]["server_name"] == "localhost"
        assert records[0]["cert"] == "client.b"

    run(main())


def test_burst_with_concurrency(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(
                certs, served.port, "--count", "6", "--burst", "--concurrency", "3"
            )
        attempts, summary = split(records)
        assert sorted(a["attempt"] for a in attempts) == [1, 2, 3, 4, 5, 6]
        assert summary["outcomes"]["ok"] == 6
        assert len(served.messages) == 6

    run(main())


def test_several_identities_in_one_process(certs: Path) -> None:
    """``--id`` twice: each identity presents its own pair, sends its own message and
    logs its own started, attempt and summary lines, exactly as a process of its own
    would (the schema is the same)."""

    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(
                certs, served.port, "--count", "2", *FAST, ids=("client.b", "client.c")
            )
        assert (
            sorted(served.messages)
            == [b"Hello from client.b\n"] * 2 + [b"Hello from client.c\n"] * 2
        )
        assert sorted(served.peers) == ["client.b", "client.b", "client.c", "client.c"]
        for client_id in ("client.b", "client.c"):
            mine = [r for r in records if r["client"] == client_id]
            started = [r for r in mine if r["event"] == "started"]
            assert [r["cert"] for r in started] == [client_id]
            attempts, summary = split(mine)
            assert [a["attempt"] for a in attempts] == [1, 2]
            assert all(a["outcome"] == "ok" for a in attempts)
            assert (summary["outcomes"]["ok"], summary["reason"]) == (2, "count")

    run(main())


def test_several_identities_stop_together_on_sigterm(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            proc = await start_client(certs, served.port, *FAST, ids=("client.b", "client.c"))
            assert proc.stdout is not None
            seen: set[str] = set()
            try:
                async with asyncio.timeout(WAIT):  # both identities have made an attempt
                    while seen != {"client.b", "client.c"}:
                        record = json.loads(await proc.stdout.readline())
                        if record["event"] == "attempt":
                            seen.add(record["client"])
            except BaseException:
                proc.kill()
                await proc.wait()
                raise
            proc.send_signal(signal.SIGTERM)
            rest = await finish(proc)
        summaries = {r["client"]: r for r in rest if r["event"] == "summary"}
        assert set(summaries) == {"client.b", "client.c"}
        assert {s["reason"] for s in summaries.values()} == {"signal"}

    run(main())


def test_server_closing_without_reply_is_rejected(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "close") as served:
            records = await run_client(certs, served.port, "--count", "1")
        (attempt,), summary = split(records)
        assert attempt["outcome"] == "rejected"
        assert (attempt["upstream"], attempt["reply"]) == (None, None)
        assert attempt["error"]
        assert summary["upstreams"] == {}

    run(main())


@pytest.mark.parametrize("how", [("--no-cert",), ("--cert-stem", "expired")])
def test_bad_client_certificate_is_not_ok(certs: Path, how: tuple[str, ...]) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(certs, served.port, "--count", "1", *how)
        (attempt,), _ = split(records)
        # TLS 1.3: the client's handshake completes before the server checks the
        # certificate, so the refusal shows up after it ("rejected").
        assert attempt["outcome"] in ("rejected", "tls_error")
        assert attempt["client"] == "client.b"  # --cert-stem changes the key pair only
        assert records[0]["cert"] == (None if how == ("--no-cert",) else "expired")
        assert served.messages == []

    run(main())


def test_untrusted_server_certificate_is_tls_error(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(certs / "other", served.port, "--count", "1")
        (attempt,), _ = split(records)
        assert attempt["outcome"] == "tls_error"
        assert "CERTIFICATE_VERIFY_FAILED" in attempt["error"]

    run(main())


def test_nothing_listening_is_refused(certs: Path) -> None:
    async def main() -> None:
        with closed_port() as port:
            records = await run_client(certs, port, "--count", "2", "--burst")
        attempts, summary = split(records)
        assert [a["outcome"] for a in attempts] == ["refused", "refused"]
        assert summary["outcomes"]["refused"] == 2

    run(main())


def test_silent_server_is_timeout(certs: Path) -> None:
    async def main() -> None:
        with silent_listener() as port:
            records = await run_client(certs, port, "--count", "1", "--timeout", "0.5s")
        (attempt,), _ = split(records)
        assert attempt["outcome"] == "timeout"
        assert "handshake" in attempt["error"]
        assert 400 <= attempt["latency_ms"] < 5000

    run(main())


# --- stopping ----------------------------------------------------------------------------------


def test_duration_stops_it(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            records = await run_client(certs, served.port, "--duration", "300ms", *FAST)
        attempts, summary = split(records)
        assert summary["reason"] == "duration"
        assert attempts
        assert all(a["outcome"] == "ok" for a in attempts)

    run(main())


def test_sigterm_exits_0_with_a_summary(certs: Path) -> None:
    async def main() -> None:
        async with tls_server(certs, "reply") as served:
            proc = await start_client(certs, served.port, *FAST)
            assert proc.stdout is not None
            try:
                async with asyncio.timeout(WAIT):  # the first attempt has been logged
                    while json.loads(await proc.stdout.readline())["event"] != "attempt":
                        pass
            except BaseException:
                proc.kill()
                await proc.wait()
                raise
            proc.send_signal(signal.SIGTERM)
            rest = await finish(proc)
        summary = rest[-1]
        assert summary["event"] == "summary"
        assert summary["reason"] == "signal"
        assert summary["attempts"] == 1 + sum(r["event"] == "attempt" for r in rest)

    run(main())


def test_unusable_certificates_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--id", "client.b", "--proxy", "127.0.0.1:9", "--certs", str(tmp_path)]
    assert client_cli.main(argv) == 2
    assert client_cli.main([*argv, "--interval-min", "2s", "--interval-max", "1s"]) == 2
    # Several identities: one pair missing is named, and nothing runs.
    assert client_cli.main(["--id", "client.b", "--id", "client.z", *argv[2:]]) == 2
    err = capsys.readouterr().err
    assert "cannot load TLS material" in err
    assert "--interval-min" in err
    assert "Traceback" not in err


# --- transfer mode -----------------------------------------------------------------------------

CORRUPT_AT = 100_000  # the "corrupt" echo server flips this byte
TRUNCATE_AFTER = 64 * 1024  # the "truncate" echo server closes after echoing this much
TRANSFER = ("--transfer-bytes", "1MiB", "--transfer-time", "300ms", "--timeout", "5s")


@contextlib.asynccontextmanager
async def tls_echo_server(
    certs: Path, behaviour: Literal["echo", "corrupt", "truncate", "hold"]
) -> AsyncIterator[Served]:
    """TLS (CERT_REQUIRED) echoing what it reads until the client's close_notify, then
    sending its own; ``corrupt`` flips byte :data:`CORRUPT_AT`, ``truncate`` ends after
    :data:`TRUNCATE_AFTER` bytes, ``hold`` reads and never answers. TLS over memory BIOs
    (the client's :class:`TlsStream`, server side): asyncio's TLS transport stops
    writing when the peer's close_notify arrives, which would cut the echo short."""
    ctx = mtls_server_context(certs)
    served = Served()
    served.idle.set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.active += 1
        served.idle.clear()
        seen = 0
        try:
            async with asyncio.timeout(WAIT):
                tls = await TlsStream.handshake(reader, writer, ctx, None, server_side=True)
                while data := await tls.read():
                    if behaviour == "hold":
                        continue
                    if behaviour == "corrupt" and seen <= CORRUPT_AT < seen + len(data):
                        at = CORRUPT_AT - seen
                        data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
                    seen += len(data)
                    await tls.write(data)
                    if behaviour == "truncate" and seen >= TRUNCATE_AFTER:
                        break
                if behaviour == "hold":
                    await reader.read()  # until the client gives up and closes
                await tls.close_notify()
        except (OSError, TimeoutError) as exc:
            served.messages.append(repr(exc).encode())
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            served.active -= 1
            if not served.active:
                served.idle.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    served.port = server.sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.close()
        async with asyncio.timeout(WAIT):
            await served.idle.wait()
            await server.wait_closed()


def test_transfer_through_the_proxy_is_byte_exact(lab: Lab, certs: Path) -> None:
    """Two paced 1 MiB transfers through the real proxy to an echo upstream: the echo is
    byte-exact, the stream ends with close_notify, and the proxy forwarded every byte."""
    lab.start_upstreams(["echo"])
    lab.start_proxy()
    size = 1 << 20

    async def main() -> list[dict[str, Any]]:
        return await run_client(certs, lab.address[1], "--count", "2", *TRANSFER, *FAST)

    records = uvloop.run(main())
    attempts, summary = split(records)
    assert records[0]["mode"] == "transfer"
    assert records[0]["transfer_bytes"] == size
    for a in attempts:
        payload = client_transfer.payload(
            client_transfer.payload_seed("client.b", a["attempt"]), size
        )
        assert (a["outcome"], a["match"], a["end"], a["error"]) == (
            "ok",
            True,
            "close_notify",
            None,
        )
        assert a["bytes_sent"] == a["bytes_received"] == a["transfer_bytes"] == size
        assert a["sha256_sent"] == a["sha256_received"] == hashlib.sha256(payload).hexdigest()
        assert (a["upstream"], a["reply"]) == (None, None)
        assert a["transfer_ms"] >= 290  # paced over --transfer-time
        assert a["latency_ms"] >= a["transfer_ms"]
    assert attempts[0]["sha256_sent"] != attempts[1]["sha256_sent"]  # seeded per attempt
    assert summary["outcomes"]["ok"] == 2
    access = lab.logs.wait_for("access", count=2)
    for line in access:
        assert (line["decision"], line["reason"], line["client"]) == (
            "forwarded",
            "eof",
            "client.b",
        )
        assert line["bytes_up"] == line["bytes_down"] == size


def test_transfer_denied_by_the_proxy_is_rejected(lab: Lab, certs: Path) -> None:
    lab.start_upstreams(["echo"])
    deny = {"default": "deny", "rules": []}
    lab.start_proxy(lab.config(authorization=deny))

    async def main() -> list[dict[str, Any]]:
        return await run_client(certs, lab.address[1], "--count", "1", *TRANSFER)

    (attempt,), _ = split(uvloop.run(main()))
    assert attempt["outcome"] == "rejected"
    assert (attempt["bytes_received"], attempt["match"]) == (0, False)
    (line,) = lab.logs.wait_for("access")
    assert (line["decision"], line["reason"]) == ("denied", "no_allowed_upstream")


@pytest.mark.parametrize(
    ("behaviour", "outcome"),
    [("echo", "ok"), ("corrupt", "mismatch"), ("truncate", "truncated"), ("hold", "timeout")],
)
def test_transfer_outcomes(certs: Path, behaviour: Any, outcome: str) -> None:
    async def main() -> list[dict[str, Any]]:
        async with tls_echo_server(certs, behaviour) as served:
            return await run_client(
                certs,
                served.port,
                "--count",
                "1",
                "--transfer-bytes",
                "256KiB",
                "--transfer-time",
                "100ms",
                "--timeout",
                "1s",
            )

    (attempt,), summary = split(uvloop.run(main()))
    assert attempt["outcome"] == outcome, attempt
    assert summary["outcomes"][outcome] == 1
    assert attempt["match"] is (outcome == "ok")
    if outcome == "mismatch":
        assert f"at byte {CORRUPT_AT}" in attempt["error"], attempt
        assert attempt["bytes_received"] == attempt["bytes_sent"] == 256 * 1024, attempt
        assert attempt["sha256_received"] != attempt["sha256_sent"]
    if outcome == "truncated":
        assert TRUNCATE_AFTER <= attempt["bytes_received"] < 256 * 1024
    if outcome == "timeout":
        assert attempt["bytes_received"] == 0
        assert attempt["bytes_sent"] == 256 * 1024  # sent it all, then waited for the echo
        assert 900 <= attempt["latency_ms"] < 3000


def test_transfer_options() -> None:
    load = client_config.load_config
    base = ["--id", "client.b", "--proxy", "p:1"]
    config = load([*base, "--transfer-bytes", "4MiB", "--transfer-time", "2s"])
    assert (config.transfer, config.transfer_bytes, config.transfer_time) == (True, 4 << 20, 2.0)
    assert load(base).transfer is False
    assert load([*base, "--transfer-bytes", "1000"]).transfer_bytes == 1000
    for bad in (
        ["--transfer-bytes", "0"],
        ["--transfer-bytes", "lots"],
        ["--transfer-time", "1s"],  # without --transfer-bytes
        ["--transfer-bytes", "1k", "--transfer-time", "5s"],  # not shorter than --timeout
    ):
        with pytest.raises(client_config.ConfigError):
            load([*base, *bad])


# --- pure decisions ----------------------------------------------------------------------------

ALERT = ssl.SSLError(
    1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"
)
VERIFY = ssl.SSLCertVerificationError(
    1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
)


@pytest.mark.parametrize(
    ("phase", "reply", "error", "timed_out", "outcome"),
    [
        ("exchange", REPLY, None, False, "ok"),
        ("exchange", REPLY + b"\n", ConnectionResetError(104, "reset"), False, "ok"),
        ("exchange", REPLY, None, True, "ok"),
        ("exchange", b"", None, False, "rejected"),
        ("exchange", b"", ALERT, False, "rejected"),
        ("exchange", b"", ConnectionResetError(104, "reset"), False, "rejected"),
        ("exchange", b"", BrokenPipeError(32, "pipe"), False, "rejected"),
        ("exchange", b"HTTP/1.1 400", None, False, "error"),
        ("exchange", b"", ValueError("bug"), False, "error"),
        ("exchange", b"", None, True, "timeout"),
        ("handshake", b"", VERIFY, False, "tls_error"),
        ("handshake", b"", ALERT, False, "tls_error"),
        ("handshake", b"", ConnectionResetError(104, "reset"), False, "tls_error"),
        ("handshake", b"", None, True, "timeout"),
        ("connect", b"", ConnectionRefusedError(111, "refused"), False, "refused"),
        ("connect", b"", TimeoutError(110, "timed out"), False, "timeout"),
        ("connect", b"", socket.gaierror(-2, "Name or service not known"), False, "error"),
        ("connect", b"", None, True, "timeout"),
    ],
)
def test_classify(
    phase: client_decide.Phase,
    reply: bytes,
    error: BaseException | None,
    timed_out: bool,
    outcome: str,
) -> None:
    verdict = client_decide.classify(phase, reply, error, timed_out=timed_out)
    assert verdict.outcome == outcome
    assert verdict.upstream == ("u-test" if outcome == "ok" else None)
    if outcome != "ok":
        assert verdict.error
        assert len(verdict.error) <= 200
    if error is not None:
        assert verdict.error is not None
        assert type(error).__name__ in verdict.error


def test_upstream_name_and_reply_text() -> None:
    name = client_decide.upstream_name
    assert name(b"Reply from upstream u1") == "u1"
    assert name(b"Reply from upstream u2\r\nmore") == "u2"
    assert name(b"Reply from upstream ") is None
    assert name(b"reply from upstream u1") is None
    assert client_decide.reply_text(b"") is None
    assert client_decide.reply_text(b"\xff" * 300) == "\ufffd" * 200


def test_stopping_and_waiting() -> None:
    stop = client_decide.stop_reason
    assert stop(0, 0.0, count=None, deadline=None, stopping=False) is None
    assert stop(3, 0.0, count=3, deadline=None, stopping=False) == "count"
    assert stop(1, 5.0, count=3, deadline=5.0, stopping=False) == "duration"
    assert stop(1, 1.0, count=3, deadline=5.0, stopping=True) == "signal"
    wait = client_decide.next_wait
    rng = random.Random(3)
    waits = [wait(rng, 0.2, 1.0, burst=False, now=0.0, deadline=None) for _ in range(100)]
    assert all(0.2 <= w <= 1.0 for w in waits)
    again = random.Random(3)
    assert waits == [wait(again, 0.2, 1.0, burst=False, now=0.0, deadline=None) for _ in waits]
    assert wait(rng, 0.2, 1.0, burst=True, now=0.0, deadline=None) == 0.0
    assert wait(rng, 5.0, 5.0, burst=False, now=9.0, deadline=10.0) == 1.0
    assert wait(rng, 5.0, 5.0, burst=False, now=11.0, deadline=10.0) == 0.0


def test_tally_summary() -> None:
    tally = client_decide.Tally()
    verdict = client_decide.Verdict
    for v in (verdict("ok", "u1", None), verdict("ok", "u2", None), verdict("ok", "u1", None)):
        tally.add(v)
    tally.add(verdict("refused", None, "x"))
    assert tally.summary() == {
        "attempts": 4,
        "outcomes": dict.fromkeys(OUTCOMES, 0) | {"ok": 3, "refused": 1},
        "upstreams": {"u1": 2, "u2": 1},
    }


def test_configuration() -> None:
    load = client_config.load_config
    base = ["--id", "client.b"]
    config = load([*base, "--proxy", "proxy:8443"])
    assert (config.host, config.port, config.server_name) == ("proxy", 8443, "proxy")
    assert (config.interval_min, config.interval_max, config.timeout) == (0.2, 1.0, 5.0)
    assert (config.cert_stem, config.count, config.duration) == ("client.b", None, None)
    assert config.certs == Path("/certs")
    assert load([*base, "--proxy", "127.0.0.1:1"]).server_name == "localhost"
    assert load([*base, "--proxy", "[::1]:1"]).server_name == "localhost"
    assert load([*base, "--proxy", "10.0.0.1:1", "--server-name", "proxy"]).server_name == "proxy"
    assert load([*base, "--proxy", "p:1", "--no-cert"]).cert_stem is None
    assert load([*base, "--proxy", "p:1", "--cert-stem", "expired"]).cert_stem == "expired"
    assert load([*base, "--proxy", "p:1", "--duration", "1m"]).duration == 60.0
    for bad in (["--proxy", "p"], ["--proxy", "p:0"], ["--proxy", "p:1", "--timeout", "0"]):
        with pytest.raises(client_config.ConfigError):
            load([*base, *bad])


def test_several_identities_share_every_option_but_their_own() -> None:
    load = client_config.load_configs
    argv = ["--id", "c.1", "--id", "c.2", "--id", "c.3", "--proxy", "p:1", "--seed", "7"]
    configs = load([*argv, "--count", "4"])
    assert [(c.client_id, c.cert_stem, c.seed) for c in configs] == [
        ("c.1", "c.1", 7),
        ("c.2", "c.2", 8),
        ("c.3", "c.3", 9),
    ]
    assert {(c.count, c.stagger, c.host) for c in configs} == {(4, True, "p")}
    assert [c.message for c in configs] == [
        b"Hello from c.1\n",
        b"Hello from c.2\n",
        b"Hello from c.3\n",
    ]
    assert {c.cert_stem for c in load([*argv, "--no-cert"])} == {None}
    assert [c.seed for c in load([*argv[:6], "--proxy", "p:1"])] == [None, None, None]
    # One identity: as before (no stagger), and load_config takes exactly one.
    (single,) = load(["--id", "c.1", "--proxy", "p:1"])
    assert (single.stagger, single.cert_stem) == (False, "c.1")
    with pytest.raises(client_config.ConfigError, match=r"given twice: c\.1"):
        load(["--id", "c.1", "--id", "c.1", "--proxy", "p:1"])
    with pytest.raises(client_config.ConfigError, match="--cert-stem"):
        load([*argv, "--cert-stem", "expired"])
    with pytest.raises(client_config.ConfigError, match="one identity is expected"):
        client_config.load_config(argv)
    with pytest.raises(client_config.ConfigError, match="at most 1000"):
        load([arg for i in range(1001) for arg in ("--id", f"c.{i}")] + ["--proxy", "p:1"])


def test_identity_from_the_environment() -> None:
    """A swarm service gives each replica its identity as CLIENT_ID=client.{{.Task.Slot}}
    (a command cannot be templated); --id still wins, and one of them is required."""
    load = client_config.load_config
    from_env = load(["--proxy", "p:1"], {"CLIENT_ID": "client.7"})
    assert (from_env.client_id, from_env.cert_stem) == ("client.7", "client.7")
    assert load(["--id", "client.b", "--proxy", "p:1"], {"CLIENT_ID": "client.7"}).client_id == (
        "client.b"
    )
    with pytest.raises(client_config.ConfigError, match="CLIENT_ID"):
        load(["--proxy", "p:1"], {})
    with pytest.raises(client_config.ConfigError, match="printable"):
        load(["--proxy", "p:1"], {"CLIENT_ID": ""})
