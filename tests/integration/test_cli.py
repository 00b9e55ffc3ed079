"""``python -m l4proxy`` as a real process: ``--check``, start-up failures, signals,
and the handshake timeout, observed through exit codes, stderr and the JSON log lines
on stdout."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import pytest
import uvloop
import yaml

from tests.support.harness import WORKERS, Lab
from tests.support.loops import await_condition
from tests.support.paths import service_env
from tests.support.tlsclient import End, TlsClient, client_context
from tests.support.upstreams import free_port

REPO = Path(__file__).resolve().parents[2]
PROXY_DIR = REPO / "services" / "proxy"


def child_env() -> dict[str, str]:
    return service_env(PROXY_DIR)


def command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "l4proxy", "--config", str(config), *extra]


def write_config(path: Path, certs: Path, upstreams: list[str], **overrides: Any) -> Path:
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {
            "ca": str(certs / "ca.pem"),
            "cert": str(certs / "server.pem"),
            "key": str(certs / "server.key"),
        },
        "upstreams": upstreams,
        "health_check": {"interval": "1h", "timeout": "500ms"},
        "rate_limit": {"enabled": False},
        "admin": {"listen": "127.0.0.1:0"},
    }
    if WORKERS > 1:
        raw["workers"] = WORKERS
    raw.update(overrides)
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def child(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """A short-lived child of the repository's code: its output, within 30 s."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=30, check=False, cwd=REPO, env=child_env()
    )


def run(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return child(command(config, *extra))


def json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


# --- --check ---------------------------------------------------------------------------


def test_check_accepts_a_valid_file(certs: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "proxy.yaml", certs, ["127.0.0.1:9001", "127.0.0.1:9002"])
    done = run(config, "--check")
    assert done.returncode == 0, done.stderr
    assert "is valid" in done.stdout
    assert "2 upstream(s)" in done.stdout
    assert f"{WORKERS} worker(s)" in done.stdout
    assert "Traceback" not in done.stderr


INVALID_YAML = """\
listen: 127.0.0.1:0
balancer: round_robin
tls: ca: ca.pem
upstreams: ["127.0.0.1:9001"]
"""


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown_nested_key", "health_check.intervall"),
        ("missing_ca_file", "tls.ca"),
        ("invalid_yaml", "line 3"),
        ("rule_for_unknown_upstream", "authorization.rules[0].upstream"),
    ],
)
def test_check_rejects_an_invalid_file_naming_the_problem(
    certs: Path, tmp_path: Path, case: str, expected: str
) -> None:
    path = tmp_path / "proxy.yaml"
    upstreams = ["127.0.0.1:9001"]
    if case == "unknown_nested_key":
        write_config(path, certs, upstreams, health_check={"intervall": "3s"})
    elif case == "missing_ca_file":
        write_config(path, certs, upstreams)
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        raw["tls"]["ca"] = str(tmp_path / "no-such-ca.pem")
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    elif case == "invalid_yaml":
        path.write_text(INVALID_YAML, encoding="utf-8")
    else:
        rules = [{"client": "client.a", "action": "deny", "upstream": "127.0.0.1:9999"}]
        write_config(path, certs, upstreams, authorization={"rules": rules})
    done = run(path, "--check")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert expected in done.stderr, done.stderr
    assert "invalid configuration" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


# --- a running proxy ---------------------------------------------------------------------


class Child:
    """A proxy process: its stdout JSON lines and its stderr, read in threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.records: list[dict[str, Any]] = []
        self.garbage: list[str] = []  # stdout lines that are not JSON objects
        self.stderr_parts: list[str] = []
        self.stdout_closed = False
        self._cond = threading.Condition()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._threads = [
            threading.Thread(target=self._read_stdout, args=(proc.stdout,), daemon=True),
            threading.Thread(target=self._read_stderr, args=(proc.stderr,), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read_stdout(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    self.garbage.append(line)
                else:
                    self.records.append(record)
                self._cond.notify_all()
        with self._cond:
            self.stdout_closed = True
            self._cond.notify_all()

    def _read_stderr(self, stream: IO[str]) -> None:
        for line in stream:
            self.stderr_parts.append(line)

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_parts)

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                r
                for r in self.records
                if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
            ]

    def wait_for(
        self, event: str, timeout: float = 10.0, count: int = 1, **match: Any
    ) -> dict[str, Any]:
        """The first record of ``event`` matching ``match`` once ``count`` of them are
        there; fail at the deadline or when the process closed its stdout first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = self.events(event, **match)
                if len(found) >= count:
                    return found[0]
                left = deadline - time.monotonic()
                if left <= 0 or self.stdout_closed:
                    raise AssertionError(
                        f"no {event} {match} within {timeout}s (exit code {self.proc.poll()}); "
                        f"records: {self.records[-8:]}; stderr: {self.stderr[-2000:]}"
                    )
                self._cond.wait(left)

    def address(self) -> tuple[str, int]:
        listening = self.wait_for("listening")
        host, _, port = listening["address"].rpartition(":")
        return host, int(port)

    def join(self) -> None:
        for thread in self._threads:
            thread.join(10)
            assert not thread.is_alive()


@contextmanager
def proxy_process(config: Path) -> Iterator[Child]:
    with subprocess.Popen(
        command(config),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=child_env(),
    ) as proc:
        child = Child(proc)
        try:
            yield child
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            child.join()


@contextmanager
def serving(lab: Lab, tmp_path: Path, mode: str, **overrides: Any) -> Iterator[Child]:
    """A proxy process in front of one test upstream in ``mode``, its check settled."""
    (upstream,) = lab.start_upstreams([mode])
    config = write_config(tmp_path / "proxy.yaml", lab.certs, [upstream.address], **overrides)
    with proxy_process(config) as child:
        child.wait_for("health", upstream=upstream.address, new="up")
        yield child


def refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_open_connections_finish_and_the_proxy_exits_0(
    lab: Lab, tmp_path: Path, signum: signal.Signals
) -> None:
    """Draining: the listener closes at once, an open stream keeps working both ways
    until the client ends it, and the proxy exits as soon as the last one is done."""
    with serving(lab, tmp_path, "echo", timeouts={"drain": "20s"}) as child:
        address = child.address()

        async def main() -> tuple[bytes, bytes, End | None, bool]:
            client = await TlsClient.connect(address, client_context(lab.certs, "client.b"))
            try:
                await client.send(b"before")
                assert await client.recv_exactly(6) == b"before"
                child.proc.send_signal(signum)
                child.wait_for("draining")
                if WORKERS > 1:  # each worker closes its own socket when it drains
                    child.wait_for("worker_draining", count=WORKERS)
                closed = await asyncio.to_thread(refused, address)
                await client.send(b"after the signal")
                after = await client.recv_exactly(16)
                await client.close_notify()
                rest = await client.recv_all()
                return after, rest, client.end, closed
            finally:
                await client.aclose()

        after, rest, end, listener_closed = uvloop.run(main())
        code = child.proc.wait(timeout=10)
        child.join()

    assert after == b"after the signal"
    assert (rest, end) == (b"", End.CLOSE_NOTIFY)
    assert listener_closed  # new clients are refused as soon as draining starts
    assert code == 0, child.stderr
    assert "Traceback" not in child.stderr
    assert child.garbage == []
    draining = child.wait_for("draining")
    assert (draining["open_connections"], draining["grace_s"]) == (1, 20.0)
    stopped = child.wait_for("stopped")
    assert (stopped["reason"], stopped["open_connections"]) == ("drained", 0)
    (access,) = child.events("access")
    assert (access["decision"], access["reason"]) == ("forwarded", "eof")
    assert access["bytes_up"] == access["bytes_down"] == len(b"before") + 16
    assert child.records.index(stopped) > child.records.index(access)
    assert child.events("error") == []


def test_the_drain_deadline_closes_what_is_left_cleanly(lab: Lab, tmp_path: Path) -> None:
    with serving(lab, tmp_path, "hold", timeouts={"drain": "300ms"}) as child:
        address = child.address()
        (upstream,) = lab.upstreams

        async def main() -> tuple[bytes, End | None]:
            client = await TlsClient.connect(address, client_context(lab.certs, "client.b"))
            try:
                await client.send(b"x")
                await await_condition(
                    "the byte at the upstream",
                    lambda: lab.up_loop.call(lambda: any(c.nbytes for c in upstream.conns)),
                )
                child.proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(10):
                    held = await client.recv_all()
                return held, client.end
            finally:
                await client.aclose()

        held, end = uvloop.run(main())
        code = child.proc.wait(timeout=10)
        child.join()

    assert (held, end) == (b"", End.CLOSE_NOTIFY)  # closed with close_notify, not a reset
    assert code == 0, child.stderr
    (access,) = child.events("access")
    assert (access["decision"], access["reason"]) == ("forwarded", "drain_timeout")
    assert access["duration_ms"] >= 300
    stopped = child.wait_for("stopped")
    assert (stopped["reason"], stopped["open_connections"]) == ("drain_timeout", 1)


def test_a_second_signal_stops_at_once(lab: Lab, tmp_path: Path) -> None:
    (upstream,) = lab.start_upstreams(["hold"])
    config = write_config(
        tmp_path / "proxy.yaml", lab.certs, [upstream.address], timeouts={"drain": "1h"}
    )

    def upstream_got_bytes() -> bool:
        return lab.up_loop.call(lambda: any(conn.nbytes > 0 for conn in upstream.conns))

    with proxy_process(config) as child:
        address = child.address()
        child.wait_for("health", upstream=upstream.address, new="up")

        async def main() -> tuple[bytes, End | None, bytes, float]:
            loop = asyncio.get_running_loop()
            # A connection stuck before its handshake. The proxy accepts in order, so
            # once the later TLS connection is forwarding this one has been accepted too.
            pending_reader, pending_writer = await asyncio.open_connection(*address)
            client = await TlsClient.connect(address, client_context(lab.certs, "client.b"))
            try:
                await client.send(b"x")
                await await_condition("the byte at the upstream", upstream_got_bytes)
                child.proc.send_signal(signal.SIGTERM)
                child.wait_for("draining")
                sent = loop.time()
                child.proc.send_signal(signal.SIGTERM)
                async with asyncio.timeout(5):
                    held = await client.recv_all()
                    pending = await pending_reader.read()
                return held, client.end, pending, loop.time() - sent
            finally:
                await client.aclose()
                pending_writer.close()
                await pending_writer.wait_closed()

        held, end, pending, waited = uvloop.run(main())
        assert (held, end) == (b"", End.CLOSE_NOTIFY)  # the held stream ends cleanly
        assert pending == b""  # and the pending handshake sees a plain EOF
        started = time.monotonic()
        code = child.proc.wait(timeout=5)
        assert waited + (time.monotonic() - started) < 5
        child.join()

    assert code == 0, child.stderr
    assert "Traceback" not in child.stderr
    assert child.garbage == []
    stopped = child.wait_for("stopped")
    assert (stopped["reason"], stopped["open_connections"]) == ("forced", 2)
    access = child.events("access")
    assert len(access) == 2, access
    by_decision = {r["decision"]: r for r in access}
    assert set(by_decision) == {"forwarded", "aborted"}
    assert all(r["reason"] == "shutdown" for r in access)
    forwarded, aborted = by_decision["forwarded"], by_decision["aborted"]
    assert forwarded["client"] == "client.b"
    assert forwarded["upstream"] == upstream.address
    assert forwarded["bytes_up"] == 1
    assert aborted["client"] is None
    assert aborted["handshake_ms"] is None
    assert child.records.index(stopped) > max(child.records.index(r) for r in access)
    assert child.events("error") == []


def test_listen_address_in_use_exits_1_with_a_fatal_line(lab: Lab, tmp_path: Path) -> None:
    (upstream,) = lab.start_upstreams(["echo"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        config = write_config(
            tmp_path / "proxy.yaml", lab.certs, [upstream.address], listen=f"{host}:{port}"
        )
        done = run(config)
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    records = json_lines(done.stdout)
    fatal = [r for r in records if r["event"] == "fatal"]
    assert len(fatal) == 1, records
    assert f"{host}:{port}" in fatal[0]["message"]
    assert "address already in use" in fatal[0]["message"].lower()
    assert not [r for r in records if r["event"] == "listening"]


def adminctl(config: Path, command_name: str) -> subprocess.CompletedProcess[str]:
    return child([sys.executable, "-m", "l4proxy.adminctl", "--config", str(config), command_name])


def test_adminctl_loads_neither_cryptography_nor_prometheus_client() -> None:
    """adminctl is the proxy image's HEALTHCHECK, run every few seconds: it needs the
    config's admin address, not the data path's libraries (with cryptography it took
    ~190 ms of CPU per check, as much as the proxy itself at 66 connections/s)."""
    heavy = ("cryptography", "prometheus_client", "uvloop")
    probe = (
        "import sys, l4proxy.adminctl; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))"
    )
    done = child([sys.executable, "-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_adminctl_and_sighup_reach_the_running_proxy(lab: Lab, tmp_path: Path) -> None:
    (upstream,) = lab.start_upstreams(["echo"])
    admin = f"127.0.0.1:{free_port()}"
    config = write_config(
        tmp_path / "proxy.yaml", lab.certs, [upstream.address], admin={"listen": admin}
    )
    with proxy_process(config) as child:
        child.wait_for("health", upstream=upstream.address, new="up")
        ready = adminctl(config, "ready")
        assert (ready.returncode, json.loads(ready.stdout)) == (
            0,
            {"ready": True, "reason": "ready"},
        )
        status = json.loads(adminctl(config, "status").stdout)
        assert status["config"]["path"] == str(config)
        assert "l4proxy_connections_accepted_total 0.0" in adminctl(config, "metrics").stdout
        reloaded = adminctl(config, "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        child.wait_for("reload", result="ok")
        child.proc.send_signal(signal.SIGHUP)
        child.wait_for("reload", count=2, result="ok")
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(timeout=10) == 0
        child.join()
    down = adminctl(config, "ready")  # nothing listens any more
    assert down.returncode == 1
    assert "cannot reach the admin listener" in down.stderr


def test_admin_address_in_use_exits_1_naming_admin_listen(lab: Lab, tmp_path: Path) -> None:
    (upstream,) = lab.start_upstreams(["echo"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        config = write_config(
            tmp_path / "proxy.yaml",
            lab.certs,
            [upstream.address],
            admin={"listen": f"{host}:{port}"},
        )
        done = run(config)
    assert done.returncode == 1, (done.stdout, done.stderr)
    fatal = [r for r in json_lines(done.stdout) if r["event"] == "fatal"]
    assert len(fatal) == 1
    assert f"{host}:{port} (admin.listen)" in fatal[0]["message"]
    assert "address already in use" in fatal[0]["message"].lower()


def test_silent_client_is_closed_at_the_handshake_timeout(lab: Lab, tmp_path: Path) -> None:
    """Cut at the configured 300 ms: not before, and well before the 5 s default."""
    (upstream,) = lab.start_upstreams(["echo"])
    config = write_config(
        tmp_path / "proxy.yaml", lab.certs, [upstream.address], timeouts={"handshake": "300ms"}
    )
    with proxy_process(config) as child:
        address = child.address()
        with socket.create_connection(address, timeout=10) as silent:
            started = time.monotonic()  # once connected: no later than the proxy's accept
            silent.settimeout(3)
            assert silent.recv(1024) == b""  # EOF, not a timeout or a reset
            waited = time.monotonic() - started
        line = child.wait_for("access")
        child.proc.send_signal(signal.SIGTERM)
        code = child.proc.wait(timeout=5)
        child.join()
    assert 0.3 * 0.9 <= waited < 1.5, waited
    assert line["decision"] == "handshake_timeout"
    assert line["reason"] == "handshake_not_finished"
    assert line["client"] is None
    assert 300 * 0.9 <= line["duration_ms"] < 1500, line
    assert code == 0, child.stderr
    assert "Traceback" not in child.stderr
    # Nothing reached the upstream (its only connection is the start-up health check).
    assert lab.up_loop.call(
        lambda: upstream.stats.received == [] and all(c.nbytes == 0 for c in upstream.conns)
    )
