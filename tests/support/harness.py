"""The integration harness: real proxy, real TLS, real sockets on loopback.

The proxy runs on its own uvloop thread, test upstreams on another, and the test's
clients on the main thread. Certificates are made at test time by certgen.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

import certgen
from l4proxy.adminctl import ADMIN_HEADERS
from l4proxy.config import Config, parse_config, read_config
from l4proxy.logs import JsonLog
from l4proxy.resolver import Lookup
from l4proxy.server import Proxy
from l4proxy.supervisor import make_proxy

from .loops import LoopThread
from .upstreams import TestUpstream

# L4PROXY_TEST_WORKERS=2 runs every test's proxy as a supervisor and two workers.
WORKERS = int(os.environ.get("L4PROXY_TEST_WORKERS", "1"))
CLIENTS = ("client.a", "client.b", "client.c", "client.d", "client.e", "client-x")


def make_certs(out: Path) -> Path:
    """The standard set plus deliberately bad client certificates:
    ``expired``, ``noeku`` (no extended key usage), ``servereku`` (serverAuth only),
    ``twodns`` (two DNS SANs), and ``other/`` (a whole set from another CA); and CNs
    that identity normalization is about: ``mixedcase`` (``Client.A``, which is
    ``client.a``), ``trailingspace`` (``client.a `` ) and ``cyrillic`` (``client.a``
    with a Cyrillic U+0441 for its ``c``), the last two with no SANs."""
    certgen.generate(out, CLIENTS)
    ca = certgen.load_issued(out, "ca")
    now = dt.datetime.now(dt.UTC)
    certgen.write_issued(
        out,
        "expired",
        certgen.make_client(
            ca,
            "client.expired",
            not_before=now - dt.timedelta(days=30),
            not_after=now - dt.timedelta(days=1),
        ),
    )
    certgen.write_issued(out, "noeku", certgen.make_client(ca, "client.noeku", eku="none"))
    certgen.write_issued(out, "servereku", certgen.make_client(ca, "client.srv", eku="server"))
    certgen.write_issued(
        out, "twodns", certgen.make_client(ca, "client.two", dns=("one.example", "two.example"))
    )
    certgen.write_issued(out, "mixedcase", certgen.make_client(ca, "Client.A"))
    for stem, common_name in (("trailingspace", "client.a "), ("cyrillic", "\u0441lient.a")):
        issued = certgen.make_client(ca, stem, common_name=common_name, uri="", dns=())
        certgen.write_issued(out, stem, issued)
    certgen.generate(out / "other", ["client.a"])
    return out


class LogCapture:
    """A text stream for :class:`JsonLog` that keeps parsed records and lets tests
    wait for a record matching a condition (with a deadline, no sleeping)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._partial = ""

    def write(self, text: str) -> int:
        with self._cond:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                if line:
                    self.records.append(json.loads(line))
            self._cond.notify_all()
        return len(text)

    def flush(self) -> None:
        pass

    def events(self, event: str, **match: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [
                r
                for r in self.records
                if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
            ]

    def wait_for(
        self,
        event: str,
        count: int = 1,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        **match: Any,
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` records of ``event`` match; return all matches."""
        deadline = time.monotonic() + timeout

        def matches() -> list[dict[str, Any]]:
            found = self.events(event, **match)
            return [r for r in found if where(r)] if where else found

        with self._cond:
            while True:
                found = matches()
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"timed out after {timeout}s waiting for {count} x {event} {match}; "
                        f"have {len(found)}; last records: {self.records[-8:]}"
                    )
                self._cond.wait(left)


class Lab:
    """One test's world: upstreams, a proxy, its logs."""

    def __init__(self, certs: Path) -> None:
        self.certs = certs
        self.up_loop = LoopThread("upstreams")
        self.proxy_loop = LoopThread("proxy")
        self.upstreams: list[TestUpstream] = []
        self.proxy: Proxy | None = None
        self.logs = LogCapture()

    def start_upstreams(self, modes: Sequence[str], **options: Any) -> list[TestUpstream]:
        async def start() -> list[TestUpstream]:
            made = []
            for i, mode in enumerate(modes):
                made.append(await TestUpstream(f"u{i + 1}", mode, **options).start())
            return made

        self.upstreams = self.up_loop.run(start())
        return self.upstreams

    def start_upstreams_on(
        self, hosts: Sequence[str], mode: str = "echo", **options: Any
    ) -> list[TestUpstream]:
        """One upstream per host (``u1``... in that order), all on one port, as the
        members of a discovered group are (loopback answers on 127.0.0.1-127.255.255.254).
        A port that is taken on one of the hosts is given up for another."""

        async def start() -> list[TestUpstream]:
            for _ in range(20):
                made = [await TestUpstream("u1", mode, host=hosts[0], **options).start()]
                try:
                    for i, host in enumerate(hosts[1:], 2):
                        upstream = TestUpstream(f"u{i}", mode, host=host, **options)
                        made.append(await upstream.start(made[0].port))
                except OSError:
                    for upstream in made:
                        await upstream.stop()
                    continue
                return made
            raise AssertionError(f"no port free on all of {hosts}")

        self.upstreams = self.up_loop.run(start())
        return self.upstreams

    def config(
        self, upstreams: Sequence[str | dict[str, Any]] | None = None, **overrides: Any
    ) -> Config:
        return parse_config(self.config_raw(upstreams, **overrides), self.certs)

    def write_config(
        self, path: Path, upstreams: Sequence[str | dict[str, Any]] | None = None, **overrides: Any
    ) -> Path:
        """The same config as :meth:`config`, as a YAML file (for reloads)."""
        text = yaml.safe_dump(self.config_raw(upstreams, **overrides), sort_keys=False)
        path.write_text(text, encoding="utf-8")
        return path

    def config_raw(
        self, upstreams: Sequence[str | dict[str, Any]] | None = None, **overrides: Any
    ) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "tls": {
                "ca": str(self.certs / "ca.pem"),
                "cert": str(self.certs / "server.pem"),
                "key": str(self.certs / "server.key"),
            },
            "upstreams": list(
                upstreams if upstreams is not None else [u.address for u in self.upstreams]
            ),
            "health_check": {"interval": "100ms", "timeout": "500ms"},
            "rate_limit": {"enabled": False},
            "admin": {"listen": "127.0.0.1:0"},
        }
        if WORKERS > 1:
            raw["workers"] = WORKERS
        raw.update(overrides)
        return raw

    def start_proxy(
        self,
        config: Config | None = None,
        *,
        wait_healthy: bool = True,
        path: Path | None = None,
        lookup: Lookup | None = None,
    ) -> Proxy:
        """Start the proxy with ``config``, or from the file at ``path`` (reloadable);
        ``lookup`` stands in for DNS (see :class:`l4proxy.resolver.Resolver`)."""
        digest = None
        if path is not None:
            config, digest = read_config(path)
        cfg = config or self.config()

        async def start() -> Proxy:
            log = JsonLog(self.logs)  # type: ignore[arg-type]
            proxy = make_proxy(cfg, log, config_path=path, config_sha256=digest, lookup=lookup)
            await proxy.start()
            return proxy

        self.proxy = self.proxy_loop.run(start())
        if wait_healthy:
            # Every upstream that is listening has been checked once (settled as up).
            self.wait_checked()
        return self.proxy

    def wait_checked(self, timeout: float = 10.0) -> None:
        """Every upstream has had its first check (each logs its move out of unknown)."""
        assert self.proxy is not None
        self.logs.wait_for(
            "health",
            count=len(self.proxy.config.upstreams),
            timeout=timeout,
            where=lambda r: r["old"] == "unknown",
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self.proxy is not None
        assert self.proxy.address is not None
        return self.proxy.address

    def admin(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        address: tuple[str, int] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request to the proxy's admin listener (or to ``address``): status,
        headers, body. A POST carries the admin header, as adminctl's do, unless
        ``headers`` is given."""
        assert self.proxy is not None
        if address is None:
            address = self.proxy.admin_address
        assert address is not None
        host, port = address
        if headers is None:
            headers = dict(ADMIN_HEADERS) if method == "POST" else {}
        conn = http.client.HTTPConnection(host, port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def admin_json(self, path: str, method: str = "GET") -> tuple[int, Any]:
        status, _, body = self.admin(path, method)
        return status, json.loads(body)

    def active(self) -> list[int]:
        """Open connections per upstream, as the router counts them. With workers: N,
        after a round trip to every worker (``refresh``): a release a worker sent
        before its answer is counted (a connection whose access line is out has sent
        its release)."""
        proxy = self.proxy
        assert proxy is not None

        async def read() -> list[int]:
            await proxy.refresh()
            return list(proxy.router.pool.active)

        return self.proxy_loop.run(read())

    def carrying(self) -> list[int]:
        """Per upstream: open connections that carry client bytes (not health probes)."""
        return self.up_loop.call(lambda: [u.carrying() for u in self.upstreams])

    def open_connections(self) -> int:
        proxy = self.proxy
        assert proxy is not None

        async def count() -> int:
            await proxy.refresh()
            return proxy.open_count()

        return self.proxy_loop.run(count())

    def health(self) -> list[str]:
        proxy = self.proxy
        assert proxy is not None
        return self.proxy_loop.call(lambda: [h.state.value for h in proxy.router.pool.health])

    def close(self) -> None:
        errors: list[dict[str, Any]] = []
        try:
            if self.proxy is not None:
                self.proxy_loop.run(self.proxy.stop())
                errors = self.logs.events("error")
            # Stopped whatever the proxy logged: closing a uvloop loop that still has
            # a listening server waits for ever.
            for upstream in self.upstreams:
                self.up_loop.run(upstream.stop())
        finally:
            self.proxy_loop.stop()
            self.up_loop.stop()
        # An exception escaping a proxy callback is a bug, whatever the test.
        assert not errors, f"the proxy logged unexpected errors: {errors}"


def iter_lab(certs: Path) -> Iterator[Lab]:
    lab = Lab(certs)
    try:
        yield lab
    finally:
        lab.close()
