"""The upstream's run-time faults: switched through its control socket (a real Unix
socket, the real ``upstream.ctl`` client), applied to real TCP connections on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_upstream_service import (
    REPLY,
    WAIT,
    Capture,
    close,
    exchange,
    read_all,
    run,
    running,
)
from tests.support.loops import await_condition
from upstream import ctl as up_ctl


async def ask(path: str, request: dict[str, Any] | bytes) -> dict[str, Any]:
    """One request line on the control socket; the answer."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        line = request if isinstance(request, bytes) else json.dumps(request).encode() + b"\n"
        writer.write(line)
        await writer.drain()
        async with asyncio.timeout(WAIT):
            answer: dict[str, Any] = json.loads(await reader.readline())
        return answer
    finally:
        await close(writer)


def control_path(tmp_path: Path) -> str:
    return str(tmp_path / "control.sock")


async def timed_exchange(address: tuple[str, int], data: bytes) -> tuple[bytes, float, list[int]]:
    """Send ``data`` then FIN; everything until the server's EOF, how long it took and
    the size of each read."""
    reader, writer = await asyncio.open_connection(*address)
    started = time.monotonic()
    sizes: list[int] = []
    got = bytearray()
    try:
        writer.write(data)
        writer.write_eof()
        await writer.drain()
        async with asyncio.timeout(WAIT):
            while chunk := await reader.read(1 << 16):
                sizes.append(len(chunk))
                got += chunk
    finally:
        await close(writer)
    return bytes(got), time.monotonic() - started, sizes


def test_the_control_socket_is_for_this_user_alone(tmp_path: Path) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path):
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert mode == 0o600
            before = time.time()
            answer = await ask(path, {"op": "show"})
            assert answer.pop("ts") >= before - 1  # the wall clock, to line up with logs
            assert answer == {"ok": True, "fault": None}
        (listening,) = logs.events("listening")
        assert listening["control"] == path

    run(main())


def test_hang_accepts_and_never_answers_until_the_idle_timeout(tmp_path: Path) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path, idle_timeout=0.4) as server:
            answer = await ask(path, {"op": "set", "fault": "hang"})
            answer.pop("ts")
            assert answer == {"ok": True, "fault": {"kind": "hang"}, "left_s": None}
            started = time.monotonic()
            assert await exchange(server.address, b"hello\n") == b""
            waited = time.monotonic() - started
            (record,) = await logs.wait_for("connection")
        assert 0.4 <= waited < 0.4 + 3
        assert (record["outcome"], record["bytes_out"]) == ("idle_timeout", 0)
        (switched,) = logs.events("fault", op="set")
        assert switched["fault"] == {"kind": "hang"}

    run(main())


def test_a_hung_connection_the_peer_closes_is_logged_as_fault_hang(tmp_path: Path) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path) as server:
            await ask(path, {"op": "set", "fault": "hang"})
            _reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"hello\n")
            await writer.drain()
            await await_condition(
                "the connection to hang",
                lambda: any(c.phase == "hanging" for c in server.connections),
            )
            await close(writer)
            (record,) = await logs.wait_for("connection")
        assert (record["outcome"], record["bytes_in"], record["bytes_out"]) == (
            "fault_hang",
            6,
            0,
        )

    run(main())


@pytest.mark.parametrize("mode", ["reply", "echo"])
def test_drip_sends_the_response_a_few_bytes_at_a_time(tmp_path: Path, mode: str) -> None:
    path = control_path(tmp_path)
    message = b"x" * 199 + b"\n" if mode == "echo" else b"hello\n"
    expected = message if mode == "echo" else REPLY
    size, interval = 10, 0.05

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path, mode=mode) as server:
            answer = await ask(
                path, {"op": "set", "fault": "drip", "params": [size, "50ms"], "for": "30s"}
            )
            assert answer["fault"] == {"kind": "drip", "drip_bytes": 10, "drip_interval_ms": 50.0}
            assert 29 < answer["left_s"] <= 30
            got, took, sizes = await timed_exchange(server.address, message)
            (record,) = await logs.wait_for("connection")
        pieces = -(-len(expected) // size)
        assert got == expected
        assert max(sizes) <= size  # never more than one piece at a time
        assert took >= (pieces - 1) * interval
        assert record["bytes_out"] == len(expected)

    run(main())


def test_delay_close_and_abort_switch_at_run_time(tmp_path: Path) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path) as server:
            await ask(path, {"op": "set", "fault": "delay", "params": ["300ms"]})
            got, took, _ = await timed_exchange(server.address, b"a\n")
            assert (got, took >= 0.3) == (REPLY, True)
            await ask(path, {"op": "set", "fault": "close"})
            assert await exchange(server.address, b"b\n") == b""
            await ask(path, {"op": "set", "fault": "abort"})
            reader, writer = await asyncio.open_connection(*server.address)
            try:
                writer.write(b"c\n")
                await writer.drain()
                with pytest.raises(ConnectionResetError):
                    await read_all(reader)
            finally:
                await close(writer)
            records = await logs.wait_for("connection", count=3)
        assert [r["outcome"] for r in records] == ["replied", "fault_close", "fault_reset"]

    run(main())


def test_a_fault_ends_by_itself_when_its_time_is_up_and_when_cleared(tmp_path: Path) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path) as server:
            await ask(path, {"op": "set", "fault": "close", "for": "200ms"})
            (expired,) = await logs.wait_for("fault", op="expired")
            assert expired["fault"] == {"kind": "close"}
            assert await exchange(server.address, b"a\n", eof=True) == REPLY
            await ask(path, {"op": "set", "fault": "hang"})
            cleared = await ask(path, {"op": "clear"})
            assert (cleared["ok"], cleared["fault"]) == (True, None)
            assert await exchange(server.address, b"b\n", eof=True) == REPLY
        assert [r["op"] for r in logs.events("fault")] == ["set", "expired", "set", "clear"]

    run(main())


@pytest.mark.parametrize(
    ("request_line", "said"),
    [
        (b"not json\n", "one JSON object"),
        (b"[1, 2]\n", "one JSON object"),
        (b'{"op": "explode"}\n', "op: set, clear or show"),
        (b'{"op": "set", "fault": "smoke"}\n', "fault: one of"),
        (b'{"op": "set", "fault": "delay"}\n', "delay takes 1 parameter"),
        (b'{"op": "set", "fault": "delay", "params": ["soon"]}\n', "delay"),
        (b'{"op": "set", "fault": "drip", "params": [0, "1s"]}\n', "drip: bytes per piece"),
        (b'{"op": "set", "fault": "close", "for": "-1s"}\n', "for"),
        (b'{"op": "set", "fault": "close", "for": 1e400}\n', "for"),
        (b"\xff\xfe\n", "one JSON object"),
    ],
)
def test_a_bad_request_is_refused_with_a_reason_and_changes_nothing(
    tmp_path: Path, request_line: bytes, said: str
) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path) as server:
            answer = await ask(path, request_line)
            assert answer["ok"] is False
            assert said in answer["error"]
            assert await exchange(server.address, b"a\n", eof=True) == REPLY
        assert not logs.events("fault")
        assert not logs.events("error")

    run(main())


def test_the_ctl_client_talks_to_a_running_upstream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = control_path(tmp_path)

    async def main() -> None:
        logs = Capture()
        async with running(logs, control=path):
            set_code = await asyncio.to_thread(
                up_ctl.main, ["--control", path, "set", "drip", "16", "100ms", "--for", "10s"]
            )
            show_code = await asyncio.to_thread(up_ctl.main, ["--control", path, "show"])
            bad_code = await asyncio.to_thread(
                up_ctl.main, ["--control", path, "set", "delay", "never"]
            )
        assert (set_code, show_code, bad_code) == (0, 0, 1)

    run(main())
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1]["fault"] == {"kind": "drip", "drip_bytes": 16, "drip_interval_ms": 100.0}
    assert lines[2]["ok"] is False
    assert up_ctl.main(["--control", str(tmp_path / "absent.sock"), "show"]) == 2
