"""``workers: N`` (N > 1): a supervisor and N worker processes.

The supervisor is a :class:`~l4proxy.proxy.Proxy` that does not accept: it owns the
one router (token buckets, ``max_concurrent``, least-connections counts, health), the
caps' counts (:class:`~l4proxy.ledger.Ledger`), health checks, discovery, the admin
listeners, signals, reload and drain. Each worker (:mod:`l4proxy.worker`) accepts on
its own ``SO_REUSEPORT`` socket, which the supervisor binds (so the port is known, and
held, before any worker runs) and keeps open: a restarted worker gets the same socket,
and connections queued on it while it was down are not lost.

Costs per connection: ``admit`` and its answer, and ``close``; plus ``open`` and its
answer when ``max_connections`` or ``max_handshakes`` is set (each message a few
dozen bytes; a loop iteration's messages share one write).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import l4common

from . import __file__ as _package_file
from .channel import Channel, Message
from .config import Config, Upstream
from .ledger import Ledger
from .logs import JsonLog
from .metrics import Stats
from .proxy import Proxy
from .router import Admission, Rejected
from .tls import TICKET_KEYS_SIZE
from .worker import ID_BLOCK

START_TIMEOUT = 30.0  # a worker's start: an interpreter, imports, its first message
STOP_MARGIN = 5.0  # past its own deadlines, before a worker is killed
RESTART_FIRST = 0.1  # seconds before restarting a worker that died...
RESTART_MAX = 10.0  # ...doubling while it keeps dying within STABLE of its start
STABLE = 10.0
SNAPSHOT_TIMEOUT = 2.0
# How long a reload waits for the workers' answers (a worker that does not answer in
# time has a blocked loop; it is not waited for longer: the reload line names it).
SETTLE_TIMEOUT = 10.0


def _pythonpath() -> str:
    """The worker imports the same l4proxy and l4common as this process."""
    roots = [
        str(Path(_package_file).resolve().parent.parent),
        str(Path(l4common.__file__).resolve().parent.parent),
    ]
    existing = os.environ.get("PYTHONPATH")
    return os.pathsep.join(dict.fromkeys([*roots, *([existing] if existing else [])]))


class WorkerHandle:
    """One worker slot: its listening socket (kept across restarts) and its process."""

    def __init__(self, slot: int, sock: socket.socket) -> None:
        self.slot = slot
        self.sock = sock
        self.process: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.started: asyncio.Future[int] | None = None
        self.stopped: tuple[str, int] | None = None  # its ("stopped", reason, left)
        self.spawned_at = 0.0
        self.delay = RESTART_FIRST
        self.last: tuple[Stats, Counter[str], Counter[tuple[str, str]], int] | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def serving(self) -> bool:
        """Running, and it said it accepts."""
        started = self.started
        return self.alive and self.channel is not None and started is not None and started.done()


class Supervisor(Proxy):
    def __init__(self, config: Config, log: JsonLog | None = None, **options: Any) -> None:
        """``options``: :class:`~l4proxy.proxy.Proxy`'s (config_path, config_sha256, lookup)."""
        super().__init__(config, log, **options)
        self.ledger = Ledger(self.router)
        self.handles: list[WorkerHandle] = []
        self.next_block = 1
        self.departed = Stats()  # the last counts of workers that died
        self.merged = self.stats
        self.states: Counter[str] = Counter()
        self.moving: Counter[tuple[str, str]] = Counter()
        self.open_total = 0
        self.accepting = False
        self.restarts = 0
        # TLS session ticket keys for every worker's context (a secret: it decrypts
        # every session's ticket; it only ever goes to our own workers' channels).
        self.ticket_keys = os.urandom(TICKET_KEYS_SIZE)
        self.settled: asyncio.Future[list[int]] | None = None  # the last reload's answers
        self.settle_timeout = SETTLE_TIMEOUT

    # --- listening: the workers -------------------------------------------------------

    async def _listen(self) -> None:
        listen = self.config.listen
        port = listen.port
        try:
            for slot in range(1, self.config.workers + 1):
                sock = _reuseport_socket(listen.host, port, first=slot == 1)
                port = sock.getsockname()[1]
                self.handles.append(WorkerHandle(slot, sock))
        except OSError as exc:
            self._close_sockets()
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
        name = self.handles[0].sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        self.accepting = True
        try:
            async with asyncio.timeout(START_TIMEOUT):
                await asyncio.gather(*(self._spawn(handle) for handle in self.handles))
        except BaseException:
            await self._unlisten()
            raise

    def _listening_fields(self) -> dict[str, Any]:
        return {
            "workers": len(self.handles),
            "pids": [h.process.pid if h.process else None for h in self.handles],
        }

    @property
    def serving(self) -> bool:
        return self.accepting and all(h.serving for h in self.handles)

    def _close_sockets(self) -> None:
        for handle in self.handles:
            handle.sock.close()

    def _stop_listening(self) -> None:
        self.accepting = False
        self._close_sockets()

    async def _unlisten(self) -> None:
        self._stop_listening()
        await self._end_workers(("stop", "shutdown"), self.config.timeouts.close)

    async def _spawn(self, handle: WorkerHandle) -> None:
        """Start the worker of ``handle``'s slot and wait for its ``started``."""
        loop = self.loop
        ours, theirs = socket.socketpair()
        handle.stopped = None
        handle.started = loop.create_future()
        channel = Channel(
            loop,
            lambda message: self._on_message(handle, channel, message),
            lambda: None,
        )
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "l4proxy.worker",
                str(handle.slot),
                str(handle.sock.fileno()),
                str(theirs.fileno()),
                pass_fds=(handle.sock.fileno(), theirs.fileno()),
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONPATH": _pythonpath()},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        handle.process = process
        handle.spawned_at = loop.time()
        await loop.create_unix_connection(lambda: channel, sock=ours)
        handle.channel = channel
        channel.send(("config", self.config, self.config_sha256, self._block(), self.ticket_keys))
        assert process.stdout is not None
        handle.tasks = [
            loop.create_task(self._relay(process.stdout), name=f"worker-{handle.slot}-log"),
            loop.create_task(self._watch(handle, process), name=f"worker-{handle.slot}-wait"),
        ]
        started = handle.started
        done, _ = await asyncio.wait(
            [started, handle.tasks[1]], return_when=asyncio.FIRST_COMPLETED
        )
        if started not in done:
            raise OSError(0, f"worker {handle.slot} exited at start (code {process.returncode})")

    def _block(self) -> int:
        start = self.next_block
        self.next_block += ID_BLOCK
        return start

    async def _relay(self, stream: asyncio.StreamReader) -> None:
        """A worker's log lines, whole, onto our log's stream."""
        out = self.log.stream
        partial = b""
        while True:
            data = await stream.read(256 * 1024)
            if not data:
                break
            data = partial + data
            cut = data.rfind(b"\n") + 1
            partial = data[cut:]
            if cut:
                with contextlib.suppress(BrokenPipeError, ValueError):
                    out.write(data[:cut].decode("utf-8", "replace"))
                    out.flush()

    async def _watch(self, handle: WorkerHandle, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker to exit; unless we are stopping, it died: its slots come
        back, it is logged and started again."""
        code = await process.wait()
        if handle.channel is not None:
            handle.channel.close()
            handle.channel = None
        released = self.ledger.gone(handle.slot)
        if self.at_capacity:
            self.capacity_check()
        if handle.last is not None:
            self.departed.absorb(handle.last[0])
            handle.last = None
        if not self.accepting:
            return
        self.restarts += 1
        lived = self.loop.time() - handle.spawned_at
        handle.delay = RESTART_FIRST if lived > STABLE else min(handle.delay * 2, RESTART_MAX)
        self.log.emit(
            "worker_exited",
            worker=handle.slot,
            pid=process.pid,
            code=code if code >= 0 else None,
            signal=signal.Signals(-code).name if code < 0 else None,
            released=released,
            restart_in_s=handle.delay,
        )
        await asyncio.sleep(handle.delay)  # a back-off, not a synchronization
        if not self.accepting:
            return
        try:
            await self._spawn(handle)
        except OSError:
            return  # it exited at start: its own watch logs that and tries again
        restarted = handle.process
        self.log.emit(
            "worker_started", worker=handle.slot, pid=restarted.pid if restarted else None
        )

    # --- what workers ask -------------------------------------------------------------

    def _on_message(self, handle: WorkerHandle, channel: Channel, message: Message) -> None:
        kind = message[0]
        ledger = self.ledger
        slot = handle.slot
        if kind == "admit":
            result = ledger.admit(slot, message[1], message[2], self.loop.time())
            if self.at_capacity:  # its handshake is over
                self.capacity_check()
            if isinstance(result, Admission):
                channel.reply(self._answer(result.lease.upstream))
            else:
                channel.reply((result, None))
        elif kind == "close":
            ledger.close(slot, message[1])
            if self.at_capacity:
                self.capacity_check()
        elif kind == "open":
            channel.reply(ledger.open(slot, message[1]))
        elif kind == "capacity":  # a worker refused or evicted at a cap
            self._capacity_full(message[1], refused=message[2], evicted=message[3])
        elif kind == "dial_failed":
            transition, failed, picked = ledger.dial_failed(
                slot, message[1], message[2], self.loop.time()
            )
            if transition is not None and failed is not None:
                self.log_transition(failed, transition, passive=True)
            if isinstance(picked, Rejected):
                channel.reply((picked, None))
            else:
                channel.reply(self._answer(picked.upstream))
        elif kind == "ids":
            channel.reply(self._block())
        elif kind == "started":
            if handle.started is not None and not handle.started.done():
                handle.started.set_result(message[1])
        elif kind == "stopped":
            handle.stopped = (message[1], message[2])

    def _answer(self, upstream: Upstream) -> tuple[Upstream, str]:
        return upstream, self.dial_host(upstream)

    # --- what /status and /metrics read ---------------------------------------------

    async def refresh(self) -> None:
        """Ask every worker for its counts (each answers within SNAPSHOT_TIMEOUT or is
        counted as of its last answer) and add them up."""
        loop = self.loop
        asks: list[tuple[WorkerHandle, asyncio.Future[Any]]] = []
        for handle in self.handles:
            if handle.channel is None:
                continue
            future: asyncio.Future[Any] = loop.create_future()
            handle.channel.request(("stats",), _setter(future))
            asks.append((handle, future))
        if asks:
            await asyncio.wait([f for _, f in asks], timeout=SNAPSHOT_TIMEOUT)
        for handle, future in asks:
            if future.done() and future.result() is not None:
                handle.last = future.result()
        merged = Stats()
        merged.absorb(self.departed)
        states: Counter[str] = Counter()
        moving: Counter[tuple[str, str]] = Counter()
        total = 0
        for handle in self.handles:
            if handle.last is None:
                continue
            stats, by_state, moved, count = handle.last
            merged.absorb(stats)
            states.update(by_state)
            moving.update(moved)
            total += count
        own = self.stats  # its own: health checks, lookups, reloads
        merged.checks = own.checks
        merged.lookups = own.lookups
        merged.reloads = own.reloads
        self.merged, self.states, self.moving, self.open_total = merged, states, moving, total

    def counters(self) -> Stats:
        return self.merged

    def connection_states(self) -> Counter[str]:
        return Counter(self.states)

    def open_bytes(self) -> Counter[tuple[str, str]]:
        return Counter(self.moving)

    def open_count(self) -> int:
        return self.open_total

    def capacity_counts(self) -> tuple[int, int]:
        return self.ledger.connections, self.ledger.handshakes

    def worker_counts(self) -> tuple[int, int]:
        running = sum(1 for h in self.handles if h.serving)
        return running, self.restarts

    # --- reload, drain, stop ----------------------------------------------------------

    def _reloaded(self, ca_changed: bool, fields: dict[str, Any]) -> None:
        """Tell every worker; the ``reload`` line follows their answers (how many
        connections each ended, how many it has open), or :attr:`settle_timeout` if a
        worker has not answered by then: the line then names it (``unanswered_workers``)
        and so does the answer to ``POST /reload``."""
        revoke = self.ledger.revocations() if self.config.authorization.on_reload == "close" else {}
        # New keys with each reload, as one process gets with its new TLS context.
        self.ticket_keys = os.urandom(TICKET_KEYS_SIZE)
        live = [h for h in self.handles if h.channel is not None]
        waiting = {h.slot for h in live}
        answers: list[tuple[int, int]] = []
        settled: asyncio.Future[list[int]] = self.loop.create_future()
        self.settled = settled

        def done() -> None:  # every worker has answered, or settle_timeout is over
            if settled.done():
                return
            unanswered = sorted(waiting)
            more = {"unanswered_workers": unanswered} if unanswered else {}
            self.log.emit(
                "reload",
                **fields,
                open_connections=sum(open_ for _, open_ in answers),
                revoked=sum(ended for ended, _ in answers),
                **more,
            )
            settled.set_result(unanswered)
            overdue.cancel()

        def answered(slot: int, value: object) -> None:
            if settled.done():
                return  # too late: the reload line has named this worker
            waiting.discard(slot)
            answers.append(value if isinstance(value, tuple) else (0, 0))
            if not waiting:
                done()

        overdue = self.loop.call_later(self.settle_timeout, done)
        if not live:
            done()
        for handle in live:
            assert handle.channel is not None
            message = (
                "reload",
                self.config,
                self.config_sha256,
                ca_changed,
                revoke.get(handle.slot, []),
                self.ticket_keys,
            )
            handle.channel.request(message, functools.partial(answered, handle.slot))

    async def reload_settled(self) -> list[int]:
        """Returns once every worker has answered the last reload: from then on, every
        new connection, whichever worker accepts it, gets the new config. Or after
        :attr:`settle_timeout` (a worker that has not answered by then has a blocked
        loop): the workers that have not answered, which the ``reload`` line names."""
        if self.settled is None:
            return []
        return list(await asyncio.shield(self.settled))

    async def drain(self, grace: float, force: Any = None) -> str:
        self._stop_listening()
        self.draining = True
        await self.refresh()
        self.log.emit("draining", open_connections=self.open_total, grace_s=grace)
        forcing: asyncio.Task[Any] | None = None
        if force is not None:

            async def relay_force() -> None:
                await force
                self._tell_all(("force",))

            forcing = self.loop.create_task(relay_force())
        deadline = grace + self.config.timeouts.close + STOP_MARGIN
        try:
            await self._end_workers(("drain", grace), deadline)
        finally:
            if forcing is not None:
                forcing.cancel()
        outcomes = [h.stopped[0] for h in self.handles if h.stopped is not None]
        outcome = "drained"
        for worst in ("forced", "drain_timeout"):
            if worst in outcomes:
                outcome = worst
                break
        await self._finish(outcome)
        return outcome

    async def stop(self, reason: str = "shutdown") -> None:
        self.stopping = True
        self._stop_listening()
        await self._end_workers(("stop", reason), self.config.timeouts.close + STOP_MARGIN)
        await self._finish(reason)

    async def _finish(self, reason: str) -> None:
        self.stopping = True
        left = sum(h.stopped[1] for h in self.handles if h.stopped is not None)
        await self._stop_background()
        self.log.emit("stopped", open_connections=left, reason=reason, workers=len(self.handles))

    def _tell_all(self, message: Message) -> None:
        for handle in self.handles:
            if handle.channel is not None:
                handle.channel.send(message)

    async def _end_workers(self, message: Message, deadline: float) -> None:
        """Send ``message`` (drain or stop) and wait, up to ``deadline`` seconds, for
        every worker to exit; kill those that have not."""
        self.accepting = False
        self._tell_all(message)
        waits = [t for h in self.handles for t in h.tasks[1:2] if not t.done()]
        if waits:
            await asyncio.wait(waits, timeout=deadline)
        for handle in self.handles:
            if handle.alive and handle.process is not None:
                handle.process.kill()
        tasks = [t for h in self.handles for t in h.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_MARGIN)


def _setter(future: asyncio.Future[Any]) -> Any:
    def set_result(value: object) -> None:
        if not future.done():
            future.set_result(value)

    return set_result


def _reuseport_socket(host: str, port: int, *, first: bool) -> socket.socket:
    """A listening socket in the ``SO_REUSEPORT`` group of ``host:port``.

    The first is bound *before* it joins the group: so its bind fails if anything
    else holds the port, and port 0 gets a port nobody holds (bound with the option
    set, the kernel may hand out a port another of our own processes' groups listens
    on, and the two would share connections). The others join it."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, address = infos[0][0], infos[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not first:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if first:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def make_proxy(config: Config, log: JsonLog | None = None, **options: Any) -> Proxy:
    """The proxy ``config`` asks for: one process, or a supervisor of ``workers``
    (``options``: :class:`~l4proxy.proxy.Proxy`'s)."""
    cls = Supervisor if config.workers > 1 else Proxy
    return cls(config, log, **options)
