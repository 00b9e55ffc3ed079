"""The lab's synthetic mTLS client (services/client): ``python -m client`` as a subprocess
against small TLS servers on 127.0.0.1 (port 0), with certificates made by certgen.

Nothing sleeps to wait: every wait is for a process, a line or a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
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
    "latency_ms",
    "error",
}
OUTCOMES = ("ok", "rejected", "tls_error", "refused", "timeout", "error")
WAIT = 10.0  # deadline for one client run or one wait
FAST = ("--interval-min", "5ms", "--interval-max", "20ms", "--seed", "1")


def run(coro: Coroutine[Any, Any, None]) -> None:
    uvloop.run(coro)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca/server/client.b, an expired client pair, and ``other/``: a set from another CA."""
    out = tmp_path_factory.mktemp("client-certs")
    certgen.generate(out, ["client.b"])
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
    active: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def tls_server(certs: Path, behaviour: Literal["reply", "close"]) -> AsyncIterator[Served]:
    """TLS with CERT_REQUIRED against ca.pem; ``reply`` answers each connection with
    ``Reply from upstream u-test`` after the first bytes, ``close`` closes at once."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certs / "server.pem", certs / "server.key")
    ctx.load_verify_locations(certs / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    served = Served()
    served.idle.set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served.active += 1
        served.idle.clear()
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


async def start_client(certs: Path, port: int, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client",
        "--id",
        "client.b",
        "--proxy",
        f"127.0.0.1:{port}",
        "--certs",
        str(certs),
        *args,
        cwd=CLIENT_DIR,
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


async def run_client(certs: Path, port: int, *args: str) -> list[dict[str, Any]]:
    return await finish(await start_client(certs, port, *args))


def split(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The attempt lines and the summary (the last line), checking the line schema."""
    assert records[0]["event"] == "started"
    assert records[-1]["event"] == "summary"
    attempts = [r for r in records if r["event"] == "attempt"]
    assert len(attempts) == len(records) - 2
    for record in attempts:
        assert set(record) == ATTEMPT_KEYS
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
    err = capsys.readouterr().err
    assert "cannot load TLS material" in err
    assert "--interval-min" in err
    assert "Traceback" not in err


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
