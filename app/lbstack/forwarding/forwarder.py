"""The forwarder: one hop's data plane, wired from the pieces of this package.

``Forwarder.serve`` takes each request a ``FrontConnection`` parsed, checks it
(version, target, Host, limits), rewrites its head (``headers``) and hands it to the
``Exchanger``, which picks an upstream (``admission``) from the set (``upstreams``),
tries and retries, and relays the answer. Errors the stack answers itself are short
plain-text responses (400, 405, 408, 413, 414, 431, 502, 503, 504, 505).

Bookkeeping is plain counters (``stats``) a collector turns into the metrics at scrape
time; health checks and the scraper are the router's, passed in.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Iterator, Sequence
from random import Random
from time import perf_counter
from typing import Any, Final

from aiohttp import web
from yarl import URL

from lbstack import aio
from lbstack.accesslog import AccessLog
from lbstack.component import UpstreamSpec
from lbstack.config import TierConfig
from lbstack.forwarding.admission import Admission
from lbstack.forwarding.exchange import UNREACHED_HEADER, Exchanger
from lbstack.forwarding.front import FrontConnection, FrontServer
from lbstack.forwarding.headers import ADDED_LINES, error_response, request_head
from lbstack.forwarding.state import Exchange
from lbstack.forwarding.stats import TierStats, UpstreamReading
from lbstack.forwarding.upstreams import UpstreamSet, is_in
from lbstack.health import HealthMonitor
from lbstack.log import get_logger
from lbstack.routing import Upstream, create_policy
from lbstack.routing.budget import RetryBudget
from lbstack.scrape import Scraper

log = get_logger("forwarding")

_UNREACHED_LINE: Final = f"{UNREACHED_HEADER}: 1\r\n".encode()
# The coarsest a timeout may be swept: a tenth of the shortest one, within these.
_SWEEP_MIN, _SWEEP_MAX = 0.02, 1.0
# What a tier in front may add to one header line (", <address>" to X-Forwarded-For).
_ADDED_BYTES: Final = 256


class Forwarder:
    """Forwards every request of a data socket to one upstream of a tier.

    ``edge`` is true for the balancer, the stack's public entry: it sets
    ``X-Forwarded-Proto``. Otherwise (a proxy, whose upstreams are servers) it answers
    ``X-Served-By: <upstream name>``.
    """

    def __init__(
        self,
        name: str,
        tier: TierConfig,
        upstreams: Sequence[Upstream],
        *,
        health: HealthMonitor,
        scraper: Scraper,
        edge: bool,
        rng: Random | None = None,
    ) -> None:
        self.name = name
        self.tier = tier
        self.edge = edge
        self.state = "starting"
        self.health = health
        self.scraper = scraper
        self.policy = create_policy(tier.policy, upstreams, rng, tier=tier)
        self.admission = Admission(tier, self.policy)
        self.members = UpstreamSet(
            tier, upstreams, self.policy, health, scraper, on_added=self.admission.wake
        )
        retries = tier.retries
        self.budget = RetryBudget(retries.budget_ratio, retries.budget_min_per_second)
        self.stats = TierStats()
        self.in_flight = 0
        self._exchanger = Exchanger(self)
        self._via = f"1.1 {name}".encode()
        # Request ids: a random per-process prefix and a counter, unique without uuid4.
        self._id_prefix = f"{secrets.token_hex(6)}-".encode()
        self._ids = itertools.count(1)
        limits = tier.limits
        self._max_body = limits.max_body_size
        self._max_concurrent = limits.max_concurrent
        self._tunnel_protocols = frozenset(p.lower() for p in tier.tunnels.protocols)
        self._max_tunnels = tier.tunnels.max
        self._loop: asyncio.AbstractEventLoop | None = None
        self._access_log: AccessLog | None = None

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self.members.upstreams

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def data_server(self) -> FrontServer:
        """The data sockets' server (in the running loop)."""
        timeouts, limits = self.tier.timeouts, self.tier.limits
        shortest = min(
            t
            for t in (
                timeouts.first_byte,
                timeouts.idle,
                timeouts.client_keepalive,
                timeouts.per_try,
                self.tier.tunnels.idle_timeout,
            )
            if t > 0
        )
        # Behind another tier, room for what that tier added to the client's head.
        inner = 0 if self.edge else 1
        return FrontServer(
            self.serve,
            tunnels=lambda message: bool(self._upgrade_to(message)),
            keepalive=timeouts.client_keepalive,
            max_line_size=limits.max_header_size + inner * _ADDED_BYTES,
            max_headers=limits.max_headers + inner * ADDED_LINES,
            sweep_interval=min(_SWEEP_MAX, max(_SWEEP_MIN, shortest / 10)),
        )

    async def start(self) -> None:
        """Open the pools, start checks and scrapes (inside the running loop)."""
        self._loop = asyncio.get_running_loop()
        self.members.start()
        if self.tier.access_log:
            self._access_log = AccessLog(self.tier.access_log, self.name)
        await self.health.start()
        await self.scraper.start()
        self.state = "ready"

    async def close(self) -> None:
        """Close every pool, once the data plane has drained its exchanges."""
        self.state = "stopped"
        await self.scraper.close()
        await self.health.close()
        if self._access_log is not None:
            self._access_log.close()
            self._access_log = None
        await self.members.close()

    # -- membership (the admin API's) ------------------------------------------------

    def find(self, name: str) -> Upstream | None:
        return self.members.find(name)

    def add_upstream(self, spec: UpstreamSpec) -> Upstream:
        return self.members.add(spec)

    def drain(self, name: str) -> Upstream:
        return self.members.drain(name)

    def undrain(self, name: str) -> Upstream:
        return self.members.undrain(name)

    def recycle(self, name: str) -> Upstream:
        return self.members.recycle(name)

    def remove_upstream(self, name: str) -> Upstream:
        return self.members.remove(name)

    # -- the data plane --------------------------------------------------------------

    def _new_id(self) -> bytes:
        return b"%s%d" % (self._id_prefix, next(self._ids))

    async def serve(
        self, conn: FrontConnection, message: aio.RawRequestMessage, payload: aio.StreamReader
    ) -> bool:
        """Answer one request; whether its connection may take another."""
        started = perf_counter()
        head = request_head(
            message.raw_headers,
            client=conn.client,
            via=self._via,
            proto=conn.scheme if self.edge else b"",
            http10=message.version < aio.HTTP11,
            new_id=self._new_id,
            authority=None if message.path[:1] == "/" else _authority(message),
            upgrade=self._upgrade_to(message) if message.upgrade else b"",
        )
        exchange = Exchange(conn, message, payload, head, conn.task)
        refused = self._check(exchange)
        if refused is not None:
            status, keep = refused
        else:
            conn.exchange = exchange
            self.in_flight += 1
            try:
                status, keep = await self._exchanger.forward(exchange)
            finally:
                self.in_flight -= 1
                conn.exchange = None
        elapsed = perf_counter() - started
        stats = self.stats
        stats.count(status)
        stats.latency.observe(elapsed)
        if self._access_log is not None:
            link = exchange.link
            self._access_log.write(
                head.request_id.decode("latin-1"),
                message.method,
                message.path,
                status,
                "" if link is None else link.upstream.name,
                exchange.attempts,
                elapsed,
            )
        return keep

    def _check(self, ex: Exchange) -> tuple[int, bool] | None:
        """Refuse what must not go upstream (the answer), else None and ``ex.target`` set."""
        message = ex.message
        version = message.version
        if version.major != 1:
            if version == (0, 9):
                return self.refuse(ex, 400, "HTTP/0.9 is not supported", close=True)
            return self.refuse(ex, 505, f"HTTP/{version.major}.{version.minor}", close=True)
        if message.method == "CONNECT":
            return self.refuse(ex, 405, "CONNECT is not supported here", close=True)
        if ex.head.problem:
            return self.refuse(ex, ex.head.status, ex.head.problem, close=True)
        target = _origin_form(message)
        if target is None:
            return self.refuse(ex, 400, "unsupported request target", close=True)
        if self._max_body and ex.payload is not aio.EMPTY_PAYLOAD:
            length = message.headers.get("Content-Length")
            if length is not None and int(length) > self._max_body:
                return self.refuse(ex, 413, "request body over the limit", close=True)
        if self.in_flight >= self._max_concurrent:
            return self.refuse(ex, 503, "too many requests in flight", retry_after=True)
        if self.state != "ready":
            return self.refuse(ex, 503, "not ready", retry_after=True)
        if ex.head.upgrade and self.stats.tunnels_open >= self._max_tunnels:
            self.stats.tunnels["refused"] += 1
            return self.refuse(ex, 503, "too many tunnels open", retry_after=True)
        ex.target = target
        return None

    def _upgrade_to(self, message: aio.RawRequestMessage) -> bytes:
        """The protocol an upgrade request asks for, if this tier tunnels it; else b""."""
        if not message.upgrade or message.version < aio.HTTP11:
            return b""
        protocol: str = message.headers.get("Upgrade", "")
        token = protocol.strip().lower()
        return token.encode() if token in self._tunnel_protocols else b""

    def refuse(
        self,
        ex: Exchange,
        status: int,
        problem: str,
        *,
        close: bool = False,
        retry_after: bool = False,
        unreached: bool = False,
    ) -> tuple[int, bool]:
        """Answer with the stack's own error; the connection closes unless it is sound."""
        close = close or ex.conn.closing or not ex.payload.is_eof() or ex.message.should_close
        response = error_response(
            status, problem, ex.head.request_id, close=close, retry_after=retry_after
        )
        if unreached and status >= 500:
            # Tell the tier in front that no upstream of ours got it: safe to retry.
            end = response.index(b"\r\n") + 2
            response = response[:end] + _UNREACHED_LINE + response[end:]
        ex.conn.write(response)
        return status, not close

    def client_gone(self, ex: Exchange, doing: str) -> None:
        """Count a client that went away (nothing is answered: 499)."""
        self.stats.client_disconnects += 1
        log.debug("client went away while %s (%s)", doing, ex.head.request_id)

    # -- views -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The JSON-able view ``GET /status`` serves: the routing decision's every input."""
        return {
            "state": self.state,
            "in_flight": self.in_flight,
            "queued": len(self.admission.waiters),
            "policy": self.tier.policy,
            "panic": self.health.in_panic,
            "retry_budget": round(self.budget.balance(), 2),
            "tunnels": {"open": self.stats.tunnels_open, "max": self._max_tunnels},
            "upstreams": self.upstream_views(),
        }

    def upstream_views(self) -> list[dict[str, Any]]:
        """Every current upstream's view (``GET /upstreams``, ``/status``)."""
        return [self.upstream_view(u) for u in self.members.upstreams]

    def readings(self) -> Iterator[UpstreamReading]:
        """Each current upstream's counters and gauges, for the metrics collector."""
        now = time.monotonic()
        for upstream, link in self.members.links.items():
            cost = self.cost(upstream, now)
            yield link.stats, upstream.in_flight, is_in(upstream), cost or 0.0

    def cost(self, upstream: Upstream, now: float) -> float | None:
        cost = getattr(self.policy, "cost", None)
        return None if cost is None else float(cost(upstream, now))

    def upstream_view(self, u: Upstream) -> dict[str, Any]:
        """One upstream's JSON-able view: where it is, its gate, its load."""
        now = time.monotonic()
        cost = self.cost(u, now)
        return {
            "name": u.name,
            "address": str(u.address),
            "admin": None if u.admin is None else str(u.admin),
            "weight": u.weight,
            # The weight routing uses now: ramping up from a tenth while in slow start.
            "effective_weight": round(self.policy.effective_weight(u, now), 6),
            "in_flight": u.in_flight,
            "requests": u.requests,
            "errors": u.errors,
            "cost": None if cost is None else round(cost, 6),
            "latency_ewma": round(u.ewma, 6),
            "reported": {
                "in_flight": u.reported_in_flight,
                "latency": round(u.reported_latency, 6),
                "health": u.reported_health,
                "age": None if u.reported_at < 0 else round(now - u.reported_at, 2),
            },
            **self.health.view(u),
            "available": u.available,
        }


def _authority(message: aio.RawRequestMessage) -> bytes | None:
    """The authority of an absolute-form target, which stands for the Host."""
    url: URL = message.url
    return url.raw_authority.encode() if url.absolute else None


def _origin_form(message: aio.RawRequestMessage) -> bytes | None:
    """The target to send upstream: origin form (absolute form rewritten), or None."""
    path: str = message.path
    if path.startswith("/"):
        return path.encode("utf-8", "surrogateescape")
    url: URL = message.url
    if url.absolute and url.raw_path.startswith("/"):
        return url.raw_path_qs.encode("utf-8", "surrogateescape")
    return None


# The admin app's handle on its forwarder, for routes that act on it.
FORWARDER: Final = web.AppKey("forwarder", Forwarder)
