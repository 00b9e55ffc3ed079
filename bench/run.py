"""layer4lab benchmark: our proxy side by side with HAProxy, CPU time per unit of work.

    .venv/bin/python bench/run.py [--quick] [--only bulk,churn] [--repeat N] [--order ...]

For each workload (bulk, pingpong, churn, idle) and each proxy (one after the other; by
default the order alternates: bulk ours first, pingpong HAProxy first...), it starts
fresh processes: the
upstreams (``bench/echo_server.py``), the proxy, and the load generator(s)
(``bench/loadgen.py``); it samples the proxy's CPU time (utime + stime from
``/proc/PID/stat``) and memory (``/proc/PID/status``) at the load generator's
checkpoints, so the figures cover exactly the measured work; then it stops everything.
It prints a table and writes ``bench/results/latest.json``. See ``bench/README.md``.

Everything runs on loopback; every workload is bounded in count and in time, and all
child processes (each in its own process group) are killed whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any, ClassVar

import yaml

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PROXY_DIR = ROOT / "services" / "proxy"
COMMON_DIR = ROOT / "services" / "common"  # l4common, which the proxy imports
CLK_TCK = os.sysconf("SC_CLK_TCK")
KINDS = ("ours", "haproxy")
WORKLOADS = ("bulk", "pingpong", "churn", "resumption", "idle")
RESUMED_AT_LEAST = 0.9  # resumption: a run where fewer handshakes resumed is a failure
NOFILE_WANTED = 200_000
HAPROXY_MAXCONN = 30_000  # lowered when RLIMIT_NOFILE cannot be raised enough (see fd_plan)
NOISY_CPUS = 0.25  # other processes' average CPUs in a window that makes it suspect
FD_RESERVE = 200  # listeners, logs, epoll, health checks... beyond 2 fds per connection
GIB = 1 << 30
MIB = 1 << 20


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Sizes:
    bulk_conns: int
    bulk_bytes_per_conn: int
    bulk_timeout: float
    pingpong_conns: int
    pingpong_messages: int
    pingpong_size: int
    pingpong_timeout: float
    churn_connections: int
    churn_concurrency: int
    churn_size: int
    churn_warmup: int
    churn_timeout: float
    idle_connections: int
    idle_loadgens: int
    idle_open_concurrency: int
    idle_probes: int
    idle_settle: float
    idle_timeout: float
    budget: float  # the whole run, both proxies, every workload


FULL = Sizes(
    bulk_conns=8,
    bulk_bytes_per_conn=256 * MIB,
    bulk_timeout=240,
    pingpong_conns=64,
    pingpong_messages=200_000,
    pingpong_size=1024,
    pingpong_timeout=180,
    churn_connections=5000,
    churn_concurrency=32,
    churn_size=1024,
    churn_warmup=64,
    churn_timeout=180,
    idle_connections=10_000,
    idle_loadgens=2,
    idle_open_concurrency=32,
    idle_probes=20,
    idle_settle=2.0,
    idle_timeout=300,
    budget=1500,
)

QUICK = Sizes(
    bulk_conns=8,
    bulk_bytes_per_conn=32 * MIB,
    bulk_timeout=40,
    pingpong_conns=64,
    pingpong_messages=20_000,
    pingpong_size=1024,
    pingpong_timeout=30,
    churn_connections=600,
    churn_concurrency=32,
    churn_size=1024,
    churn_warmup=32,
    churn_timeout=30,
    idle_connections=2000,
    idle_loadgens=1,
    idle_open_concurrency=32,
    idle_probes=10,
    idle_settle=1.0,
    idle_timeout=45,
    budget=115,
)

# (workload, key, label, unit, target for ours/haproxy or None, lower is better). The
# targets are issue 15's, judged on the median per-round ratio.
METRICS: list[tuple[str, str, str, str, float | None, bool]] = [
    ("bulk", "cpu_s_per_gib", "proxy CPU per GiB", "s", 1.0, True),
    ("bulk", "mib_per_s", "throughput", "MiB/s", None, False),
    ("bulk", "cpu_utilization", "proxy CPU busy", "frac", None, True),
    ("bulk", "sys_fraction", "proxy CPU in kernel", "frac", None, True),
    ("bulk", "peak_rss_mib", "peak RSS (VmHWM)", "MiB", None, True),
    ("pingpong", "cpu_us_per_message", "proxy CPU per message", "us", 1.1, True),
    ("pingpong", "messages_per_s", "throughput", "msg/s", None, False),
    ("pingpong", "latency_p50_us", "round trip p50", "us", None, True),
    ("pingpong", "latency_p99_us", "round trip p99", "us", None, True),
    ("pingpong", "cpu_utilization", "proxy CPU busy", "frac", None, True),
    ("pingpong", "sys_fraction", "proxy CPU in kernel", "frac", None, True),
    ("pingpong", "peak_rss_mib", "peak RSS (VmHWM)", "MiB", None, True),
    ("churn", "cpu_us_per_connection", "proxy CPU per connection", "us", 1.1, True),
    ("churn", "connections_per_s", "throughput", "conn/s", None, False),
    ("churn", "handshake_p50_ms", "connect+handshake p50", "ms", None, True),
    ("churn", "handshake_p99_ms", "connect+handshake p99", "ms", None, True),
    ("churn", "request_p99_ms", "whole request p99", "ms", None, True),
    ("churn", "cpu_utilization", "proxy CPU busy", "frac", None, True),
    ("churn", "sys_fraction", "proxy CPU in kernel", "frac", None, True),
    ("churn", "peak_rss_mib", "peak RSS (VmHWM)", "MiB", None, True),
    ("resumption", "cpu_us_per_connection", "proxy CPU per connection", "us", 1.0, True),
    ("resumption", "connections_per_s", "throughput", "conn/s", None, False),
    ("resumption", "resumed_fraction", "handshakes resumed", "frac", None, False),
    ("resumption", "handshake_p50_ms", "connect+handshake p50", "ms", None, True),
    ("resumption", "handshake_p99_ms", "connect+handshake p99", "ms", None, True),
    ("resumption", "cpu_utilization", "proxy CPU busy", "frac", None, True),
    ("resumption", "sys_fraction", "proxy CPU in kernel", "frac", None, True),
    ("idle", "rss_per_connection_kib", "RSS per idle connection", "KiB", 1.15, True),
    ("idle", "probe_held_p50_ms", "new request while held, p50", "ms", None, True),
    ("idle", "probe_held_max_ms", "new request while held, max", "ms", None, True),
    ("idle", "probe_empty_p50_ms", "new request, no load, p50", "ms", None, True),
    ("idle", "cpu_ms_per_open", "proxy CPU per connection opened", "ms", None, True),
    ("idle", "peak_rss_mib", "peak RSS (VmHWM)", "MiB", None, True),
]


# Where the processes run (CPU affinity, set before exec). proxy-alone: the proxy on one
# CPU of its own, upstreams and load generators on the others; one-cpu: everything on
# one CPU; unpinned: wherever the scheduler puts them. The README reports proxy-alone.
PLACEMENTS = ("proxy-alone", "one-cpu", "unpinned")


def cpus_for(placement: str, role: str, cpus: Sequence[int]) -> frozenset[int] | None:
    """The CPUs a process of ``role`` (``proxy`` or anything else) may run on under
    ``placement``, out of ``cpus`` (this process's own); None: not pinned."""
    ordered = sorted(cpus)
    if placement == "unpinned":
        return None
    if placement == "one-cpu":
        return frozenset(ordered[:1])
    if placement == "proxy-alone":
        if len(ordered) < 2:
            raise BenchError("placement proxy-alone needs two CPUs")
        return frozenset(ordered[-1:]) if role == "proxy" else frozenset(ordered[:-1])
    raise BenchError(f"unknown placement {placement!r}")


class BenchError(Exception):
    """A workload failed: a child died, answered wrongly, or ran out of time."""


# --------------------------------------------------------------------------- /proc


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (our proxy with ``workers: N`` is a supervisor and
    N worker processes; a proxy's CPU time and memory are theirs together)."""
    out = [pid]
    for parent in out:
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                out.extend(int(c) for c in task.read_text().split())
    return out


def tree_texts(pid: int, name: str) -> Iterator[str]:
    """``/proc/PID/<name>`` of the process and of each descendant still there (one that
    just exited is skipped; the process itself gone is an OSError)."""
    for i, one in enumerate(process_tree(pid)):
        try:
            yield Path(f"/proc/{one}/{name}").read_text()
        except OSError:
            if i == 0:
                raise


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process and its descendants (all threads), in seconds."""
    user = system = 0.0
    for stat in tree_texts(pid, "stat"):
        fields = stat[stat.rindex(")") + 2 :].split()
        user += int(fields[11]) / CLK_TCK  # fields 14 and 15, stat(5)
        system += int(fields[12]) / CLK_TCK
    return user, system


def sched_seconds(pid: int) -> float:
    """Time on CPU from /proc/PID/schedstat (nanoseconds): a finer cross-check."""
    try:
        return sum(int(text.split()[0]) / 1e9 for text in tree_texts(pid, "schedstat"))
    except (OSError, ValueError, IndexError):
        return math.nan


def memory_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {"VmRSS": 0, "VmHWM": 0}
    for text in tree_texts(pid, "status"):
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all CPUs."""
    parts = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(v) for v in parts[:8]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / CLK_TCK, sum(values) / CLK_TCK


def listening_on(port: int) -> bool:
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 3 and (cols[1] + " ").endswith(needle) and cols[3] == "0A":
                    return True
    return False


def free_port() -> int:
    import socket  # noqa: PLC0415 - only needed here

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- processes


class Child:
    """A child process in its own process group; killed (the whole group) on stop."""

    live: ClassVar[set[Child]] = set()

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdout: Path | None = None,
        stderr: Path,
        control: bool = False,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        cpus: frozenset[int] | None = None,
    ) -> None:
        self.name = name
        self.stderr_path = stderr
        self.buf = b""
        out_file: IO[bytes] | None = stdout.open("wb") if stdout is not None else None
        err_file = stderr.open("wb")
        try:
            self.popen = subprocess.Popen(  # noqa: S603 - our own argv, no shell
                list(argv),
                stdin=subprocess.PIPE if control else subprocess.DEVNULL,
                stdout=out_file if out_file is not None else subprocess.PIPE,
                stderr=err_file,
                cwd=cwd,
                env=env,
                start_new_session=True,
                # Pinned before exec, so every thread it starts inherits the set.
                preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),  # noqa: PLW1509
            )
        finally:
            if out_file is not None:
                out_file.close()
            err_file.close()
        Child.live.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, n: int = 800) -> str:
        try:
            return self.stderr_path.read_bytes()[-n:].decode(errors="replace").strip()
        except OSError:
            return ""

    def readline(self, deadline: float) -> str:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BenchError(f"{self.name}: no answer before the workload's time limit")
            ready, _, _ = select.select([fd], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.popen.wait(timeout=5)
                    raise BenchError(
                        f"{self.name} exited with status {self.popen.returncode}: "
                        f"{self.stderr_tail()}"
                    )
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def event(self, deadline: float) -> dict[str, Any]:
        line = self.readline(deadline)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{self.name}: not JSON: {line[:200]!r}") from exc
        if not isinstance(obj, dict):
            raise BenchError(f"{self.name}: unexpected output {line[:200]!r}")
        if obj.get("event") == "error":
            raise BenchError(f"{self.name}: {obj.get('message')}")
        return obj

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()
        except BrokenPipeError as exc:
            raise BenchError(f"{self.name} is gone: {self.stderr_tail()}") from exc

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the group, then SIGKILL it after ``grace`` seconds."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers of the group, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        Child.live.discard(self)
        return self.popen.returncode

    @classmethod
    def stop_all(cls) -> None:
        for child in list(cls.live):
            child.stop(grace=2.0)


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def raise_fd_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE for us and every child (they inherit it)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = NOFILE_WANTED
    with contextlib.suppress(OSError, ValueError):
        want = min(want, int(Path("/proc/sys/fs/nr_open").read_text()))
    for limits in ((want, max(hard, want)), (min(want, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (OSError, ValueError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --------------------------------------------------------------------------- set-up


def ensure_haproxy(install: bool) -> str:
    """The haproxy binary; installed from Debian's packages when missing (as root).

    The packaged service is never left running: this benchmark runs its own haproxy in
    the foreground with its own configuration."""
    found = shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None
    )
    if found:
        return found
    if not install:
        raise BenchError("haproxy is not installed (and --no-install was given)")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BenchError("haproxy is missing: install it (apt-get install -y haproxy)")
    apt_install("haproxy")
    stop_packaged_service()
    found = shutil.which("haproxy") or "/usr/sbin/haproxy"
    if not Path(found).exists():
        raise BenchError("apt-get install haproxy did not provide /usr/sbin/haproxy")
    return found


def apt_install(package: str) -> None:
    """``apt-get update``, then ``apt-get install -y PACKAGE`` (as root); raises
    ``subprocess.CalledProcessError`` if the install fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"installing {package} from Debian's packages (apt-get) ...", flush=True)
    subprocess.run(["apt-get", "update"], env=env, check=False, timeout=300)  # noqa: S607
    subprocess.run(  # noqa: S603 - a package name of ours, no shell
        ["apt-get", "install", "-y", package],  # noqa: S607
        env=env,
        check=True,
        timeout=600,
    )


def stop_packaged_service() -> None:
    """Stop the Debian haproxy service if the package's scripts started it."""
    for argv in (["service", "haproxy", "stop"], ["systemctl", "stop", "haproxy"]):
        if shutil.which(argv[0]):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(  # noqa: S603
                    argv, check=False, timeout=30, capture_output=True
                )


def haproxy_version(binary: str) -> str:
    out = subprocess.run(  # noqa: S603
        [binary, "-v"], check=False, capture_output=True, text=True, timeout=10
    ).stdout
    first = out.splitlines()[0].strip() if out else "unknown"
    return first.split(" - ", 1)[0]  # "HAProxy version 2.6.12-1+deb12u4 2026/10/17"


def make_certs(out: Path) -> None:
    subprocess.run(  # noqa: S603
        [sys.executable, str(ROOT / "certgen" / "certgen.py"), "--out", str(out)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    combined = out / "server-combined.pem"
    combined.write_bytes((out / "server.pem").read_bytes() + (out / "server.key").read_bytes())
    combined.chmod(0o600)


def ours_config(certs: Path, ports: Sequence[int], tickets: bool = True, workers: int = 1) -> str:
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "tls": {
            "ca": str(certs / "ca.pem"),
            "cert": str(certs / "server.pem"),
            "key": str(certs / "server.key"),
            "identity": "cn",
            "session_tickets": 1 if tickets else 0,
        },
        "upstreams": [
            {"address": f"127.0.0.1:{p}", "name": f"u{i + 1}"} for i, p in enumerate(ports)
        ],
        "balancer": "least_connections",
        "health_check": {"interval": "3s", "timeout": "1s", "rise": 1, "fall": 1},
        "rate_limit": {"enabled": False},
        # A stop after a workload need not wait for stragglers (SIGTERM drains).
        "timeouts": {"handshake": "5s", "connect": "1s", "idle": "5m", "drain": "1s"},
        "admin": {"listen": "127.0.0.1:0"},  # on, as in production; any free port
    }
    if workers > 1:
        config["workers"] = workers
    return yaml.safe_dump(config, sort_keys=False)


def fd_plan(nofile_hard: int, idle_wanted: int) -> dict[str, int]:
    """A proxy holds two sockets per proxied connection (client and upstream side).

    Where the hard RLIMIT_NOFILE cannot be raised (no CAP_SYS_RESOURCE, e.g. in a
    container), HAProxy's maxconn and the idle workload's size must fit under it, or
    HAProxy refuses to start and our proxy runs out of descriptors."""
    per_proxy = max(100, (nofile_hard - FD_RESERVE) // 2)
    maxconn = min(HAPROXY_MAXCONN, per_proxy)
    return {
        "nofile_hard": nofile_hard,
        "haproxy_maxconn": maxconn,
        "idle_connections_wanted": idle_wanted,
        "idle_connections": min(idle_wanted, maxconn - 50),
    }


def haproxy_config(
    certs: Path,
    ports: Sequence[int],
    port: int,
    log: bool,
    *,
    maxconn: int = HAPROXY_MAXCONN,
    tickets: bool = True,
    threads: int = 1,
) -> str:
    servers = "\n".join(
        f"    server u{i + 1} 127.0.0.1:{p} check inter 3s rise 1 fall 1"
        for i, p in enumerate(ports)
    )
    log_global = "    log stdout format raw local0\n" if log else ""
    log_defaults = "    log global\n    option tcplog\n" if log else "    no log\n"
    crt, ca = certs / "server-combined.pem", certs / "ca.pem"
    no_tickets = "" if tickets else " no-tls-tickets"
    return f"""\
# Written by bench/run.py: the same job as our proxy's YAML next to it.
global
    nbthread {threads}
    maxconn {maxconn}
{log_global}    ssl-default-bind-ciphers ECDHE+AESGCM:ECDHE+CHACHA20
    ssl-default-bind-options ssl-min-ver TLSv1.2

defaults
    mode tcp
{log_defaults}    maxconn {maxconn}
    timeout connect 1s
    timeout client 5m
    timeout server 5m
    timeout check 1s

frontend mtls
    bind 127.0.0.1:{port} ssl crt {crt} ca-file {ca} verify required{no_tickets}
    default_backend upstreams

backend upstreams
    balance leastconn
{servers}
"""


# --------------------------------------------------------------------------- one run


@dataclass
class Setup:
    tmp: Path
    certs: Path
    haproxy: str
    sizes: Sizes
    haproxy_log: bool
    run_deadline: float
    haproxy_maxconn: int
    idle_connections: int
    placement: str = "unpinned"
    cpus: tuple[int, ...] = ()  # the runner's own CPUs, which placements divide
    tickets: bool = True  # TLS 1.3 session tickets: ours one, HAProxy OpenSSL's two
    workers: int = 1  # ours: workers; HAProxy: nbthread
    # bench/instructions.py: an argv prefix for the proxy ("{tag}" becomes the run's tag,
    # e.g. valgrind's output file), and the longer waits a proxy under valgrind needs.
    wrap: tuple[str, ...] = ()
    start_timeout: float = 20.0
    stop_grace: float = 5.0

    def pin(self, role: str) -> frozenset[int] | None:
        return cpus_for(self.placement, role, self.cpus)

    def wrapped(self, tag: str, argv: Sequence[str]) -> list[str]:
        return [part.replace("{tag}", tag) for part in self.wrap] + list(argv)


@dataclass
class Proxy:
    child: Child
    address: str
    config: str
    log: Path


def wait_for(predicate: Callable[[], bool], deadline: float, what: str, child: Child) -> None:
    while not predicate():
        if not child.alive():
            raise BenchError(f"{what}: {child.name} exited: {child.stderr_tail()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready in time")
        time.sleep(0.02)


def start_upstreams(setup: Setup, tag: str, mode: str, deadline: float) -> tuple[Child, list[int]]:
    child = Child(
        f"upstream-{mode}",
        [sys.executable, str(BENCH / "echo_server.py"), "--mode", mode, "--count", "3"],
        stderr=setup.tmp / f"{tag}-upstream.err",
        cpus=setup.pin("upstream"),
    )
    ready = child.event(min(deadline, time.monotonic() + 20))
    return child, [int(p) for p in ready["ports"]]


def log_events(log: Path) -> Iterator[dict[str, Any]]:
    """The JSON lines a proxy (ours, or the floor) has written to ``log`` so far."""
    for line in log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            yield json.loads(line)


def listening_address(log: Path) -> str | None:
    """The address of the proxy's ``listening`` line in ``log``, once it is there."""
    for ev in log_events(log):
        if ev.get("event") == "listening":
            return str(ev["address"])
    return None


def start_ours(setup: Setup, tag: str, ports: Sequence[int], deadline: float) -> Proxy:
    config = ours_config(setup.certs, ports, setup.tickets, setup.workers)
    path = setup.tmp / f"{tag}-ours.yaml"
    path.write_text(config)
    log = setup.tmp / f"{tag}-ours.log"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROXY_DIR), str(COMMON_DIR)])}
    child = Child(
        "ours",
        setup.wrapped(tag, [sys.executable, "-m", "l4proxy", "--config", str(path)]),
        stdout=log,
        stderr=setup.tmp / f"{tag}-ours.err",
        cwd=PROXY_DIR,
        env=env,
        cpus=setup.pin("proxy"),
    )

    def all_up() -> bool:
        ups = {ev.get("upstream") for ev in log_events(log) if ev.get("event") == "health"}
        return len(ups) >= len(ports)

    limit = min(deadline, time.monotonic() + setup.start_timeout)
    wait_for(lambda: listening_address(log) is not None, limit, "our proxy", child)
    wait_for(all_up, limit, "our proxy's first health checks", child)
    address = listening_address(log)
    assert address is not None
    return Proxy(child, address, config, log)


def start_haproxy(setup: Setup, tag: str, ports: Sequence[int], deadline: float) -> Proxy:
    port = free_port()
    config = haproxy_config(
        setup.certs,
        ports,
        port,
        setup.haproxy_log,
        maxconn=setup.haproxy_maxconn,
        tickets=setup.tickets,
        threads=setup.workers,
    )
    path = setup.tmp / f"{tag}-haproxy.cfg"
    path.write_text(config)
    log = setup.tmp / f"{tag}-haproxy.log"
    child = Child(
        "haproxy",
        setup.wrapped(tag, [setup.haproxy, "-db", "-f", str(path)]),
        stdout=log,
        stderr=setup.tmp / f"{tag}-haproxy.err",
        cpus=setup.pin("proxy"),
    )
    limit = min(deadline, time.monotonic() + setup.start_timeout)
    wait_for(lambda: listening_on(port), limit, "haproxy", child)
    time.sleep(0.3)  # let the first health checks run
    return Proxy(child, f"127.0.0.1:{port}", config, log)


def start_floor(setup: Setup, tag: str, ports: Sequence[int], deadline: float) -> Proxy:
    """bench/floor_proxy.py: the least a Python TLS proxy does (bench/instructions.py)."""
    log = setup.tmp / f"{tag}-floor.log"
    argv = [sys.executable, str(BENCH / "floor_proxy.py"), "--certs", str(setup.certs)]
    child = Child(
        "floor",
        setup.wrapped(tag, argv + [str(p) for p in ports]),
        stdout=log,
        stderr=setup.tmp / f"{tag}-floor.err",
        cpus=setup.pin("proxy"),
    )
    limit = min(deadline, time.monotonic() + setup.start_timeout)
    wait_for(lambda: listening_address(log) is not None, limit, "floor", child)
    address = listening_address(log)
    assert address is not None
    return Proxy(child, address, " ".join(argv), log)


STARTERS: dict[str, Callable[[Setup, str, Sequence[int], float], Proxy]] = {
    "ours": start_ours,
    "haproxy": start_haproxy,
    "floor": start_floor,
}


def loadgen_argv(workload: str, setup: Setup, address: str, index: int) -> list[str]:
    s = setup.sizes
    base = [
        sys.executable,
        str(BENCH / "loadgen.py"),
        workload,
        "--address",
        address,
        "--certs",
        str(setup.certs),
    ]
    if workload == "bulk":
        extra = ["--conns", s.bulk_conns, "--bytes-per-conn", s.bulk_bytes_per_conn]
    elif workload == "pingpong":
        extra = ["--conns", s.pingpong_conns, "--total", s.pingpong_messages]
        extra += ["--size", s.pingpong_size, "--warmup", 10]
    elif workload in ("churn", "resumption"):
        extra = ["--total", s.churn_connections, "--concurrency", s.churn_concurrency]
        extra += ["--size", s.churn_size, "--warmup", s.churn_warmup]
    else:
        n = setup.idle_connections // s.idle_loadgens
        if index < setup.idle_connections % s.idle_loadgens:
            n += 1
        extra = ["--conns", n, "--concurrency", s.idle_open_concurrency, "--warmup", 16]
        extra += ["--probes", s.idle_probes if index == 0 else 0, "--settle", s.idle_settle]
    return base + [str(x) for x in extra]


PHASES = {
    "bulk": ("start", "end"),
    "pingpong": ("start", "end"),
    "churn": ("start", "end"),
    "resumption": ("start", "end"),
    "idle": ("baseline", "held", "probed"),
}
TIMEOUTS = {
    "bulk": "bulk_timeout",
    "pingpong": "pingpong_timeout",
    "churn": "churn_timeout",
    "resumption": "churn_timeout",
    "idle": "idle_timeout",
}


def snapshot(roles: dict[str, Child]) -> dict[str, Any]:
    procs: dict[str, Any] = {}
    for role, child in roles.items():
        try:
            user, system = cpu_times(child.pid)
            procs[role] = {
                "cpu_s": user + system,
                "user_s": user,
                "sys_s": system,
                "sched_s": sched_seconds(child.pid),
                **memory_kib(child.pid),
            }
        except OSError as exc:
            raise BenchError(f"{role} ({child.name}) is gone: {child.stderr_tail()}") from exc
    busy, total = machine_cpu()
    return {"t": time.monotonic(), "procs": procs, "machine_busy_s": busy, "machine_s": total}


@dataclass
class Run:
    """The processes of one workload against one proxy, for cleaning up."""

    children: list[Child]
    proxy: Proxy | None = None


def run_one(setup: Setup, workload: str, kind: str, tag: str) -> dict[str, Any]:
    """One workload against one proxy, from fresh processes; never raises BenchError."""
    limit = float(getattr(setup.sizes, TIMEOUTS[workload]))
    started = time.monotonic()
    deadline = min(started + limit, setup.run_deadline)
    run = Run(children=[])
    out: dict[str, Any] = {"ok": False, "workload": workload, "proxy": kind}
    try:
        out.update(drive(setup, workload, kind, tag, deadline=deadline, run=run))
        out["ok"] = True
    except BenchError as exc:
        out["error"] = str(exc)
    except (OSError, KeyError, TypeError, ValueError, subprocess.SubprocessError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"  # a bug here, or a malformed answer
    finally:
        for child in reversed(run.children):
            child.stop(grace=setup.stop_grace)
        out["wall_s"] = round(time.monotonic() - started, 3)
        if run.proxy is not None:
            out["proxy_log"] = summarize_log(kind, run.proxy.log)
            out["proxy_stderr"] = run.proxy.child.stderr_tail(400)
            out["config"] = run.proxy.config
    return out


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise BenchError(message)


def drive(
    setup: Setup, workload: str, kind: str, tag: str, *, deadline: float, run: Run
) -> dict[str, Any]:
    expect(deadline - time.monotonic() >= 5, "skipped: the run's time budget is spent")
    mode = "sink" if workload == "bulk" else "echo"
    upstream, ports = start_upstreams(setup, tag, mode, deadline)
    run.children.append(upstream)
    start = STARTERS[kind]
    proxy = run.proxy = start(setup, tag, ports, deadline)
    run.children.append(proxy.child)
    nloadgens = setup.sizes.idle_loadgens if workload == "idle" else 1
    loadgens = []
    for i in range(nloadgens):
        loadgens.append(
            Child(
                f"loadgen-{i}",
                loadgen_argv(workload, setup, proxy.address, i),
                stderr=setup.tmp / f"{tag}-loadgen{i}.err",
                control=True,
                cpus=setup.pin("loadgen"),
            )
        )
        run.children.append(loadgens[-1])
    roles = {"proxy": proxy.child, "upstream": upstream}
    roles.update({f"loadgen{i}": lg for i, lg in enumerate(loadgens)})
    samples: dict[str, Any] = {}
    checkpoints: dict[str, list[dict[str, Any]]] = {}
    for phase in PHASES[workload]:
        events = [lg.event(deadline) for lg in loadgens]
        for ev in events:
            expect(
                ev.get("event") == "checkpoint" and ev.get("name") == phase,
                f"expected checkpoint {phase!r}, got {str(ev)[:300]}",
            )
        expect(proxy.child.alive(), f"the proxy died: {proxy.child.stderr_tail()}")
        samples[phase] = snapshot(roles)
        checkpoints[phase] = events
        for lg in loadgens:
            lg.send("go")
    results = []
    for lg in loadgens:
        ev = lg.event(deadline)
        expect(ev.get("event") == "done", f"{lg.name}: expected done, got {str(ev)[:200]}")
        results.append(ev["result"])
    samples["done"] = snapshot(roles)
    return compute(workload, samples, checkpoints, results)


def summarize_log(kind: str, log: Path) -> dict[str, Any]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    if kind == "haproxy":
        return {"lines": len(lines)}
    events: Counter[str] = Counter()
    workers: Counter[str] = Counter()  # access lines by worker (workers: N)
    decisions: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    errors: list[str] = []
    for line in lines:
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        events[str(ev.get("event"))] += 1
        if ev.get("event") == "access":
            decisions[str(ev.get("decision"))] += 1
            reasons[str(ev.get("reason"))] += 1
            if "worker" in ev:
                workers[str(ev["worker"])] += 1
        elif ev.get("event") in ("error", "fatal") and len(errors) < 5:
            errors.append(line[:300])
    return {
        "events": dict(events),
        "decisions": dict(decisions),
        "reasons": dict(reasons.most_common(8)),
        "errors": errors,
        "by_worker": dict(sorted(workers.items())),
    }


# --------------------------------------------------------------------------- figures


def pct(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))])


def window(samples: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """CPU seconds of every process, wall time and the machine's other load between two
    samples."""
    sa, sb = samples[a], samples[b]
    wall = sb["t"] - sa["t"]
    cpu = {role: sb["procs"][role]["cpu_s"] - sa["procs"][role]["cpu_s"] for role in sa["procs"]}
    sched = {
        role: sb["procs"][role]["sched_s"] - sa["procs"][role]["sched_s"] for role in sa["procs"]
    }
    busy = sb["machine_busy_s"] - sa["machine_busy_s"]
    proxy_a, proxy_b = sa["procs"]["proxy"], sb["procs"]["proxy"]
    return {
        "wall_s": round(wall, 4),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "proxy_user_s": round(proxy_b["user_s"] - proxy_a["user_s"], 3),
        "proxy_sys_s": round(proxy_b["sys_s"] - proxy_a["sys_s"], 3),
        "sched_cpu_s": {k: round(v, 4) for k, v in sched.items()},
        "machine_busy_s": round(busy, 3),
        "other_processes_cpu_s": round(busy - sum(cpu.values()), 3),
        "machine_capacity_s": round(wall * (os.cpu_count() or 1), 3),
    }


def rnd(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def compute(
    workload: str,
    samples: dict[str, Any],
    checkpoints: dict[str, list[dict[str, Any]]],
    results: list[dict[str, Any]],
) -> dict[str, Any]:
    peak_rss_mib = samples["done"]["procs"]["proxy"]["VmHWM"] / 1024
    fig: dict[str, Any] = {"peak_rss_mib": round(peak_rss_mib, 2), "tls": results[0].get("tls")}
    if workload == "idle":
        w_open = window(samples, "baseline", "held")
        w_probe = window(samples, "held", "probed")
        before = samples["baseline"]["procs"]["proxy"]["VmRSS"]
        with_conns = samples["held"]["procs"]["proxy"]["VmRSS"]
        held = sum(int(ev.get("held", 0)) for ev in checkpoints["held"])
        probes_empty = [v / 1000 for r in results for v in r["probe_us_empty"]]
        probes_held = [v / 1000 for r in results for v in r["probe_us_held"]]
        handshakes = [v / 1000 for r in results for v in r["handshake_us"]]
        opened = sum(int(r["opened"]) for r in results)
        fig.update(
            connections=held,
            rss_before_kib=before,
            rss_held_kib=with_conns,
            rss_per_connection_kib=rnd((with_conns - before) / held if held else None, 2),
            cpu_ms_per_open=rnd(w_open["cpu_s"]["proxy"] * 1000 / opened if opened else None),
            open_seconds=rnd(max(float(r["open_seconds"]) for r in results)),
            open_handshake_p99_ms=rnd(pct(handshakes, 0.99)),
            probe_empty_p50_ms=rnd(pct(probes_empty, 0.5)),
            probe_empty_max_ms=rnd(max(probes_empty) if probes_empty else None),
            probe_held_p50_ms=rnd(pct(probes_held, 0.5)),
            probe_held_max_ms=rnd(max(probes_held) if probes_held else None),
            probe_count=len(probes_held),
            held_after_probes=sum(int(ev.get("held", 0)) for ev in checkpoints["probed"]),
            failures=[r["failures"] for r in results],
            probe_failures=[r["probe_failures"] for r in results],
            windows={"open": w_open, "probe": w_probe},
            other_cpus=rnd(
                max(0.0, w_open["other_processes_cpu_s"]) / w_open["wall_s"]
                if w_open["wall_s"]
                else None
            ),
        )
        return fig
    w = window(samples, "start", "end")
    cpu = w["cpu_s"]["proxy"]
    fig["cpu_s"] = cpu
    fig["sys_fraction"] = rnd(w["proxy_sys_s"] / cpu if cpu > 0 else None)
    fig["cpu_utilization"] = rnd(cpu / w["wall_s"] if w["wall_s"] > 0 else None)
    fig["windows"] = {"measured": w}
    fig["other_cpus"] = rnd(
        max(0.0, w["other_processes_cpu_s"]) / w["wall_s"] if w["wall_s"] else None
    )
    r = results[0]
    seconds = float(r["seconds"])
    fig["seconds"] = rnd(seconds, 4)
    if workload == "bulk":
        moved = int(r["bytes"])
        fig.update(
            bytes=moved,
            direction="client -> proxy -> sink upstream (8-byte ack back)",
            mib_per_s=rnd(moved / MIB / seconds, 1),
            cpu_s_per_gib=rnd(cpu / (moved / GIB), 4),
        )
    elif workload == "pingpong":
        lat = [float(v) for v in r["latency_us"]]
        n = int(r["messages"])
        fig.update(
            messages=n,
            messages_per_s=rnd(n / seconds, 1),
            cpu_us_per_message=rnd(cpu * 1e6 / n if n else None, 2),
            latency_p50_us=rnd(pct(lat, 0.5), 1),
            latency_p99_us=rnd(pct(lat, 0.99), 1),
        )
    elif workload in ("churn", "resumption"):
        hs = [v / 1000 for v in r["handshake_us"]]
        req = [v / 1000 for v in r["request_us"]]
        n = int(r["connections"])
        fig.update(
            connections=n,
            failures=r["failures"],
            connections_per_s=rnd(n / seconds, 1),
            cpu_us_per_connection=rnd(cpu * 1e6 / n if n else None, 1),
            handshake_p50_ms=rnd(pct(hs, 0.5)),
            handshake_p99_ms=rnd(pct(hs, 0.99)),
            request_p50_ms=rnd(pct(req, 0.5)),
            request_p99_ms=rnd(pct(req, 0.99)),
        )
        if workload == "resumption":
            counts = r.get("resumed") or {}
            done = sum(counts.values())
            fraction = counts.get("resumed", 0) / done if done else 0.0
            fig["resumed_fraction"] = rnd(fraction)
            if fraction < RESUMED_AT_LEAST:
                raise BenchError(
                    f"resumption: the proxy resumed {fraction:.0%} of the handshakes "
                    f"({counts}); the workload compares resumed handshakes"
                )
    return fig


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [float(r[key]) for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(values) if values else None


def round_ratios(
    ours: Sequence[dict[str, Any]], theirs: Sequence[dict[str, Any]], key: str
) -> list[float]:
    """Ours / HAProxy's in each round where both ran and have the figure (round i of
    one is paired with round i of the other: they ran next to each other)."""
    ratios = []
    for a, b in zip(ours, theirs, strict=False):
        x, y = a.get(key), b.get(key)
        if a.get("ok") and b.get("ok") and x is not None and y:
            ratios.append(float(x) / float(y))
    return ratios


Runs = dict[str, dict[str, dict[str, list[dict[str, Any]]]]]  # placement, workload, kind


def summarize(runs: Runs) -> list[dict[str, Any]]:
    """One row per placement and metric: each proxy's median over the rounds, and the
    median and range of the per-round ratios."""
    rows = []
    for placement, by_workload in runs.items():
        for workload, key, label, unit, target, lower in METRICS:
            if workload not in by_workload:
                continue
            pair = by_workload[workload]
            ratios = round_ratios(pair["ours"], pair["haproxy"], key)
            ratio = statistics.median(ratios) if ratios else None
            met = None
            if target is not None and ratio is not None:
                met = ratio <= target if lower else ratio >= target
            rows.append(
                {
                    "placement": placement,
                    "workload": workload,
                    "metric": key,
                    "label": label,
                    "unit": unit,
                    "ours": median_of(pair["ours"], key),
                    "haproxy": median_of(pair["haproxy"], key),
                    "ratio": rnd(ratio, 3),
                    "ratio_min": rnd(min(ratios), 3) if ratios else None,
                    "ratio_max": rnd(max(ratios), 3) if ratios else None,
                    "rounds": len(ratios),
                    "target": target,
                    "met": met,
                }
            )
    return rows


def describe_placement(placement: str, cpus: Sequence[int]) -> str:
    proxy, others = cpus_for(placement, "proxy", cpus), cpus_for(placement, "loadgen", cpus)
    if proxy is None or others is None:
        return f"{placement}: no process pinned"
    if proxy == others:
        return f"{placement}: every process on CPU {min(proxy)}"
    return (
        f"{placement}: the proxy on CPU {','.join(map(str, sorted(proxy)))}, upstreams and "
        f"load generators on CPU {','.join(map(str, sorted(others)))}"
    )


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def worker_shares(runs: Runs) -> list[str]:
    """With ``--workers N``: how our connections spread over the workers, per run (the
    workers' access lines), e.g. ``50.4/49.6``."""
    lines = []
    for placement, by_workload in runs.items():
        for workload, by_kind in by_workload.items():
            shares = []
            for r in by_kind.get("ours", []):
                counts = r.get("proxy_log", {}).get("by_worker") or {}
                total = sum(counts.values())
                if total:
                    shares.append("/".join(f"{100 * n / total:.1f}" for n in counts.values()))
            if shares:
                lines.append(
                    f"our connections by worker, {placement} {workload}: {', '.join(shares)} %"
                )
    return lines


def print_table(rows: list[dict[str, Any]], runs: Runs, cpus: Sequence[int]) -> None:
    head = ("workload", "metric", "unit", "ours", "haproxy", "ours/hap", "range", "target", "")
    for placement in runs:
        print(describe_placement(placement, cpus))
        table = [head]
        for r in (row for row in rows if row["placement"] == placement):
            target = f"<= {r['target']}" if r["target"] is not None else ""
            status = {True: "met", False: "MISSED", None: ""}[r["met"]]
            if r["target"] is not None and r["ratio"] is None:
                status = "n/a"
            spread = f"{fmt(r['ratio_min'])}-{fmt(r['ratio_max'])}" if r["rounds"] > 1 else ""
            table.append(
                (
                    r["workload"],
                    r["label"],
                    r["unit"],
                    fmt(r["ours"]),
                    fmt(r["haproxy"]),
                    fmt(r["ratio"]),
                    spread,
                    target,
                    status,
                )
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for n, row in enumerate(table):
            cells = [
                c.ljust(widths[i]) if i < 3 or i > 6 else c.rjust(widths[i])
                for i, c in enumerate(row)
            ]
            print("  ".join(cells).rstrip())
            if n == 0:
                print("  ".join("-" * w for w in widths))
        print()
    for line in worker_shares(runs):
        print(line)
    noisy = False
    for placement, by_workload in runs.items():
        for workload, by_kind in by_workload.items():
            parts = []
            for kind, lst in by_kind.items():
                loads = [x for x in (other_load(r) for r in lst) if x is not None]
                if loads:
                    parts.append(f"{kind} {max(loads):.2f}")
                    noisy = noisy or max(loads) > NOISY_CPUS
            if parts:
                print(f"other processes' CPUs during {placement} {workload}: {', '.join(parts)}")
    if noisy:
        print(
            f"WARNING: other jobs used more than {NOISY_CPUS} CPU during a measured window: "
            "the figures are disturbed (run again, or use --repeat)"
        )
    for placement, by_workload in runs.items():
        for workload, by_kind in by_workload.items():
            for kind, lst in by_kind.items():
                for r in lst:
                    if not r.get("ok"):
                        print(f"FAILED {placement} {workload} / {kind}: {r.get('error')}")


def other_load(run: dict[str, Any]) -> float | None:
    """CPUs used on average by processes outside the benchmark in the measured window."""
    windows = run.get("windows") or {}
    w = windows.get("measured") or windows.get("open")
    if not w or not w["wall_s"]:
        return None
    return max(0.0, float(w["other_processes_cpu_s"]) / float(w["wall_s"]))


# --------------------------------------------------------------------------- main


def machine_info(haproxy: str) -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "openssl_python": ssl.OPENSSL_VERSION,
        "uvloop": metadata.version("uvloop"),
        "haproxy": haproxy_version(haproxy),
        "date": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "mem_total_kib": next(
            (
                int(line.split()[1])
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")
            ),
            None,
        ),
    }


def first_kind(order: str, workload_index: int, repeat: int) -> str:
    if order == "ours-first":
        return "ours"
    if order == "haproxy-first":
        return "haproxy"
    return KINDS[(workload_index + repeat) % 2]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark layer4lab's proxy against HAProxy (CPU time per unit of work)."
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, under 2 minutes")
    parser.add_argument(
        "--only", default=",".join(WORKLOADS), help="comma-separated workloads to run"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds: pairs per workload and placement (median)"
    )
    parser.add_argument(
        "--placements",
        default="proxy-alone",
        help=f"comma-separated CPU placements ({', '.join(PLACEMENTS)}) or all",
    )
    parser.add_argument(
        "--order",
        choices=("alternate", "ours-first", "haproxy-first"),
        default="alternate",
        help="which proxy goes first in each pair (alternate: flips every workload)",
    )
    parser.add_argument(
        "--no-haproxy-log",
        action="store_true",
        help="HAProxy without its per-connection log line (ours always logs one)",
    )
    parser.add_argument(
        "--no-tickets",
        action="store_true",
        help="neither proxy sends TLS 1.3 session tickets (not for resumption, which needs them)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="ours with workers: N, HAProxy with nbthread N (default 1)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install")
    parser.add_argument("--budget", type=float, help="seconds for the whole run")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs)")
    args = parser.parse_args(argv)
    unknown = set(args.only.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if not 1 <= args.repeat <= 10:
        parser.error("--repeat must be 1..10")
    if args.placements == "all":
        args.placements = ",".join(PLACEMENTS)
    wrong = set(args.placements.split(",")) - set(PLACEMENTS)
    if wrong:
        parser.error(f"unknown placement(s): {', '.join(sorted(wrong))}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    began = time.monotonic()
    sizes = QUICK if args.quick else FULL
    placements = list(dict.fromkeys(args.placements.split(",")))
    rounds = args.repeat * len(placements)
    budget = args.budget if args.budget is not None else sizes.budget * rounds
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    nofile = raise_fd_limit()
    tmp = Path(tempfile.mkdtemp(prefix="layer4lab-bench-"))
    try:
        haproxy = ensure_haproxy(install=not args.no_install)
        certs = tmp / "certs"
        make_certs(certs)
        fds = fd_plan(nofile[1], sizes.idle_connections)
        setup = Setup(
            tmp=tmp,
            certs=certs,
            haproxy=haproxy,
            sizes=sizes,
            haproxy_log=not args.no_haproxy_log,
            run_deadline=began + budget,
            haproxy_maxconn=fds["haproxy_maxconn"],
            idle_connections=fds["idle_connections"],
            cpus=cpus,
            tickets=not args.no_tickets,
            workers=args.workers,
        )
        for placement in placements:
            cpus_for(placement, "proxy", cpus)  # a placement this machine cannot do: exit 2
        machine = machine_info(haproxy)
        selected = [w for w in WORKLOADS if w in args.only.split(",")]
        mode = "quick" if args.quick else "full"
        print(
            f"layer4lab bench ({mode}): {', '.join(selected)}; {args.repeat} round(s) of "
            f"{', '.join(placements)}; {machine['nproc']} CPUs "
            f"{machine['cpu_model']}; {machine['haproxy']}; budget {budget:.0f} s",
            flush=True,
        )
        if fds["idle_connections"] < sizes.idle_connections:
            print(
                f"  note: RLIMIT_NOFILE hard limit {nofile[1]} (cannot be raised here): idle "
                f"holds {fds['idle_connections']} connections instead of "
                f"{sizes.idle_connections}, HAProxy maxconn {fds['haproxy_maxconn']}",
                flush=True,
            )
        # Rounds outermost: each round runs every placement and workload, so a drift in
        # the machine's state spreads over all of them instead of one.
        runs: Runs = {p: {w: {k: [] for k in KINDS} for w in selected} for p in placements}
        for rep in range(args.repeat):
            for placement in placements:
                placed = dataclasses.replace(setup, placement=placement)
                for wi, workload in enumerate(selected):
                    # resumption compares resumed handshakes: tickets whatever was asked
                    here = placed
                    if workload == "resumption" and not placed.tickets:
                        here = dataclasses.replace(placed, tickets=True)
                    first = first_kind(args.order, wi, rep)
                    for kind in (first, KINDS[1 - KINDS.index(first)]):
                        tag = f"{placement}-{workload}-{rep}-{kind}"
                        result = run_one(here, workload, kind, tag)
                        result.update(round=rep + 1, placement=placement)
                        runs[placement][workload][kind].append(result)
                        status = "ok" if result["ok"] else f"FAILED: {result.get('error')}"
                        print(
                            f"  round {rep + 1} {placement:<11} {workload:<9} {kind:<8} "
                            f"{result['wall_s']:6.1f} s  {status}"
                        )
                        sys.stdout.flush()
        rows = summarize(runs)
        print()
        print_table(rows, runs, cpus)
        report = {
            "schema": 2,
            "mode": mode,
            "machine": machine,
            "parameters": {
                "sizes": asdict(sizes),
                "workloads": selected,
                "repeat": args.repeat,
                "placements": {p: describe_placement(p, cpus) for p in placements},
                "order": args.order,
                "haproxy_log": setup.haproxy_log,
                "session_tickets": setup.tickets,
                "workers": setup.workers,
                "budget_s": budget,
                "rlimit_nofile": list(nofile),
                "fd_plan": fds,
                "cpu_source": "utime+stime from /proc/PID/stat / SC_CLK_TCK",
                "clk_tck": CLK_TCK,
                "bulk": "sink upstream: the client streams, the upstream acks the byte count",
                "ours_config_template": ours_config(
                    Path("CERTS"), [1, 2, 3], setup.tickets, setup.workers
                ),
                "haproxy_config_template": haproxy_config(
                    Path("CERTS"),
                    [1, 2, 3],
                    4,
                    setup.haproxy_log,
                    maxconn=setup.haproxy_maxconn,
                    tickets=setup.tickets,
                    threads=setup.workers,
                ),
            },
            "summary": rows,
            "runs": runs,
            "loadavg_at_end": Path("/proc/loadavg").read_text().split()[:3],
            "total_seconds": round(time.monotonic() - began, 1),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        partial = args.out.with_name(args.out.name + ".tmp")
        partial.write_text(json.dumps(report, indent=1) + "\n")
        partial.replace(args.out)
        print(f"\nwrote {args.out} ({report['total_seconds']} s)")
        failed = any(
            not r["ok"]
            for by_workload in runs.values()
            for by_kind in by_workload.values()
            for lst in by_kind.values()
            for r in lst
        )
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    else:
        return 1 if failed else 0
    finally:
        Child.stop_all()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
