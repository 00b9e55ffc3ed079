"""The admin listener: ``/metrics``, ``/status``, ``/ready`` and ``POST /reload``; and
the optional read-only metrics listener (``admin.metrics_listen``): ``/metrics`` and
``/ready`` only, for a scraper on a network that must not reload the proxy or read
``/status``. Both are this server with a different route table.

A deliberately small HTTP/1.1 server on the proxy's own event loop (so it reads the
proxy's state without locks): one request per connection, ``Connection: close``.

Bounds: at most ``MAX_CLIENTS`` connections are served at once; one more waits for a
slot up to ``SLOT_TIMEOUT`` and then gets 503 (``Retry-After: 1``). The request head
is at most ``HEAD_LIMIT`` bytes (431 beyond) and must arrive within
``REQUEST_TIMEOUT`` (408); the response must drain within ``REQUEST_TIMEOUT`` too.
Once the listener closes a connection, buffered bytes get ``timeouts.close`` seconds
to reach the client, then the transport is aborted, so a client that stops reading
cannot pin a socket or a buffered response.

The parser is strict (:func:`parse_request`): an ASCII head, an uppercase method, an
origin-form target, ``HTTP/1.0`` or ``HTTP/1.1``, token header names, visible-ASCII
values, no line folding, a ``Content-Length`` of ASCII digits (one value), no
``Transfer-Encoding``. Anything else is a 400 response (413 for a body over
``BODY_LIMIT``), never an exception.

It binds to loopback by default and has no authentication, so only expose it where
whoever reaches it may reload the proxy and read its counters (``POST /reload`` only
re-reads the file already configured). Browsers are kept out of ``POST /reload``: it
is refused (403) when it carries ``Origin`` (any value: browsers send it on every
POST, and under DNS rebinding a hostile page looks same-origin) or a
``Sec-Fetch-Site`` other than ``none``, or when it lacks ``X-L4proxy-Admin`` (a
custom header: a cross-site page cannot send it without a CORS preflight, which this
listener never grants). ``adminctl`` sends that header; GET routes do not need it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from .closing import reset
from .health import Health

if TYPE_CHECKING:
    from .server import Proxy

# MAX_CLIENTS and the timeouts are read when an AdminServer is made (not at import), so
# tests can set smaller values first; the constructor takes them too.
HEAD_LIMIT = 16 * 1024  # request line + headers
BODY_LIMIT = 64 * 1024  # POST bodies are read and ignored
REQUEST_TIMEOUT = 5.0  # to read the request head and body; and to drain the response
SLOT_TIMEOUT = REQUEST_TIMEOUT  # how long a connection beyond MAX_CLIENTS waits: then 503
MAX_CLIENTS = 32  # admin connections served at once (slots are held until closed)

# The header our own client (adminctl) sends; a POST /reload without it is refused.
ADMIN_HEADER = "X-L4proxy-Admin"
CSRF_REFUSAL = (
    f"cross-site requests are refused: POST /reload needs the {ADMIN_HEADER} header and no Origin"
)

REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    422: "Unprocessable Content",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


# --- the HTTP edge (pure) ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names; repeated fields joined with ", "
    content_length: int = 0  # validated by parse_request: 0..BODY_LIMIT


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Error')}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Cache-Control: no-store",
            "Connection: close",
            *(f"{name}: {value}" for name, value in self.headers.items()),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def json_response(status: int, payload: object) -> Response:
    body = json.dumps(payload, indent=2, default=str).encode() + b"\n"
    return Response(status, body, "application/json")


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode() + b"\n")


# RFC 9110/9112 grammar, ASCII only (re.ASCII, and explicit classes: never str.isdigit).
_METHOD = re.compile(r"[A-Z]+", re.ASCII)
_TARGET = re.compile(r"/[\x21-\x7e]*", re.ASCII)  # origin-form, visible ASCII
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+", re.ASCII)  # tchar
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e]*", re.ASCII)  # no controls, no obs-text
_DIGITS = re.compile(r"[0-9]+", re.ASCII)
VERSIONS = ("HTTP/1.0", "HTTP/1.1")


def parse_request(head: bytes) -> Request | Response:
    """The request line and headers (up to the blank line), or the error response.

    Total: any bytes give a :class:`Request` or a 400/413 :class:`Response`."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return text_response(400, "bad request: the head must be ASCII")
    lines = text.removesuffix("\r\n\r\n").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return text_response(400, "bad request line")
    method, target, version = parts
    if not _METHOD.fullmatch(method):
        return text_response(400, "bad request line: bad method")
    if not _TARGET.fullmatch(target):
        return text_response(400, "bad request line: the target must be a path")
    if version not in VERSIONS:
        return text_response(400, "bad request line: HTTP/1.0 or HTTP/1.1 only")
    headers: dict[str, str] = {}
    lengths: set[str] = set()
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            return text_response(400, "bad header line: obsolete line folding")
        name, sep, raw = line.partition(":")
        if not sep or not _TOKEN.fullmatch(name):
            return text_response(400, "bad header line")
        if not _FIELD_VALUE.fullmatch(raw):
            return text_response(400, "bad header value")
        key, value = name.lower(), raw.strip(" \t")
        if key == "content-length":
            lengths.add(value)
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    content_length = 0
    if lengths:
        if len(lengths) != 1:
            return text_response(400, "bad Content-Length: differing values")
        (length,) = lengths
        if not _DIGITS.fullmatch(length):
            return text_response(400, "bad Content-Length")
        digits = length.lstrip("0")
        # Compare lengths before int(): a huge digit string is 413, not a ValueError.
        if len(digits) > len(str(BODY_LIMIT)) or int(digits or "0") > BODY_LIMIT:
            return text_response(413, "body too large")
        content_length = int(digits or "0")
        headers["content-length"] = str(content_length)
    if "transfer-encoding" in headers:
        return text_response(400, "chunked bodies are not supported")
    path = target.split("?", 1)[0]
    return Request(method, path, headers, content_length)


def cross_site(request: Request) -> bool:
    """Whether a state-changing request may come from a browser page (CSRF): it carries
    ``Origin`` or non-``none`` ``Sec-Fetch-Site``, or lacks our client's own header."""
    headers = request.headers
    return (
        "origin" in headers
        or headers.get("sec-fetch-site", "none") != "none"
        or ADMIN_HEADER.lower() not in headers
    )


def index(routes: Mapping[str, tuple[str, ...]]) -> str:
    """``GET /metrics /status /ready, POST /reload``: what a listener answers."""
    by_method: dict[str, list[str]] = {}
    for path, methods in routes.items():
        if path != "/":
            for method in methods:
                by_method.setdefault(method, []).append(path)
    return ", ".join(f"{method} {' '.join(paths)}" for method, paths in by_method.items())


# Answered to a connection that found no free slot within SLOT_TIMEOUT.
BUSY = Response(503, b"busy: too many admin connections, try again\n", headers={"Retry-After": "1"})

# Path -> methods it answers. GET paths also answer HEAD.
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",),
    "/metrics": ("GET",),
    "/status": ("GET",),
    "/ready": ("GET",),
    "/reload": ("POST",),
}
# The read-only metrics listener's routes.
METRICS_ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET",),
    "/metrics": ("GET",),
    "/ready": ("GET",),
}


# --- what the endpoints say ------------------------------------------------------------------


class ProxyCollector:
    """Builds the metric families from the proxy's counters at scrape time."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        proxy = self.proxy
        stats = proxy.counters()
        pool = proxy.router.pool

        yield _counter(
            "l4proxy_connections_accepted", "Client connections accepted.", stats.accepted
        )
        active = GaugeMetricFamily(
            "l4proxy_connections_active",
            "Open client connections by state (handshake, admitting, dialing, forwarding, "
            "closing: ended, its socket not yet gone).",
            labels=["state"],
        )
        by_state: dict[str, int] = dict.fromkeys(
            ("handshake", "admitting", "dialing", "forwarding", "closing"), 0
        )
        by_state.update(proxy.connection_states())
        for name, count in by_state.items():
            active.add_metric([name], count)
        yield active
        yield _labelled_counter(
            "l4proxy_connections_closed",
            "Client connections ended, by access-log decision.",
            ["decision"],
            stats.closed,
        )
        yield _labelled_counter(
            "l4proxy_connection_closes",
            "How client sockets ended: graceful, abort (a reset we decided), forced "
            "(timeouts.close ran out with bytes unsent), peer (the client left first).",
            ["close"],
            stats.closes,
        )
        yield GaugeMetricFamily(
            "l4proxy_max_connections",
            "The global cap on open client connections (0: none).",
            value=proxy.config.max_connections,
        )
        yield GaugeMetricFamily(
            "l4proxy_max_handshakes",
            "The cap on connections still in their TLS handshake (0: none).",
            value=proxy.config.max_handshakes,
        )

        ups_active = GaugeMetricFamily(
            "l4proxy_upstream_active_connections",
            "Connections forwarded to (or dialing) each upstream.",
            labels=["upstream", "name"],
        )
        health = GaugeMetricFamily(
            "l4proxy_upstream_health",
            "Health of each upstream: 1 for its current state, 0 for the others.",
            labels=["upstream", "name", "state"],
        )
        for upstream, count, machine in zip(pool.upstreams, pool.active, pool.health, strict=True):
            ups_active.add_metric([upstream.key, upstream.name], count)
            for state in Health:
                health.add_metric(
                    [upstream.key, upstream.name, state.value], int(machine.state is state)
                )
        yield ups_active
        yield health
        retired = GaugeMetricFamily(
            "l4proxy_upstream_retired_connections",
            "Open connections to upstreams a reload or a lookup removed (they finish, "
            "none are added).",
            labels=["upstream"],
        )
        for key, count in sorted(pool.retired.items()):
            retired.add_metric([key], count)
        yield retired
        members = GaugeMetricFamily(
            "l4proxy_discovered_members",
            "Members of each discovered group: the addresses its name last answered.",
            labels=["group"],
        )
        for name, group in proxy.router.groups.items():
            members.add_metric([name], len(group.members))
        yield members
        yield _labelled_counter(
            "l4proxy_discovery_lookups",
            "Lookups of discovered groups' names, by result (ok: an answer; empty: the "
            "name has no address records; failed: no answer, members kept).",
            ["group", "result"],
            {
                (name, result): n
                for name, lookups in stats.lookups.items()
                for result, n in lookups.results.items()
            },
        )

        moved = Counter(stats.bytes_closed)
        moved.update(proxy.open_bytes())  # open connections count as they go
        traffic = CounterMetricFamily(
            "l4proxy_bytes",
            "Plaintext bytes forwarded: up = client to upstream, down = upstream to client.",
            labels=["upstream", "direction"],
        )
        for (key, direction), count in sorted(moved.items()):
            traffic.add_metric([key, direction], count)
        yield traffic
        yield _labelled_counter(
            "l4proxy_upstream_forwarded",
            "Client connections forwarded to each upstream, counted when they end.",
            ["upstream"],
            stats.forwarded,
        )

        yield _labelled_counter(
            "l4proxy_handshake_failures",
            "TLS handshakes that failed, by reason.",
            ["reason"],
            {(reason,): n for reason, n in stats.handshake_failures.items()},
        )
        yield _labelled_counter(
            "l4proxy_rate_limited",
            "Connections refused by the per-client limits, by client and limit.",
            ["client", "reason"],
            {key: n for key, n in stats.rate_limited.items()},
        )
        yield _labelled_counter(
            "l4proxy_denied",
            "Connections refused by the authorization rules, by client.",
            ["client"],
            {(client,): n for client, n in stats.denied.items()},
        )
        yield _labelled_counter(
            "l4proxy_dial_failures",
            "Failed dials to upstreams (each attempt), by upstream and reason.",
            ["upstream", "reason"],
            {key: n for key, n in stats.dial_failures.items()},
        )

        checks = CounterMetricFamily(
            "l4proxy_health_checks",
            "Active health checks completed, by upstream and result.",
            labels=["upstream", "result"],
        )
        latency = HistogramMetricFamily(
            "l4proxy_health_check_duration_seconds",
            "Time an active health check took (connect or timeout).",
            labels=["upstream"],
        )
        for key, check in sorted(stats.checks.items()):
            checks.add_metric([key, "ok"], check.ok)
            checks.add_metric([key, "failed"], check.failed)
            latency.add_metric([key], check.latency.cumulative(), check.latency.total)
        yield checks
        yield latency

        yield _labelled_counter(
            "l4proxy_config_reloads",
            "Reload attempts, by result (ok: applied; error: rejected, old config kept).",
            ["result"],
            {(result,): n for result, n in stats.reloads.items()},
        )
        info = GaugeMetricFamily(
            "l4proxy_config_info", "The config in force (always 1).", labels=["sha256"]
        )
        info.add_metric([proxy.config_sha256 or ""], 1)
        yield info
        yield GaugeMetricFamily(
            "l4proxy_draining", "1 while draining after SIGTERM.", value=int(proxy.draining)
        )
        running, restarts = proxy.worker_counts()
        yield GaugeMetricFamily(
            "l4proxy_workers_running",
            "Processes accepting connections (workers: N; 1 when the proxy is one process).",
            value=running,
        )
        yield _counter(
            "l4proxy_worker_restarts",
            "Worker processes that died and were started again (workers: N).",
            restarts,
        )
        yield GaugeMetricFamily(
            "l4proxy_start_time_seconds", "Start time, Unix seconds.", value=proxy.started_at
        )


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _labelled_counter(
    name: str,
    documentation: str,
    labels: list[str],
    values: Mapping[Any, int],  # keys: a label value, or a tuple of them
) -> CounterMetricFamily:
    """One counter family from plain counts, keyed by a label value or a tuple of them."""
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, count in sorted(values.items()):
        family.add_metric([key] if isinstance(key, str) else list(key), count)
    return family


def status(proxy: Proxy) -> dict[str, Any]:
    """``/status``: what an operator asks first."""
    pool = proxy.router.pool
    ready, why = proxy.ready
    upstreams = []
    for upstream, count, machine in zip(pool.upstreams, pool.active, pool.health, strict=True):
        check = proxy.stats.checks.get(upstream.key)
        upstreams.append(
            {
                "name": upstream.name,
                "address": upstream.key,
                "health": machine.state.value,
                "health_reason": machine.last_reason,
                "active_connections": count,
                "proxy_protocol": upstream.proxy_protocol,
                "group": upstream.group,
                "last_check": None
                if check is None or check.last_at is None
                else {
                    "ok": check.last_ok,
                    "reason": check.last_reason,
                    "at": _iso(check.last_at),
                    "latency_ms": round((check.last_latency or 0.0) * 1000, 3),
                },
            }
        )
    states = proxy.connection_states()
    return {
        "state": "draining" if proxy.draining else "serving",
        "ready": ready,
        "ready_reason": why,
        "listen": None if proxy.address is None else "{}:{}".format(*proxy.address),
        "uptime_s": round(time.time() - proxy.started_at, 3),
        "config": {
            "path": None if proxy.config_path is None else str(proxy.config_path),
            "sha256": proxy.config_sha256,
            "loaded_at": proxy.loaded_at,
            "last_reload": proxy.last_reload,
            "balancer": proxy.config.balancer,
        },
        "tls": {"certificate": proxy.certificate},
        "connections": {
            "open": sum(states.values()),
            "forwarding": states["forwarding"],
            "handshaking": states["handshake"],
            "closing": states["closing"],
            "max_connections": proxy.config.max_connections,
            "max_handshakes": proxy.config.max_handshakes,
            "accepted": proxy.counters().accepted,
        },
        "upstreams": upstreams,
        "retired_upstreams": [
            {"address": key, "active_connections": count}
            for key, count in sorted(pool.retired.items())
        ],
        "groups": [_group_status(proxy, name) for name in proxy.router.groups],
    }


def _group_status(proxy: Proxy, name: str) -> dict[str, Any]:
    """One discovered group in ``/status``: its name to look up, members, last lookup."""
    state = proxy.router.groups[name]
    lookups = proxy.stats.lookups.get(name)
    return {
        "name": name,
        "discover": str(state.group.address),
        "proxy_protocol": state.group.proxy_protocol,
        "members": [{"name": u.name, "address": u.key} for u in state.members],
        "last_lookup": None
        if lookups is None or lookups.last_at is None
        else {
            "result": lookups.last_result,
            "reason": lookups.last_reason,
            "at": _iso(lookups.last_at),
        },
    }


def _iso(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix)) + f".{int(unix % 1 * 1000):03d}Z"


# --- the I/O shell -------------------------------------------------------------------------


class AdminServer:
    def __init__(
        self,
        proxy: Proxy,
        *,
        max_clients: int | None = None,
        request_timeout: float | None = None,
        slot_timeout: float | None = None,
        routes: Mapping[str, tuple[str, ...]] = ROUTES,
    ) -> None:
        self.proxy = proxy
        self.routes = routes
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ProxyCollector(proxy))
        ProcessCollector(registry=self.registry)
        self.server: asyncio.Server | None = None
        self.max_clients = MAX_CLIENTS if max_clients is None else max_clients
        self.request_timeout = REQUEST_TIMEOUT if request_timeout is None else request_timeout
        self.slot_timeout = SLOT_TIMEOUT if slot_timeout is None else slot_timeout
        self.slots = asyncio.Semaphore(self.max_clients)
        # One task per open connection, from accept until its transport is closed or
        # aborted (so an empty set means no admin socket is left open).
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(
            self._serve, host, port, limit=HEAD_LIMIT, reuse_address=True
        )
        name = self.server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.handlers):
            task.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)

    def respond(self, request: Request) -> Response:
        methods = self.routes.get(request.path)
        if methods is None:
            return text_response(404, f"not found: {request.path} (try /)")
        allowed = (*methods, "HEAD") if "GET" in methods else methods
        if request.method not in allowed:
            return Response(405, b"method not allowed\n", headers={"Allow": ", ".join(allowed)})
        if request.method == "POST" and cross_site(request):
            return text_response(403, CSRF_REFUSAL)
        proxy = self.proxy
        if request.path == "/metrics":
            return Response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        if request.path == "/status":
            return json_response(200, status(proxy))
        if request.path == "/ready":
            ready, reason = proxy.ready
            return json_response(200 if ready else 503, {"ready": ready, "reason": reason})
        if request.path == "/reload":
            result = proxy.reload()
            payload = {
                "result": "ok" if result.ok else "error",
                "message": result.message,
                "sha256": result.sha256,
                "added": list(result.added),
                "removed": list(result.removed),
            }
            return json_response(200 if result.ok else 422, payload)
        return text_response(200, "layer4lab proxy admin: " + index(self.routes))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.handlers.add(task)
        slot = False
        try:
            try:
                async with asyncio.timeout(self.slot_timeout):
                    slot = await self.slots.acquire()
            except TimeoutError:
                response, head_only = BUSY, False  # the request is not read
            else:
                response, head_only = await self._read_and_route(reader)
            if writer.transport.is_closing():
                return  # the client reset while it waited: writing would raise
            writer.write(response.encode(head_only=head_only))
            async with asyncio.timeout(self.request_timeout):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stalled: nothing more to answer
        except asyncio.CancelledError:
            # stop(): the transport is aborted below. Ending normally, since asyncio
            # 3.11 logs a cancelled client_connected_cb task as an error.
            pass
        finally:
            try:
                await self._close(writer)
            finally:
                if slot:
                    self.slots.release()
                if task is not None:
                    self.handlers.discard(task)

    async def _close(self, writer: asyncio.StreamWriter) -> None:
        """Close the connection: what is still buffered gets ``timeouts.close`` seconds
        to reach the client (none when the listener is stopping), then the transport
        is aborted, so a client that stops reading cannot keep it (and its buffered
        response) open."""
        writer.close()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            reset(writer.transport)
            return
        try:
            async with asyncio.timeout(self.proxy.config.timeouts.close):
                await writer.wait_closed()
        except (TimeoutError, asyncio.CancelledError):  # out of time, or stop(): see _serve
            reset(writer.transport)
        except ConnectionError:
            pass  # closed by a reset: nothing is left to free

    async def _read_and_route(self, reader: asyncio.StreamReader) -> tuple[Response, bool]:
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
                request = parse_request(head)
                if isinstance(request, Response):
                    return request, False
                if request.content_length:
                    await reader.readexactly(request.content_length)
        except TimeoutError:
            return text_response(408, "request timeout"), False
        except asyncio.LimitOverrunError:
            return text_response(431, "request head too large"), False
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("client closed mid-request") from exc
        if request.path in ("/metrics", "/status"):
            await self.proxy.refresh()  # workers: N: their counts, as of now
        response = self.respond(request)
        if request.path == "/reload" and request.method == "POST" and response.status == 200:
            # Answer when the reload applies to every new connection (workers: N: once
            # each worker has taken it), so a client sent right after the answer is
            # judged by the new config whichever worker accepts it. A worker that has
            # not taken it in time is named: it still has the old config.
            unanswered = await self.proxy.reload_settled()
            if unanswered:
                payload = json.loads(response.body)
                payload["unanswered_workers"] = unanswered
                payload["message"] = (
                    f"worker(s) {', '.join(map(str, unanswered))} did not take the new "
                    "config in time: their new connections may still get the old one"
                )
                response = json_response(200, payload)
        return response, request.method == "HEAD"
