"""A router's upstream set: who is in it, each one's pool, and changes at runtime.

Upstreams come and go while requests flow (``add``, ``drain``, ``undrain``,
``recycle``, ``remove``, which the router's admin API exposes). Per-request code reads
``upstreams`` and ``links``, which a change replaces or updates synchronously, never
mid-pick; a request keeps the ``Link`` it picked, so one in flight to an upstream that
goes finishes through it, and the retired pool closes once it is idle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final

from lbstack.aio import Pool
from lbstack.client import cancel
from lbstack.component import UpstreamSpec
from lbstack.config import TierConfig
from lbstack.forwarding.stats import UpstreamStats
from lbstack.health import HealthMonitor
from lbstack.log import get_logger
from lbstack.routing import Policy, Upstream
from lbstack.scrape import Scraper
from lbstack.tls import upstream_context

log = get_logger("forwarding")

# How often a retired pool checks whether its last request is over.
_RETIRE_POLL: Final = 0.05


class UnknownUpstream(LookupError):
    """No current upstream has that name (404)."""


class UpstreamConflict(Exception):
    """The change conflicts with the upstream's state: it exists, or isn't draining (409)."""


def new_upstream(spec: UpstreamSpec, tier: TierConfig) -> Upstream:
    """The routing view of ``spec``, weighted as ``tier.weights`` says."""
    weight = tier.weights.get(spec.name, 1.0)
    upstream = Upstream(spec.name, spec.address, spec.admin, spec.health_path, weight=weight)
    upstream.draining = spec.draining
    return upstream


def is_in(upstream: Upstream) -> bool:
    """Really in (healthy, not ejected, not draining), not merely routable (panic)."""
    return upstream.healthy and not upstream.draining and upstream.ejected_until <= time.monotonic()


class Link:
    """A router's way to one upstream: its pool and its counters."""

    __slots__ = ("host", "name", "pool", "stats", "upstream")

    def __init__(self, upstream: Upstream, pool: Pool | None) -> None:
        self.upstream = upstream
        self.name = upstream.name.encode()
        self.pool = pool
        self.stats = UpstreamStats(upstream.name)
        self.host = b"localhost" if pool is None else pool.host


class UpstreamSet:
    """The upstreams of one router, their pools, and the changes the admin API makes."""

    def __init__(
        self,
        tier: TierConfig,
        upstreams: Sequence[Upstream],
        policy: Policy,
        health: HealthMonitor,
        scraper: Scraper,
        on_added: Callable[[], None],
    ) -> None:
        self.tier = tier
        self.upstreams = tuple(upstreams)
        self.links: dict[Upstream, Link] = {u: Link(u, None) for u in self.upstreams}
        self._policy = policy
        self._health = health
        self._scraper = scraper
        self._on_added = on_added
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self.retire_timeout = tier.timeouts.first_byte + tier.timeouts.idle
        self.stopped = False

    def _pool(self, upstream: Upstream) -> Pool:
        assert self._loop is not None
        tier = self.tier
        pool = Pool(
            upstream.address,
            self._loop,
            connect_timeout=tier.timeouts.connect,
            keepalive_timeout=tier.timeouts.pool_idle,
            limit=tier.limits.max_connections_per_upstream,
            ssl=upstream_context(tier.upstream_tls, upstream.address),
            server_hostname=tier.upstream_tls.server_name or None,
        )
        if upstream.draining:
            pool.stop_pooling()
        return pool

    def start(self) -> None:
        """Open one keep-alive pool per upstream (inside the running loop)."""
        self._loop = asyncio.get_running_loop()
        for link in self.links.values():
            link.pool = self._pool(link.upstream)
            link.host = link.pool.host

    async def close(self) -> None:
        """Close every pool, once the data plane has drained its exchanges."""
        self.stopped = True
        await asyncio.gather(*(cancel(task) for task in list(self._retiring)))
        pools = [link.pool for link in self.links.values() if link.pool is not None]
        for link in self.links.values():
            link.pool = None
        await asyncio.gather(*(pool.close() for pool in pools))

    def find(self, name: str) -> Upstream | None:
        """The current upstream called ``name``, if any."""
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        return None

    def get(self, name: str) -> Upstream:
        upstream = self.find(name)
        if upstream is None:
            raise UnknownUpstream(f"no upstream {name}")
        return upstream

    def _replace(self, upstreams: tuple[Upstream, ...]) -> None:
        self.upstreams = upstreams
        self._policy.upstreams = upstreams

    def add(self, spec: UpstreamSpec) -> Upstream:
        """Route to a new upstream from now on, with slow start.

        ``UpstreamConflict`` if one of that name exists; RuntimeError once stopped.
        """
        if self.stopped:
            raise RuntimeError("the router is stopped")
        if self.find(spec.name) is not None:
            raise UpstreamConflict(f"upstream {spec.name} already exists")
        upstream = new_upstream(spec, self.tier)
        link = Link(upstream, None if self._loop is None else self._pool(upstream))
        # From here to the end, no await: requests see the old set or the whole new one.
        self.links[upstream] = link
        self._health.add(upstream)  # sets ramp_start: slow start
        self._scraper.add(upstream)
        self._replace((*self.upstreams, upstream))
        self._on_added()
        log.info(
            "upstream %s added (%s, weight %g); slow start over %g s",
            upstream.name,
            upstream.address,
            upstream.weight,
            self.tier.slow_start,
        )
        return upstream

    def drain(self, name: str) -> Upstream:
        """Send ``name`` no new request; those in flight finish, then its pool empties."""
        upstream = self.get(name)
        if not upstream.draining:
            upstream.draining = True
            self._health.refresh()
            pool = self.links[upstream].pool
            if pool is not None:
                pool.stop_pooling()
            log.info("upstream %s draining (%d in flight)", name, upstream.in_flight)
        return upstream

    def undrain(self, name: str) -> Upstream:
        """Route to ``name`` again, with slow start (once it is healthy)."""
        upstream = self.get(name)
        if upstream.draining:
            pool = self.links[upstream].pool
            if pool is not None:
                pool.resume_pooling()
            upstream.draining = False
            self._health.refresh()  # back in: ramp_start, slow start
            self._on_added()
        return upstream

    def recycle(self, name: str) -> Upstream:
        """New connections to ``name`` from now on; the pooled ones end cleanly.

        For an upstream whose process is being replaced behind the same address: the
        old process stops accepting, so every new connection reaches its successor.
        The old pool closes its idle connections now and each busy one after its
        response; it is closed once empty.
        """
        upstream = self.get(name)
        link = self.links[upstream]
        old = link.pool
        if old is None:
            return upstream
        link.pool = self._pool(upstream)
        old.stop_pooling()
        self._close_when_idle(name, old, old.busy)
        log.info("upstream %s: new connections from now on", name)
        return upstream

    def remove(self, name: str) -> Upstream:
        """Forget ``name``, which must be draining (else ``UpstreamConflict``).

        Requests in flight to it finish through its pool, which closes once they are
        over (or after ``retire_timeout``). Checks and scrapes stop at once, and its
        series leave the metrics.
        """
        upstream = self.get(name)
        if not upstream.draining:
            raise UpstreamConflict(f"upstream {name} is not draining: drain it first")
        self._replace(tuple(u for u in self.upstreams if u is not upstream))
        link = self.links.pop(upstream)
        self._health.remove(upstream)
        self._scraper.remove(upstream)
        log.info("upstream %s removed (%d in flight)", name, upstream.in_flight)
        if link.pool is not None:
            self._close_when_idle(name, link.pool, lambda: upstream.in_flight > 0)
        return upstream

    def _close_when_idle(self, name: str, pool: Pool, busy: Callable[[], bool]) -> None:
        """Close ``pool`` once ``busy()`` is false (or after ``retire_timeout``)."""

        async def close() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.retire_timeout
            try:
                # Polled: counting down to zero on the hot path would cost every request.
                while busy():
                    if loop.time() >= deadline:
                        log.warning(
                            "upstream %s: requests still on a retired pool %g s on; closing it",
                            name,
                            self.retire_timeout,
                        )
                        break
                    await asyncio.sleep(_RETIRE_POLL)
            finally:
                await pool.close()

        task = asyncio.create_task(close(), name=f"retire pool of {name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
