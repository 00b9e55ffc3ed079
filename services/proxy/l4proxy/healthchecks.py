"""Active health checks (one loop per upstream), the lookups of discovered groups (one
loop per group, at the same interval), the rate limiter's clean-up loop and their log
lines (a mixin of :class:`~l4proxy.proxy.Proxy`)."""

from __future__ import annotations

import asyncio
import time

from . import proxyproto
from .config import Address, Config, Group, Upstream
from .connection import describe_os_error
from .discovery import MemberChange, Resolution
from .health import Transition
from .logs import JsonLog
from .metrics import Stats
from .resolver import Resolver
from .router import Router


class HealthChecks:
    config: Config
    log: JsonLog
    loop: asyncio.AbstractEventLoop
    router: Router
    resolver: Resolver
    stats: Stats
    health_tasks: dict[str, asyncio.Task[None]]
    discovery_tasks: dict[str, asyncio.Task[None]]
    stopping: bool

    def _sync_health_tasks(self) -> None:
        """One check loop per upstream in the pool (configured, or a member of a
        discovered group): start new ones, stop those of removed ones (none once the
        proxy is stopping: a reload or a lookup then must not start any)."""
        if self.stopping:
            return
        upstreams = self.router.pool.upstreams
        wanted = {u.key for u in upstreams}
        for key in [k for k in self.health_tasks if k not in wanted]:
            self.health_tasks.pop(key).cancel()
        for upstream in upstreams:
            if upstream.key not in self.health_tasks:
                self.health_tasks[upstream.key] = self.loop.create_task(
                    self._health_loop(upstream.key), name=f"health-{upstream.name}"
                )

    async def probe(self, upstream: Upstream) -> tuple[bool, str]:
        """A TCP connect within the timeout. No application bytes, except a PROXY v2
        LOCAL header for an upstream that expects one (it says: no client behind this)."""
        try:
            async with asyncio.timeout(self.config.health_check.timeout):
                host = await self.resolver.resolve(upstream.address)
                transport, _ = await self.loop.create_connection(
                    asyncio.Protocol, host, upstream.address.port
                )
        except OSError as exc:
            return False, describe_os_error(exc)
        if upstream.proxy_protocol == "v2":
            transport.write(proxyproto.local_header())
        transport.close()
        return True, "connected"

    async def _health_loop(self, key: str) -> None:
        """Check one upstream for as long as it is configured (the config may change)."""
        while True:
            index = self.router.pool.index_of(key)
            if index is None:
                return
            upstream = self.router.pool.upstreams[index]
            started = time.monotonic()
            ok, reason = await self.probe(upstream)
            finished = time.monotonic()
            self.stats.check_done(
                key, ok=ok, reason=reason, latency=finished - started, wall_time=time.time()
            )
            index = self.router.pool.index_of(key)  # a reload may have moved it meanwhile
            if index is None:
                return
            transition = self.router.check_result(index, ok, self.loop.time(), reason)
            if transition is not None:
                self.log_transition(upstream, transition, passive=False)
            # The next check starts one interval after this one started (never sooner).
            interval = self.config.health_check.interval
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    def _sync_discovery_tasks(self) -> None:
        """One lookup loop per configured group: start new ones, stop removed ones."""
        if self.stopping:
            return
        wanted = {g.name for g in self.config.groups}
        for name in [n for n in self.discovery_tasks if n not in wanted]:
            self.discovery_tasks.pop(name).cancel()
        for group in self.config.groups:
            if group.name not in self.discovery_tasks:
                self.discovery_tasks[group.name] = self.loop.create_task(
                    self._discovery_loop(group.name), name=f"discover-{group.name}"
                )

    async def _discovery_loop(self, name: str) -> None:
        """Look up one group's name for as long as it is configured: at once, then one
        health-check interval after each lookup started (never sooner, and never while
        the last one is still in flight: the resolver shares it)."""
        while True:
            state = self.router.groups.get(name)
            if state is None:
                return
            group = state.group
            started = time.monotonic()
            resolution = await self.resolver.resolution(group.address)
            state = self.router.groups.get(name)
            if state is None:
                return
            if state.group.address != group.address:
                continue  # a reload pointed the group at another name meanwhile
            self.apply_resolution(state.group, resolution)
            interval = self.config.health_check.interval
            await asyncio.sleep(max(0.0, started + interval - time.monotonic()))

    def apply_resolution(self, group: Group, resolution: Resolution) -> MemberChange | None:
        """One lookup's result: members change in the pool (new ones get their check
        loop at once, removed ones lose theirs and retire), and the change is logged."""
        found = self.router.discovered(group.name, resolution, self.loop.time())
        if found is None:
            return None
        change, noteworthy = found
        self.stats.lookup_done(
            group.name, result=change.result, reason=change.reason, wall_time=time.time()
        )
        if change.changed:
            self._sync_health_tasks()
        if noteworthy:
            self.log.emit(
                "resolve",
                group=group.name,
                discover=str(group.address),
                result=change.result,
                reason=change.reason,
                added=[u.key for u in change.added],
                removed=[u.key for u in change.removed],
                members=[u.key for u in change.members],
                ignored=list(change.ignored),
            )
        return change

    async def _cleanup_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.rate_limit.cleanup_interval)
            self.router.limiter.cleanup(self.loop.time())

    def _log_resolved(self, address: Address, ip: str | None) -> None:
        self.log.emit("resolve", upstream=str(address), address=ip)

    def log_transition(self, upstream: Upstream, transition: Transition, *, passive: bool) -> None:
        self.log.emit(
            "health",
            upstream=upstream.key,
            upstream_name=upstream.name,
            old=transition.old.value,
            new=transition.new.value,
            reason=transition.reason,
            source="passive" if passive else "active",
        )
