"""The proxy: the listener, the connections, reload, drain and stop.

Everything that decides (who may go where, how fast, which upstream, is it healthy,
how a connection ends) lives in the pure modules; this package's I/O shell moves bytes
and time into them and turns their answers into socket operations and log lines. The
proxy's concerns are split by file: connections (``connection.py``), capacity
(``capacity.py``), health checks (``healthchecks.py``) and the access log
(``accesslog.py``); :class:`Proxy` puts them together.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import itertools
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from l4common.backlog import adopt_queued

from .accesslog import AccessLog
from .admin import METRICS_ROUTES, AdminServer
from .capacity import Capacity
from .config import (
    Address,
    Config,
    ConfigError,
    Upstream,
    check_files,
    read_config,
    restart_needed,
)
from .connection import HOLD_LIMIT, READ_SIZE, ClientConnection, State
from .gate import Gate, LocalGate
from .health import Health
from .healthchecks import HealthChecks
from .identity import IdentityCache
from .logs import JsonLog, utc_timestamp
from .metrics import Stats
from .resolver import Lookup, Resolver
from .router import Router
from .tls import certificate_facts, issued_by_any, server_context, trust_anchors


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    message: str
    sha256: str | None = None
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()


class Proxy(Capacity, HealthChecks, AccessLog):
    """Owns the listener, the connections, the health checkers and the router.

    Operations: :meth:`reload` (SIGHUP, ``POST /reload``), :meth:`drain` (SIGTERM) and
    :meth:`stop`. The admin listener, if configured, is started and stopped with it."""

    EVENT_PREFIX = ""  # of the draining and stopped lines (a worker's say worker_...)

    def __init__(
        self,
        config: Config,
        log: JsonLog | None = None,
        *,
        config_path: Path | None = None,
        config_sha256: str | None = None,
        lookup: Lookup | None = None,
    ) -> None:
        """``lookup``: how names are resolved (default: the system's getaddrinfo)."""
        self.config = config
        self.config_path = config_path
        self.config_sha256 = config_sha256
        self.loaded_at = utc_timestamp()
        self.started_at = time.time()
        self.log = log or JsonLog()
        self.router = Router(config)
        self.gate: Gate = LocalGate(self)
        self.ssl_context = server_context(config.tls)
        self.ca_pem = _read(config.tls.ca)  # as loaded: a reload compares (revocation)
        self.certificate = certificate_facts(config.tls.cert)  # what /status shows
        self.identities = IdentityCache(config.tls.identity, charset=config.tls.identity_charset)
        self.stats = Stats()
        # Every client connection with a socket: handshaking, served, or closing.
        self.connections: set[ClientConnection] = set()
        # Those still in their TLS handshake, oldest progress first (eviction order).
        self.handshaking: dict[ClientConnection, None] = {}
        self.emptied: asyncio.Future[None] | None = None  # see wait_empty
        # Decrypted client bytes, one chunk at a time: reused while the upstream
        # transports send what they are given at once (see ClientConnection._send_up).
        self.read_buffer = memoryview(bytearray(READ_SIZE))
        self.ids: Iterator[int] = itertools.count(1)
        self.held: list[tuple[asyncio.Transport, bytes]] = []  # see write_soon
        self.held_bytes = 0
        self.loop = asyncio.get_running_loop()
        self.resolver = Resolver(self.loop, lookup)
        self.resolver.changed = self._log_resolved
        self.server: asyncio.Server | None = None
        self.admin: AdminServer | None = None
        self.health_tasks: dict[str, asyncio.Task[None]] = {}  # by upstream key
        self.discovery_tasks: dict[str, asyncio.Task[None]] = {}  # by group name
        self.tasks: list[asyncio.Task[None]] = []
        self.address: tuple[str, int] | None = None
        self.admin_address: tuple[str, int] | None = None
        self.metrics: AdminServer | None = None  # admin.metrics_listen: read-only
        self.metrics_address: tuple[str, int] | None = None
        self.draining = False
        self.stopping = False  # stop() has begun: no health loop may start again
        self.at_capacity: dict[str, list[int]] = {}  # limit -> [refused, evicted] while full
        self.last_reload: dict[str, Any] | None = None

    def write_soon(self, transport: asyncio.Transport, data: bytes) -> None:
        """Write ``data`` at the end of this event-loop iteration, in one burst with the
        other connections' writes, not now.

        In a burst after all of an iteration's reads, the writes wake up the processes
        they are for together, and those preempt this one less often (ping-pong: ~9%
        less proxy CPU per message). Every other operation on a transport (a write
        not held, write_eof, close, abort) calls :meth:`flush_writes` first, so that
        nothing overtakes a held write."""
        if not self.held:
            self.loop.call_soon(self.flush_writes)
        self.held.append((transport, data))
        self.held_bytes += len(data)
        if self.held_bytes >= HOLD_LIMIT:
            self.flush_writes()

    def flush_writes(self) -> None:
        """Do the held writes now, in order."""
        if not self.held:
            return
        held, self.held = self.held, []
        self.held_bytes = 0
        for transport, data in held:
            if transport.is_closing():
                continue
            try:
                transport.write(data)
            except Exception as exc:  # noqa: BLE001 - a bug; one connection's, not the burst's
                self.loop.call_exception_handler(
                    {"message": "a held write failed", "exception": exc, "transport": transport}
                )

    def _on_loop_error(self, _loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """An exception escaped a callback or task: a bug. Log it and keep serving."""
        exc = context.get("exception")
        self.log.emit(
            "error",
            message=str(context.get("message", "")),
            exception=repr(exc) if exc is not None else None,
        )

    async def _listen(self) -> None:
        """Start accepting client connections; set :attr:`address`."""
        listen = self.config.listen
        try:
            self.server = await self.loop.create_server(
                self.new_connection,
                listen.host,
                listen.port,
                backlog=1024,
                reuse_address=True,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from exc
        sock = self.server.sockets[0].getsockname()
        self.address = (str(sock[0]), int(sock[1]))

    def new_connection(self) -> ClientConnection:
        """The protocol for an accepted client socket (the listener's factory)."""
        return ClientConnection(self)

    def _stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()

    async def start(self) -> None:
        self.loop.set_exception_handler(self._on_loop_error)
        await self._listen()
        assert self.address is not None
        admin = self.config.admin
        try:
            if admin.listen is not None:
                self.admin = AdminServer(self)
                self.admin_address = await _open(self.admin, admin.listen, "admin.listen")
            if admin.metrics_listen is not None:
                self.metrics = AdminServer(self, routes=METRICS_ROUTES)
                self.metrics_address = await _open(
                    self.metrics, admin.metrics_listen, "admin.metrics_listen"
                )
        except OSError:
            await self._unlisten()
            if self.admin is not None:
                await self.admin.stop()
            raise
        self._sync_health_tasks()
        self._sync_discovery_tasks()
        self.tasks.append(self.loop.create_task(self._cleanup_loop(), name="ratelimit-cleanup"))
        self.log.emit(
            "listening",
            address=f"{self.address[0]}:{self.address[1]}",
            admin=_format(self.admin_address),
            metrics=_format(self.metrics_address),
            upstreams=[u.key for u in self.config.upstreams],
            groups={g.name: str(g.address) for g in self.config.groups},
            balancer=self.config.balancer,
            max_connections=self.config.max_connections,
            config_sha256=self.config_sha256,
            **self._listening_fields(),
        )

    async def _unlisten(self) -> None:
        """A start that failed after :meth:`_listen`: stop accepting."""
        self._stop_listening()

    def _listening_fields(self) -> dict[str, Any]:
        return {}

    @property
    def serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    # --- what /status and /metrics read (the whole proxy's, see workers.py) -----------

    def counters(self) -> Stats:
        return self.stats

    def connection_states(self) -> Counter[str]:
        """Open client connections by state; ``closing``: ended, its socket not yet gone."""
        return Counter("closing" if conn.closed else conn.state.value for conn in self.connections)

    def open_bytes(self) -> Counter[tuple[str, str]]:
        """Bytes open connections have moved so far, by (upstream, direction)."""
        moved: Counter[tuple[str, str]] = Counter()
        for conn in self.connections:
            if conn.upstream is not None and (conn.bytes_up or conn.bytes_down):
                key = conn.upstream.key
                moved[key, "up"] += conn.bytes_up
                moved[key, "down"] += conn.bytes_down
        return moved

    def open_count(self) -> int:
        return len(self.connections)

    def worker_counts(self) -> tuple[int, int]:
        """(processes accepting now, restarts so far)."""
        return int(self.serving), 0

    async def refresh(self) -> None:
        """Bring :meth:`counters` and the connection views up to date (nothing to do
        in one process)."""

    @property
    def ready(self) -> tuple[bool, str]:
        """``/ready``: listening, not draining, and at least one upstream is up."""
        if not self.serving:
            return False, "draining" if self.draining else "not listening"
        if self.draining:
            return False, "draining"
        if not any(m.state is Health.UP for m in self.router.pool.health):
            return False, "no upstream is up"
        return True, "ready"

    # --- reload ------------------------------------------------------------------------

    def reload(self) -> ReloadResult:
        """Re-read the config file and the certificates it names. A valid config applies
        to new connections (open ones keep going); an invalid one changes nothing."""
        if self.config_path is None:
            return self._reload_failed("", "the proxy was not started from a config file")
        try:
            config, digest = read_config(self.config_path)
            check_files(config)
            context = server_context(config.tls)
            restart_needed(self.config, config)
        except ConfigError as exc:
            return self._reload_failed(exc.key, exc.problem)
        old_keys = [u.key for u in self.router.pool.upstreams]
        ca_pem = _read(config.tls.ca)
        ca_changed = ca_pem != self.ca_pem
        self.ca_pem = ca_pem
        self.adopt(config, digest, context)
        self.loaded_at = utc_timestamp()
        self.certificate = certificate_facts(config.tls.cert)
        self.router.reconfigure(config)
        new_keys = [u.key for u in self.router.pool.upstreams]  # members of kept groups too
        self._sync_health_tasks()
        self._sync_discovery_tasks()
        result = ReloadResult(
            ok=True,
            message="reloaded",
            sha256=digest,
            added=tuple(k for k in new_keys if k not in old_keys),
            removed=tuple(k for k in old_keys if k not in new_keys),
        )
        self.stats.reloads["ok"] += 1
        self.last_reload = {"result": "ok", "at": self.loaded_at, "sha256": digest}
        self._reloaded(
            ca_changed,
            {
                "result": "ok",
                "config_sha256": digest,
                "upstreams": new_keys,
                "groups": {g.name: str(g.address) for g in config.groups},
                "added": list(result.added),
                "removed": list(result.removed),
            },
        )
        return result

    async def reload_settled(self) -> list[int]:
        """Returns once the last :meth:`reload` applies to every new connection: at
        once here (``reload`` applied it before returning); a supervisor waits for its
        workers (``workers: N``) and returns those that did not answer in time."""
        return []

    def adopt(self, config: Config, digest: str | None, context: ssl.SSLContext) -> None:
        """New connections get ``config`` and its TLS context; open ones get a changed
        ``timeouts.idle`` at once."""
        old_idle = self.config.timeouts.idle
        self.config = config
        self.config_sha256 = digest
        self.ssl_context = context
        self.identities = IdentityCache(config.tls.identity, charset=config.tls.identity_charset)
        if config.timeouts.idle != old_idle:
            for conn in list(self.connections):
                conn.rearm_idle()

    def dial_host(self, upstream: Upstream) -> str:
        """The address to dial for ``upstream``: the health checks' last lookup of its
        name (no DNS on the dial path), or its host as written."""
        return self.resolver.cached(upstream.address) or upstream.address.host

    def _reloaded(self, ca_changed: bool, fields: dict[str, Any]) -> None:
        """The reload applied here: revoke what it says, then its log line."""
        revoked = 0
        if self.config.authorization.on_reload == "close":
            revoked = self.revoke(ca_changed=ca_changed)
        self.log.emit("reload", **fields, open_connections=len(self.connections), revoked=revoked)

    def revoke(
        self, *, ca_changed: bool, permits: Callable[[ClientConnection], bool] | None = None
    ) -> int:
        """``authorization.on_reload: close``: end every admitted connection whose
        identity the new rules no longer let reach its upstream, or (when ``tls.ca``
        changed) whose certificate the new CA bundle no longer accepts. Returns how many.

        ``permits``: whether a connection may keep its upstream (default: the router
        asked here; a worker is told by the supervisor)."""
        anchors = trust_anchors(self.config.tls.ca) if ca_changed else ()
        now = dt.datetime.now(dt.UTC)
        verdicts: dict[bytes, bool] = {}
        ended = 0
        for conn in list(self.connections):
            if conn.state not in (State.DIALING, State.FORWARDING):
                continue
            if conn.identity is None or conn.upstream is None:
                continue
            if permits is not None:
                keep = permits(conn)
            else:
                keep = self.router.permits(conn.identity, conn.upstream)
            if keep and ca_changed:
                der = conn.tls.getpeercert(True) or b""
                if der not in verdicts:
                    verdicts[der] = issued_by_any(der, anchors, now)
                keep = verdicts[der]
            if not keep:
                conn.revoke()
                ended += 1
        return ended

    def _reload_failed(self, key: str, problem: str) -> ReloadResult:
        message = f"{key}: {problem}" if key else problem
        self.stats.reloads["error"] += 1
        self.last_reload = {"result": "error", "at": utc_timestamp(), "error": message}
        self.log.emit("reload", result="error", key=key or None, message=message)
        return ReloadResult(ok=False, message=message)

    # --- drain and stop ------------------------------------------------------------------

    async def drain(self, grace: float, force: Awaitable[object] | None = None) -> str:
        """Stop accepting; let open connections finish for up to ``grace`` seconds (or
        until ``force`` completes: a second signal), then close what is left.

        Returns how it ended: ``drained`` (every connection finished), ``drain_timeout``
        or ``forced``; the ``stopped`` log line says the same.

        Clients the kernel has already connected but this process has not accepted yet
        (the listen backlog) are taken in first and served like the open connections:
        closing the listener would reset them."""
        if self.server is not None:
            await adopt_queued(self.loop, self.server, self.new_connection)
        self._stop_listening()
        self.draining = True
        self.log.emit(
            f"{self.EVENT_PREFIX}draining", open_connections=len(self.connections), grace_s=grace
        )
        outcome = "drained"
        if self.connections:
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.wait_empty())]
            if force is not None:
                waits.append(asyncio.ensure_future(force))
            done, pending = await asyncio.wait(
                waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED
            )
            for future in pending:
                future.cancel()
            if self.connections:
                outcome = "drain_timeout" if not done else "forced"
        elif inspect.iscoroutine(force):
            force.close()  # nothing to wait for: never awaited, and says so at exit
        await self.stop(outcome)
        return outcome

    async def stop(self, reason: str = "shutdown") -> None:
        """Stop accepting, close every connection, stop the background tasks.

        ``reason`` goes into the ``stopped`` line and, except ``forced`` (which closes
        with ``shutdown`` like a plain stop), into the access line of each connection."""
        left = len(self.connections)
        self.stopping = True
        self._stop_listening()
        for conn in list(self.connections):
            conn.shutdown("shutdown" if reason == "forced" else reason)
        # Closing connections get timeouts.close to deliver what they hold, then a reset.
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wait_empty(), self.config.timeouts.close + 0.5)
        for conn in list(self.connections):
            conn.force_close()  # cannot happen: each has a close timer
        await self._stop_background()
        self.log.emit(f"{self.EVENT_PREFIX}stopped", open_connections=left, reason=reason)

    async def _stop_background(self) -> None:
        """Stop the health checks, lookups and admin listeners."""
        self.resolver.cancel()
        tasks = [*self.tasks, *self.health_tasks.values(), *self.discovery_tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()
        self.health_tasks.clear()
        self.discovery_tasks.clear()
        for listener in (self.admin, self.metrics):
            if listener is not None:
                await listener.stop()

    # --- connections ---------------------------------------------------------------------

    def wait_empty(self) -> asyncio.Future[None]:
        """A future done once no client connection is left (closing ones included)."""
        if self.emptied is None or self.emptied.done():
            self.emptied = self.loop.create_future()
            if not self.connections:
                self.emptied.set_result(None)
        return self.emptied

    def connection_closed(self, conn: ClientConnection, decision: str, reason: str) -> None:
        """``conn``'s socket is gone: it stops counting, and its access line is written."""
        self.connections.discard(conn)
        self.handshaking.pop(conn, None)
        self.log_access(conn, decision, reason)
        if not self.connections and self.emptied is not None and not self.emptied.done():
            self.emptied.set_result(None)
        if self.at_capacity:
            self.capacity_check()


async def _open(listener: AdminServer, address: Address, key: str) -> tuple[str, int]:
    """Start an admin listener on ``address``; an OSError names the address and key."""
    try:
        return await listener.start(address.host, address.port)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {address} ({key}): {exc.strerror}") from exc


def _format(address: tuple[str, int] | None) -> str | None:
    if address is None:
        return None
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
