"""The HTTP forwarding core the balancer and the proxies share.

A ``Forwarder`` takes each request off a data socket, picks an upstream with the
tier's routing policy and streams the exchange both ways through a keep-alive pool per
upstream. It owns the data plane's rules: hop-by-hop headers, ``X-Forwarded-*``,
``Via`` and ``X-Request-Id``; timeouts and limits; retries that are safe; and the
short plain-text errors the stack itself answers with (400, 408, 413, 502, 503, 504).

Upstreams come and go at runtime (``add_upstream``, ``drain``, ``undrain``,
``remove_upstream``, which the router's admin API exposes). Per-request code reads
``_upstreams`` and the policy's tuple, which a change replaces whole, synchronously,
never mutating a tuple a pick may be reading; a request keeps the ``_Link`` it picked,
so one in flight to an upstream that goes finishes through it.

``create_router`` builds a balancer's or a proxy's whole ``Component`` around one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from random import Random
from time import perf_counter
from typing import Any, Final

import aiohttp
from aiohttp import hdrs, web
from aiohttp.client_reqrep import ClientRequest, ClientResponse
from aiohttp.helpers import TimerNoop
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage
from multidict import CIMultiDict
from prometheus_client import Counter, Histogram
from yarl import URL

from app import client
from app.accesslog import AccessLog
from app.address import Address
from app.client import cancel
from app.component import UpstreamSpec
from app.config import TierConfig
from app.health import HealthMonitor
from app.log import get_logger
from app.metrics import Metrics, UpstreamMetrics
from app.routing import Upstream, create_policy
from app.routing.budget import RetryBudget
from app.scrape import Scraper

log = get_logger("forwarding")

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# What lbstack_upstream_errors_total's ``kind`` label takes.
ERROR_KINDS: Final = ("connect", "timeout", "reset", "protocol")
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# What aiohttp's client would add to a request by itself; the request goes as received.
_SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
# aiohttp's client defaults for reading a response (ClientSession's own).
_READ_BUFSIZE: Final = 2**16
_MAX_LINE_SIZE: Final = 8190
_MAX_HEADERS: Final = 128
# Methods whose response has no body whatever its headers say.
_NO_BODY_METHODS: Final = frozenset({"HEAD"})
# Shared by every upstream request: no traces, no total timeout (the exchange's
# watchdog bounds it). Neither is ever mutated.
_NO_TRACES: Final[list[Any]] = []
_NO_TIMER: Final = TimerNoop()
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"

# How the request-header pass treats a (lower-case) name; absent names are copied.
_DROP, _CONNECTION, _TRANSFER_ENCODING, _XFF, _XFP, _VIA, _REQUEST_ID, _EXPECT, _HOST = range(9)
_REQUEST_SPECIAL: Final = {
    **dict.fromkeys(HOP_BY_HOP, _DROP),
    "connection": _CONNECTION,
    "transfer-encoding": _TRANSFER_ENCODING,
    "x-forwarded-for": _XFF,
    "x-forwarded-proto": _XFP,
    "via": _VIA,
    "x-request-id": _REQUEST_ID,
    # Answered here (100 Continue) rather than relayed: see Forwarder._body.
    "expect": _EXPECT,
    "host": _HOST,
}

# What an exchange waits on; when it waits too long, the status it answers with.
_WAIT_HEADERS, _READ_CLIENT, _WRITE_UPSTREAM, _READ_UPSTREAM, _WRITE_CLIENT = range(5)
_PHASE_STATUS: Final = (504, 408, 504, 504, 408)
_UPSTREAM_PHASES: Final = frozenset({_WAIT_HEADERS, _WRITE_UPSTREAM, _READ_UPSTREAM})
# Status an exchange fails with when the client went away: nothing is sent (nginx's 499).
_CLIENT_GONE: Final = 499

# What _pick returns when every available upstream is at its in-flight limit.
_FULL: Final = object()
# How often a removed upstream's pool checks whether its last request is over.
_RETIRE_POLL: Final = 0.05

_REASONS: Final = {
    400: "Bad Request",
    408: "Request Timeout",
    413: "Content Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _BodyAborted(Exception):
    """Raised into aiohttp's body writer so the upstream never sees a complete body."""


class _UpstreamRequest(ClientRequest):
    """aiohttp's client request for headers we built: taken as they are, none added.

    The stock request copies the headers into a new ``CIMultiDict`` header by header
    and merges its skip list into another one, on every request. Ours are already the
    exact headers to send, Host included when the client sent one, and nothing is
    ever added automatically (Content-Type is the one ``send`` would still add).
    """

    _skip_auto_headers = CIMultiDict({hdrs.CONTENT_TYPE: None})

    def update_headers(self, headers: Any) -> None:
        if hdrs.HOST in headers:
            self.headers = headers
            return
        # No Host from the client (HTTP/1.0): the upstream's, first, as aiohttp puts it.
        own: CIMultiDict[str] = CIMultiDict()
        host = self.url.host_port_subcomponent
        assert host is not None
        own[hdrs.HOST] = host
        own.extend(headers)
        self.headers = own

    def update_auto_headers(self, skip_auto_headers: Any) -> None:
        return


class _Exchange:
    """One request's watchdog and the state its body writer shares with the handler.

    The deadline moves on every body chunk, so it is a plain attribute: the timer
    re-arms itself lazily when it fires early instead of being rescheduled per chunk.
    When it expires (or ``fail`` is called) the handler's task is cancelled, and the
    handler turns that cancellation into ``failure``'s status with ``absorb``.
    """

    __slots__ = (
        "_handle",
        "_loop",
        "_open",
        "_task",
        "attempts",
        "body_started",
        "deadline",
        "failure",
        "link",
        "phase",
        "responding",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self._loop = loop
        self._task = task
        self._handle: asyncio.TimerHandle | None = None
        self._open = True
        self.deadline = 0.0
        self.phase = _WAIT_HEADERS
        self.failure = 0
        self.body_started = False
        self.attempts = 0
        self.responding = False
        self.link: _Link | None = None

    def arm(self, deadline: float, phase: int) -> None:
        """Wait for ``phase`` until ``deadline``, which may be earlier than the last one."""
        self.deadline = deadline
        self.phase = phase
        handle = self._handle
        if handle is None or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._handle = None
        if self._loop.time() < self.deadline:
            self._handle = self._loop.call_at(self.deadline, self._expire)
            return
        self.fail(_PHASE_STATUS[self.phase])

    def fail(self, status: int) -> None:
        """End the exchange with ``status`` by cancelling the handler (first failure wins)."""
        if self._open and not self.failure:
            self.failure = status
            self._task.cancel()

    def absorb(self) -> int:
        """The failure a cancellation stands for, or 0 when it came from elsewhere.

        Elsewhere means the client went away (aiohttp's handler cancellation) or the
        server is shutting down: the caller must re-raise.
        """
        failure, self.failure = self.failure, 0
        if failure and self._task.uncancel() == 0:
            return failure
        return 0

    def close(self) -> None:
        self._open = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class _Link:
    """A forwarder's connection to one upstream: its pool, URL base and metric series."""

    __slots__ = (
        "_codes",
        "_errors",
        "_metrics",
        "base",
        "detached",
        "latency",
        "retries",
        "session",
        "upstream",
    )

    def __init__(
        self, upstream: Upstream, metrics: UpstreamMetrics, cost: Callable[[], float]
    ) -> None:
        self.upstream = upstream
        self.base = upstream.address.http_base
        self.session: aiohttp.ClientSession | None = None
        # Removed: its series are gone, and requests still in flight must not bring
        # them back (nor count into those of a newcomer of the same name).
        self.detached = False
        labels = metrics.labels(upstream.name)
        self._metrics = metrics
        self._codes: dict[int, Counter] = {}
        # Every kind exported at 0 from the start, so "no errors" is a 0, not no data.
        self._errors: dict[str, Counter] = {
            kind: metrics.errors.labels(*labels, kind) for kind in ERROR_KINDS
        }
        self.latency: Histogram = metrics.latency.labels(*labels)
        self.retries: Counter = metrics.retries.labels(*labels)
        # Read at scrape time, so the hot path never takes the metric's lock.
        metrics.in_flight.labels(*labels).set_function(lambda: upstream.in_flight)
        # Really in (healthy, not ejected, not draining), not merely routable: in panic
        # mode every upstream is routable, and a router reading this must still see how
        # many of our upstreams are down.
        metrics.healthy.labels(*labels).set_function(lambda: 1.0 if _is_in(upstream) else 0.0)
        metrics.cost.labels(*labels).set_function(cost)

    def count(self, status: int) -> None:
        child = self._codes.get(status)
        if child is None:
            if self.detached:
                return
            labels = self._metrics.labels(self.upstream.name)
            child = self._codes[status] = self._metrics.requests.labels(*labels, str(status))
        child.inc()

    def error(self, kind: str) -> None:
        """Count a failure of this upstream: connect, timeout, reset or protocol."""
        self.upstream.errors += 1
        child = self._errors.get(kind)
        if child is None:
            if self.detached:
                return
            labels = self._metrics.labels(self.upstream.name)
            child = self._errors[kind] = self._metrics.errors.labels(*labels, kind)
        child.inc()

    def detach(self) -> None:
        """Remove this upstream's series, so that Prometheus stops seeing it."""
        self.detached = True
        metrics = self._metrics
        labels = metrics.labels(self.upstream.name)
        for code in self._codes:
            metrics.requests.remove(*labels, str(code))
        for kind in self._errors:
            metrics.errors.remove(*labels, kind)
        for series in (
            metrics.latency,
            metrics.retries,
            metrics.in_flight,
            metrics.healthy,
            metrics.cost,
        ):
            series.remove(*labels)

    def stop_pooling(self) -> None:
        """Keep no connection alive: close the idle ones now, the others as their
        request ends (aiohttp's ``force_close``, switched on at runtime; a request sent
        meanwhile says ``Connection: close``). The upstream sees clean closes."""
        if self.session is not None:
            _stop_pooling(self.session)

    def resume_pooling(self) -> None:
        """Keep connections alive again (undone ``stop_pooling``)."""
        connector = None if self.session is None else self.session.connector
        if connector is not None:
            connector._force_close = False


def _stop_pooling(session: aiohttp.ClientSession) -> None:
    connector = session.connector
    if connector is None:
        return
    connector._force_close = True
    idle = list(connector._conns.values())
    connector._conns.clear()
    for connections in idle:
        for protocol, _ in connections:
            protocol.close()


def _is_in(upstream: Upstream) -> bool:
    return upstream.healthy and not upstream.draining and upstream.ejected_until <= time.monotonic()


class Forwarder:
    """Forwards every request of a data socket to one upstream of a tier.

    ``edge`` is true for the balancer, the stack's public entry: it sets
    ``X-Forwarded-Proto``. Otherwise (a proxy, whose upstreams are servers) the
    forwarder answers ``X-Served-By: <upstream name>``, the header that tells which
    server served a request.
    """

    def __init__(
        self,
        name: str,
        tier: TierConfig,
        upstreams: Sequence[UpstreamSpec],
        metrics: Metrics,
        *,
        edge: bool,
        rng: Random | None = None,
    ) -> None:
        self.name = name
        self.tier = tier
        self.edge = edge
        self.state = "starting"
        self._metrics = metrics
        self._upstreams = tuple(self._new_upstream(u) for u in upstreams)
        self._policy = create_policy(tier.policy, self._upstreams, rng, tier=tier)
        upstream_metrics = self._upstream_metrics = UpstreamMetrics(metrics)
        self._links = {u: self._new_link(u) for u in self._upstreams}
        # Pools of removed upstreams, closed once their last request is over.
        self._retiring: set[asyncio.Task[None]] = set()
        self.retire_timeout = tier.timeouts.first_byte + tier.timeouts.idle
        self._health = HealthMonitor(self._upstreams, tier, upstream_metrics, rng=rng)
        self._scraper = Scraper(self._upstreams, tier, upstream_metrics, rng=rng)
        retries = tier.retries
        self._budget = RetryBudget(retries.budget_ratio, retries.budget_min_per_second)
        self._budget_exhausted = upstream_metrics.budget_exhausted
        self._attempts = retries.attempts
        self._retry_statuses = frozenset(retries.statuses)
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        upstream_metrics.queue_length.set_function(lambda: len(self._waiters))
        upstream_metrics.budget.set_function(self._budget.balance)
        self._in_flight = 0
        metrics.in_flight.set_function(lambda: self._in_flight)
        self._via = f"1.1 {name}"
        # Request ids: a random per-process prefix and a counter, unique without uuid4.
        self._id_prefix = f"{secrets.token_hex(6)}-"
        self._ids = itertools.count(1)
        timeouts, limits = tier.timeouts, tier.limits
        self._first_byte = timeouts.first_byte
        self._idle = timeouts.idle
        self._max_body = limits.max_body_size
        self._max_concurrent = limits.max_concurrent
        self._per_try = timeouts.per_try
        self._per_upstream_limit = limits.max_in_flight_per_upstream
        self._queue_size = limits.queue_size
        self._queue_timeout = timeouts.queue
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client_timeout = aiohttp.ClientTimeout(total=None, connect=tier.timeouts.connect)
        self._access_log: AccessLog | None = None

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    def _new_upstream(self, spec: UpstreamSpec) -> Upstream:
        weight = self.tier.weights.get(spec.name, 1.0)
        upstream = Upstream(spec.name, spec.address, spec.admin, spec.health_path, weight=weight)
        upstream.draining = spec.draining
        return upstream

    def _new_link(self, upstream: Upstream) -> _Link:
        return _Link(upstream, self._upstream_metrics, self._cost_reader(upstream))

    def _new_session(self, address: Address) -> aiohttp.ClientSession:
        """A keep-alive pool to one upstream."""
        # connect bounds waiting for a pooled slot and connecting; the exchange's own
        # watchdog bounds the rest, so aiohttp's read timeout stays off.
        return aiohttp.ClientSession(
            connector=client.connector(
                address,
                keepalive_timeout=self.tier.timeouts.pool_idle,
                limit=self.tier.limits.max_connections_per_upstream,
            ),
            timeout=self._client_timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            trust_env=False,
            requote_redirect_url=False,
        )

    def _cost_reader(self, upstream: Upstream) -> Callable[[], float]:
        """Reads ``upstream``'s routing cost at scrape time (0 for policies without one)."""
        cost = getattr(self._policy, "cost", None)
        if cost is None:
            return lambda: 0.0
        return lambda: float(cost(upstream, time.monotonic()))

    async def start(self) -> None:
        """Open one keep-alive pool per upstream (inside the running loop)."""
        self._loop = asyncio.get_running_loop()
        for link in self._links.values():
            link.session = self._new_session(link.upstream.address)
            if link.upstream.draining:
                link.stop_pooling()
        if self.tier.access_log:
            self._access_log = AccessLog(self.tier.access_log, self.name)
        await self._health.start()
        await self._scraper.start()
        self.state = "ready"

    async def close(self) -> None:
        """Close every pool, once the data plane has drained its in-flight exchanges."""
        self.state = "stopped"
        await self._scraper.close()
        await self._health.close()
        if self._access_log is not None:
            self._access_log.close()
            self._access_log = None
        # Removed upstreams' pools: the data plane has drained, close them now.
        await asyncio.gather(*(cancel(task) for task in list(self._retiring)))
        sessions = [link.session for link in self._links.values() if link.session is not None]
        for link in self._links.values():
            link.session = None
        await asyncio.gather(*(session.close() for session in sessions))

    # -- membership: upstreams that come and go (the admin API's) -----------------------

    def find(self, name: str) -> Upstream | None:
        """The current upstream called ``name``, if any."""
        for upstream in self._upstreams:
            if upstream.name == name:
                return upstream
        return None

    def _get(self, name: str) -> Upstream:
        upstream = self.find(name)
        if upstream is None:
            raise UnknownUpstream(f"no upstream {name}")
        return upstream

    def add_upstream(self, spec: UpstreamSpec) -> Upstream:
        """Route to a new upstream from now on, with slow start.

        It starts healthy, weighted as ``tier.weights`` says (1 by default), with its
        own pool, metric series, health checks and scrapes. ``UpstreamConflict`` if
        one of that name exists; RuntimeError once the forwarder is stopped.
        """
        if self.state == "stopped":
            raise RuntimeError(f"{self.name} is stopped")
        if self.find(spec.name) is not None:
            raise UpstreamConflict(f"upstream {spec.name} already exists")
        upstream = self._new_upstream(spec)
        link = self._new_link(upstream)
        if self._loop is not None:  # started: otherwise start() opens it
            link.session = self._new_session(upstream.address)
        # From here to the end, no await: requests see the old set or the whole new one.
        self._links[upstream] = link
        self._health.add(upstream)  # sets ramp_start: slow start
        self._scraper.add(upstream)
        self._upstreams = (*self._upstreams, upstream)
        self._policy.upstreams = self._upstreams
        self._wake(self._per_upstream_limit)
        log.info(
            "upstream %s added (%s, weight %g); slow start over %g s",
            upstream.name,
            upstream.address,
            upstream.weight,
            self.tier.slow_start,
        )
        return upstream

    def drain(self, name: str) -> Upstream:
        """Send ``name`` no new request; those in flight finish, then its pool empties.

        Its idle keep-alive connections close now, the busy ones as their request
        ends. Draining a draining upstream changes nothing.
        """
        upstream = self._get(name)
        if not upstream.draining:
            upstream.draining = True
            self._health.refresh()
            self._links[upstream].stop_pooling()
            log.info("upstream %s draining (%d in flight)", name, upstream.in_flight)
        return upstream

    def recycle(self, name: str) -> Upstream:
        """New connections to ``name`` from now on; the pooled ones end cleanly.

        For an upstream whose process is being replaced behind the same address: the
        old process stops accepting, so every new connection reaches its successor. The
        old pool closes its idle connections now (we close them, so no request can race
        the close) and each busy one after its response; it is closed once empty.
        """
        upstream = self._get(name)
        link = self._links[upstream]
        old = link.session
        if old is None:
            return upstream
        link.session = self._new_session(upstream.address)
        if upstream.draining:
            link.stop_pooling()
        _stop_pooling(old)
        connector = old.connector
        self._close_when_idle(
            link,
            old,
            lambda: connector is not None and bool(connector._acquired or connector._waiters),
        )
        log.info("upstream %s: new connections from now on", name)
        return upstream

    def undrain(self, name: str) -> Upstream:
        """Route to ``name`` again, with slow start (once it is healthy)."""
        upstream = self._get(name)
        if upstream.draining:
            self._links[upstream].resume_pooling()
            upstream.draining = False
            self._health.refresh()  # back in: ramp_start, slow start
            self._wake(self._per_upstream_limit)
        return upstream

    def remove_upstream(self, name: str) -> Upstream:
        """Forget ``name``, which must be draining (else ``UpstreamConflict``).

        Requests in flight to it are not cut: they finish through its pool, which
        closes once they are over (or after ``retire_timeout``). Its health checks,
        scrapes and metric series stop at once.
        """
        upstream = self._get(name)
        if not upstream.draining:
            raise UpstreamConflict(f"upstream {name} is not draining: drain it first")
        # No await until the set is consistent again.
        self._upstreams = tuple(u for u in self._upstreams if u is not upstream)
        self._policy.upstreams = self._upstreams
        link = self._links.pop(upstream)
        self._health.remove(upstream)
        self._scraper.remove(upstream)
        link.detach()
        log.info("upstream %s removed (%d in flight)", name, upstream.in_flight)
        if link.session is not None:
            self._close_when_idle(link, link.session, lambda: upstream.in_flight > 0)
        return upstream

    def _close_when_idle(
        self, link: _Link, session: aiohttp.ClientSession, busy: Callable[[], bool]
    ) -> None:
        """Close ``link``'s pool ``session`` once ``busy()`` is false, in the background.

        For a removed upstream (its requests in flight) and a recycled pool (its
        requests still on old connections): the requests finish, then the pool closes
        — or after ``retire_timeout``, cutting what is left.
        """

        async def close() -> None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.retire_timeout
            try:
                # Polled: counting down to zero on the hot path would cost every request.
                while busy():
                    if loop.time() >= deadline:
                        log.warning(
                            "upstream %s: requests still on a retired pool %g s on; closing it",
                            link.upstream.name,
                            self.retire_timeout,
                        )
                        break
                    await asyncio.sleep(_RETIRE_POLL)
            finally:
                if link.session is session:  # removed (a recycled link has a new one)
                    link.session = None
                await session.close()

        task = asyncio.create_task(close(), name=f"retire pool of {link.upstream.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    def _wake(self, count: int) -> None:
        """Let up to ``count`` queued requests try again: slots were added."""
        waiters = self._waiters
        while waiters and count > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1

    def status(self) -> dict[str, Any]:
        """The JSON-able view ``GET /status`` serves: the routing decision's every input."""
        return {
            "state": self.state,
            "in_flight": self._in_flight,
            "queued": len(self._waiters),
            "policy": self.tier.policy,
            "panic": self._health.in_panic,
            "retry_budget": round(self._budget.balance(), 2),
            "upstreams": self.upstream_views(),
        }

    def upstream_views(self) -> list[dict[str, Any]]:
        """Every current upstream's view (``GET /upstreams``, ``/status``)."""
        return [self.upstream_view(u) for u in self._upstreams]

    def upstream_view(self, u: Upstream) -> dict[str, Any]:
        """One upstream's JSON-able view: where it is, its gate, its load."""
        cost = getattr(self._policy, "cost", None)
        now = time.monotonic()
        return {
            "name": u.name,
            "address": str(u.address),
            "admin": None if u.admin is None else str(u.admin),
            "weight": u.weight,
            # The weight routing uses now: ramping up from a tenth while in slow start.
            "effective_weight": round(self._policy.effective_weight(u, now), 6),
            "in_flight": u.in_flight,
            "requests": u.requests,
            "errors": u.errors,
            "cost": None if cost is None else round(cost(u, now), 6),
            "latency_ewma": round(u.ewma, 6),
            "reported": {
                "in_flight": u.reported_in_flight,
                "latency": round(u.reported_latency, 6),
                "health": u.reported_health,
                "age": None if u.reported_at < 0 else round(now - u.reported_at, 2),
            },
            **self._health.view(u),
            "available": u.available,
        }

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Forward one request and stream its answer back (the data socket's handler)."""
        loop = self._loop
        if loop is None:  # not started yet, or a handler called outside the loop
            return self._error(request, 503, self._new_id(), "not ready", retry_after=True)
        # Durations come from perf_counter: uvloop's loop.time() has 1 ms resolution,
        # too coarse for sub-millisecond hops and the latency estimate routing uses.
        started = perf_counter()
        metrics = self._metrics
        headers, request_id, problem = self._upstream_headers(request)
        response: web.StreamResponse
        exchange: _Exchange | None = None  # only for requests that go upstream
        if problem:
            response = await self._refuse(request, 400, request_id, problem)
        elif self._max_body and (request.content_length or 0) > self._max_body:
            response = self._error(request, 413, request_id, "request body over the limit")
        elif self._in_flight >= self._max_concurrent:
            response = self._error(
                request, 503, request_id, "too many requests in flight", retry_after=True
            )
        elif self.state != "ready":
            response = self._error(request, 503, request_id, "not ready", retry_after=True)
        else:
            task = asyncio.current_task()
            assert task is not None
            exchange = _Exchange(loop, task)
            self._in_flight += 1
            try:
                response = await self._forward(request, loop, headers, request_id, exchange)
            finally:
                self._in_flight -= 1
                exchange.close()
        elapsed = perf_counter() - started
        if self._access_log is not None:
            link = None if exchange is None else exchange.link
            self._access_log.write(
                request_id,
                request.method,
                request.raw_path,
                response.status,
                "" if link is None else link.upstream.name,
                0 if exchange is None else exchange.attempts,
                elapsed,
            )
        metrics.count(response.status)
        metrics.latency.observe(elapsed)
        return response

    def _new_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids)}"

    def _upstream_headers(self, request: web.BaseRequest) -> tuple[list[tuple[str, str]], str, str]:
        """The headers to send upstream, the request id, and a problem (400) or "".

        One pass over the request's headers into a plain list; each try builds its
        ``CIMultiDict`` from it in one go. Host goes first, the last one sent winning,
        as aiohttp's client would send it.
        """
        headers: list[tuple[str, str]] = []
        add = headers.append
        host: tuple[str, str] | None = None
        connection = forwarded_for = via = request_id = problem = ""
        forwarded_proto = "http" if self.edge else ""
        special = _REQUEST_SPECIAL
        for name, value in request.headers.items():
            kind = special.get(name.lower())
            if kind is None:
                add((name, value))
            elif kind == _HOST:
                host = (name, value)
            elif kind == _XFF:
                forwarded_for = f"{forwarded_for}, {value}" if forwarded_for else value
            elif kind == _VIA:
                via = f"{via}, {value}" if via else value
            elif kind == _REQUEST_ID:
                request_id = request_id or value
            elif kind == _XFP:
                if not self.edge:
                    forwarded_proto = value
            elif kind == _CONNECTION:
                connection = f"{connection},{value}"
            elif kind == _TRANSFER_ENCODING and request.version < HttpVersion11:
                # RFC 9112 6.1: framing an HTTP/1.0 server can't trust; aiohttp accepts it.
                problem = "Transfer-Encoding in an HTTP/1.0 request"
            elif kind == _EXPECT and value.lower() != "100-continue":
                add((name, value))
        if connection:
            named = {token for t in connection.split(",") if (token := t.strip().lower())}
            headers = [pair for pair in headers if pair[0].lower() not in named]
            if host is not None and "host" in named:
                host = None
        if host is not None:
            headers.insert(0, host)
        client = request.remote or "unix"  # a unix socket's peer has no address
        headers.append(
            ("X-Forwarded-For", f"{forwarded_for}, {client}" if forwarded_for else client)
        )
        if forwarded_proto:
            headers.append(("X-Forwarded-Proto", forwarded_proto))
        headers.append(("Via", f"{via}, {self._via}" if via else self._via))
        request_id = request_id or self._new_id()
        headers.append(("X-Request-Id", request_id))
        return headers, request_id, problem

    async def _forward(
        self,
        request: web.BaseRequest,
        loop: asyncio.AbstractEventLoop,
        headers: list[tuple[str, str]],
        request_id: str,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        target = request.raw_path
        if not target.startswith("/"):
            # Absolute form (RFC 9112 3.2.2) goes upstream in origin form; nothing else
            # (authority form, asterisk form) is forwarded.
            url = URL(target, encoded=True)
            if not url.absolute or not url.raw_path.startswith("/"):
                return self._error(request, 400, request_id, "unsupported request target")
            target = url.raw_path_qs
        upstream_response = await self._open(request, loop, headers, request_id, target, exchange)
        if isinstance(upstream_response, web.StreamResponse):
            return upstream_response
        return await self._relay(request, loop, upstream_response, request_id, exchange)

    async def _open(
        self,
        request: web.BaseRequest,
        loop: asyncio.AbstractEventLoop,
        headers: list[tuple[str, str]],
        request_id: str,
        target: str,
        exchange: _Exchange,
    ) -> aiohttp.ClientResponse | web.Response:
        """Send the request upstream until one answers with headers, retrying when safe.

        Safe means: the request never reached the upstream (connect failure: tried on
        the next one, up to ``retries.attempts`` tries), or it can be sent again
        (idempotent or bodiless, and no byte of the client's body consumed) and nothing
        was answered yet — a lost connection, a per-try timeout, or an answer in
        ``retries.statuses``. Those retries draw on the retry budget, so they can't
        multiply an outage. Returns the upstream's response, or the error to answer with.
        """
        method = request.method
        has_body = request.body_exists
        idempotent = method in IDEMPOTENT_METHODS
        replayable = idempotent or not has_body
        per_try = self._per_try if idempotent and not has_body else 0.0
        first_byte = min(self._first_byte, per_try) if per_try else self._first_byte
        expect_continue = (
            has_body
            and request.version == HttpVersion11
            and request.headers.get("Expect", "").lower() == "100-continue"
        )
        self._budget.deposit()
        tried: tuple[Upstream, ...] = ()
        raced = False
        picked = self._pick(tried)
        if not isinstance(picked, Upstream):  # none available, or all at their limit
            picked = await self._acquire(loop, tried)
        if isinstance(picked, str):
            return self._error(request, 503, request_id, picked, retry_after=True)
        upstream = picked
        while True:
            link = self._links[upstream]
            exchange.link = link
            body = self._body(request, exchange, expect_continue) if has_body else None
            sent = perf_counter()
            # Without a body the request is sent at once: only the first byte is awaited.
            # With one, the body writer moves the deadline chunk by chunk.
            exchange.arm(loop.time() + (first_byte if body is None else self._idle), _WAIT_HEADERS)
            upstream.in_flight += 1
            upstream.requests += 1
            exchange.attempts += 1
            charged = True  # does a retry after this try draw on the budget?
            try:
                try:
                    response = await self._send(
                        link, loop, method, URL(link.base + target, encoded=True), headers, body
                    )
                except BaseException:
                    self._release(upstream)
                    raise
            except asyncio.CancelledError:
                failure = exchange.absorb()
                if not failure:
                    self._client_gone(request, request_id, "waiting for the upstream")
                    raise
                if not (failure == 504 and per_try and exchange.phase == _WAIT_HEADERS):
                    if failure == 504:  # the upstream's fault (counted just below)
                        self._failed(link, loop, "")
                    return await self._fail_before_response(
                        request, request_id, failure, link, exchange
                    )
                # The per-try timeout: give up on this upstream, try another.
                self._failed(link, loop, "timeout")
                log.info("%s: no answer within the per-try timeout", upstream.name)
                status, problem = 504, "upstream timed out"
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # The request never reached this upstream: another one may take it, and
                # that costs nobody anything, so it is not charged to the budget.
                log.info("%s: cannot connect (%s)", upstream.name, exc)
                charged = False
                if isinstance(exc, aiohttp.ConnectionTimeoutError):
                    self._failed(link, loop, "timeout")
                    status, problem = 504, "upstream connect timeout"
                else:
                    self._failed(link, loop, "connect")
                    status, problem = 502, "upstream refused the connection"
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # Closed before any response byte: most often the keep-alive race, a
                # pooled connection the upstream closed as we reused it.
                self._failed(link, loop, "reset")
                log.info("%s: connection lost before the response (%r)", upstream.name, exc)
                status, problem = 502, "upstream closed the connection"
                if not replayable or exchange.body_started:
                    return self._error(request, status, request_id, problem)
                if not idempotent and not raced:
                    # aiohttp already retried idempotent methods once on a fresh
                    # connection; do the same for the others, then move on.
                    raced = True
                    link.retries.inc()
                    continue
            except aiohttp.ClientError as exc:
                self._failed(link, loop, "protocol")
                log.info("%s: bad response (%r)", upstream.name, exc)
                return self._error(request, 502, request_id, "invalid upstream response")
            else:
                latency = perf_counter() - sent
                code = response.status
                self._policy.observe(upstream, latency, loop.time())
                link.latency.observe(latency)
                link.count(code)
                if code < 500:
                    self._health.success(upstream)
                    return response
                self._health.failure(upstream)
                if not (code in self._retry_statuses and replayable and not exchange.body_started):
                    return response
                nxt = self._next(upstream, (*tried, upstream), charged=True)
                if nxt is None:
                    return response
                # Answered with a retryable error: let another upstream answer instead.
                log.info("%s answered %d; retrying %s elsewhere", upstream.name, code, request_id)
                response.release()
                self._release(upstream)
                link.retries.inc()
                tried, upstream = (*tried, upstream), nxt
                continue
            tried = (*tried, upstream)
            if not replayable and charged:
                return self._error(request, status, request_id, problem)
            nxt = self._next(upstream, tried, charged=charged)
            if nxt is None:
                return self._error(request, status, request_id, problem)
            link.retries.inc()
            upstream = nxt

    async def _send(
        self,
        link: _Link,
        loop: asyncio.AbstractEventLoop,
        method: str,
        url: URL,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> ClientResponse:
        """One try through ``link``'s pool: what ``ClientSession.request`` does for us.

        The session's general path (cookies, auth, proxies, redirects, traces, a total
        timeout, its header merging) costs more than the rest of a hop; this is its
        core, the same calls in the same order. Like aiohttp, a pooled connection lost
        before the answer is retried once on another connection for an idempotent
        method whose body was not consumed, as the keep-alive race needs.
        """
        session = link.session
        assert session is not None
        connector = session.connector
        assert connector is not None
        data: Any = body
        retry = method in IDEMPOTENT_METHODS
        while True:
            request = _UpstreamRequest(
                method,
                url,
                headers=CIMultiDict(headers),
                data=data,
                loop=loop,
                timer=_NO_TIMER,
                session=session,
                traces=_NO_TRACES,
            )
            try:
                try:
                    conn = await connector.connect(
                        request, traces=_NO_TRACES, timeout=self._client_timeout
                    )
                except TimeoutError as exc:
                    raise aiohttp.ConnectionTimeoutError(
                        f"Connection timeout to host {url}"
                    ) from exc
                protocol = conn.protocol
                assert protocol is not None
                protocol.set_response_params(
                    timer=_NO_TIMER,
                    skip_payload=method in _NO_BODY_METHODS,
                    read_until_eof=True,
                    auto_decompress=False,
                    read_timeout=None,
                    read_bufsize=_READ_BUFSIZE,
                    timeout_ceil_threshold=connector._timeout_ceil_threshold,
                    max_line_size=_MAX_LINE_SIZE,
                    max_field_size=_MAX_LINE_SIZE,
                    max_headers=_MAX_HEADERS,
                )
                try:
                    response = await request.send(conn)
                    try:
                        await response.start(conn)
                    except BaseException:
                        response.close()
                        raise
                except BaseException:
                    conn.close()
                    raise
            except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError):
                raise
            except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
                if not retry:
                    raise
                retry = False
                if data is not None:
                    await request.close()
                    if request._body is not None and request._body.consumed:
                        raise
                    data = request._body
                continue
            except aiohttp.ClientError:
                raise
            except OSError as exc:
                if exc.errno is None and isinstance(exc, TimeoutError):
                    raise
                raise aiohttp.ClientOSError(*exc.args) from exc
            if request._body is not None:
                await request._body.close()
            return response

    def _next(
        self, failed: Upstream, tried: tuple[Upstream, ...], *, charged: bool
    ) -> Upstream | None:
        """Where a retry goes, or None: out of tries, of upstreams, or of budget."""
        if len(tried) >= self._attempts:
            return None
        nxt = self._pick(tried)
        if not isinstance(nxt, Upstream):  # none left, or all at their limit
            return None
        if charged and not self._budget.try_withdraw():
            self._budget_exhausted.inc()
            log.info("retry budget exhausted; not retrying after %s", failed.name)
            return None
        return nxt

    def _failed(self, link: _Link, loop: asyncio.AbstractEventLoop, kind: str) -> None:
        """A try failed: count it, penalise the upstream, tell the health monitor."""
        if kind:
            link.error(kind)
        self._policy.observe_failure(link.upstream, loop.time())
        self._health.failure(link.upstream)

    def _pick(self, exclude: tuple[Upstream, ...]) -> Upstream | object | None:
        """The policy's pick among upstreams with a free slot; ``_FULL`` when all are full."""
        upstream = self._policy.pick(exclude)
        limit = self._per_upstream_limit
        if upstream is None or not limit or upstream.in_flight < limit:
            return upstream
        full = set(exclude)
        while upstream is not None and upstream.in_flight >= limit:
            full.add(upstream)
            upstream = self._policy.pick(full)
        return _FULL if upstream is None else upstream

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, exclude: tuple[Upstream, ...]
    ) -> Upstream | str:
        """An upstream with a free slot, waiting in the queue if all are full; or why not."""
        picked = self._pick(exclude)
        if picked is None:
            return "no upstream available"
        if picked is not _FULL:
            assert isinstance(picked, Upstream)
            return picked
        if len(self._waiters) >= self._queue_size:
            return "every upstream is at its limit and the queue is full"
        deadline = loop.time() + self._queue_timeout
        while picked is _FULL:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "no upstream slot freed up in time"
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return "no upstream slot freed up in time"
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            picked = self._pick(exclude)
        if picked is None:
            return "no upstream available"
        assert isinstance(picked, Upstream)
        return picked

    def _release(self, upstream: Upstream) -> None:
        """A request to ``upstream`` is over: free its slot for the first waiter."""
        upstream.in_flight -= 1
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _fail_before_response(
        self,
        request: web.BaseRequest,
        request_id: str,
        failure: int,
        link: _Link,
        exchange: _Exchange,
    ) -> web.Response:
        """The answer for an exchange that failed before any response header was sent."""
        if failure == _CLIENT_GONE:
            self._client_gone(request, request_id, "sending its body")
            return web.Response(status=_CLIENT_GONE)  # never reaches anyone
        if failure == 504:
            link.error("timeout")
            waited = "headers" if exchange.phase == _WAIT_HEADERS else "it to read the body"
            log.info("%s: timed out waiting for %s", link.upstream.name, waited)
            return self._error(request, 504, request_id, "upstream timed out")
        if failure == 413:
            return self._error(request, 413, request_id, "request body over the limit")
        problem = "request body too slow" if failure == 408 else "malformed request body"
        return await self._refuse(request, failure, request_id, problem)

    async def _body(
        self, request: web.BaseRequest, exchange: _Exchange, expect_continue: bool
    ) -> AsyncIterator[bytes]:
        """The client's request body, chunk by chunk as it arrives, within the limits.

        A failure (client gone, malformed, too slow, too large) fails the exchange
        and raises, so aiohttp drops the upstream connection without ending the body.
        """
        assert self._loop is not None
        time = self._loop.time
        idle = self._idle
        limit = self._max_body
        content = request.content
        received = 0
        # From here the client's body is being consumed: this request can't be replayed.
        exchange.body_started = True
        while True:
            exchange.phase = _READ_CLIENT
            try:
                if expect_continue:
                    # The client waits for this before sending its body: say it here,
                    # once connected upstream, instead of relaying the upstream's.
                    expect_continue = False
                    await request.writer.write(_CONTINUE)
                chunk = await content.readany()
            except ConnectionError as exc:
                exchange.fail(_CLIENT_GONE)
                raise _BodyAborted("client went away") from exc
            except BadHttpMessage as exc:
                log.info("malformed request body: %s", exc.message)
                exchange.fail(400)
                raise _BodyAborted("malformed request body") from exc
            if not chunk:
                break
            received += len(chunk)
            if limit and received > limit:
                exchange.fail(413)
                raise _BodyAborted("request body over the limit")
            exchange.phase = _WRITE_UPSTREAM
            exchange.deadline = time() + idle
            yield chunk
            exchange.deadline = time() + idle
        if not exchange.responding:
            exchange.arm(time() + self._first_byte, _WAIT_HEADERS)

    async def _relay(
        self,
        request: web.BaseRequest,
        loop: asyncio.AbstractEventLoop,
        upstream_response: aiohttp.ClientResponse,
        request_id: str,
        exchange: _Exchange,
    ) -> web.StreamResponse:
        """Stream the upstream's response to the client; abort both on a failure."""
        link = exchange.link
        assert link is not None
        upstream = link.upstream
        headers = self._response_headers(upstream_response, request_id, upstream)
        content = upstream_response.content
        if content.is_eof():
            # The whole body came with the headers, as small responses do: answer with
            # one write of headers and body instead of streaming.
            body = content.read_nowait()
            self._release(upstream)
            upstream_response.release()
            return web.Response(
                status=upstream_response.status,
                reason=upstream_response.reason,
                headers=headers,
                body=body,
            )
        time = loop.time
        idle = self._idle
        response = web.StreamResponse(
            status=upstream_response.status, reason=upstream_response.reason, headers=headers
        )
        exchange.responding = True
        exchange.arm(time() + idle, _WRITE_CLIENT)
        try:
            await response.prepare(request)
            while True:
                exchange.phase = _READ_UPSTREAM
                exchange.deadline = time() + idle
                chunk = await content.readany()
                if not chunk:
                    break
                exchange.phase = _WRITE_CLIENT
                exchange.deadline = time() + idle
                await response.write(chunk)
            exchange.phase = _WRITE_CLIENT
            await response.write_eof()
        except asyncio.CancelledError:
            failure = exchange.absorb()
            upstream_response.close()
            if not failure:
                self._client_gone(request, request_id, "receiving the response")
                raise
            if failure == _CLIENT_GONE:
                self._client_gone(request, request_id, "receiving the response")
            elif exchange.phase in _UPSTREAM_PHASES:
                link.error("timeout")
                log.info("%s: response stalled; aborted %s", upstream.name, request_id)
            else:
                log.info(
                    "%s: aborted mid-response, the client side failed (%d)", request_id, failure
                )
            self._abort(request, response)
        except Exception as exc:
            upstream_response.close()
            if exchange.phase == _WRITE_CLIENT and isinstance(exc, ConnectionError):
                self._client_gone(request, request_id, "receiving the response")
            else:
                link.error("protocol" if isinstance(exc, aiohttp.ClientPayloadError) else "reset")
                log.info("%s: response broken off (%r); aborted %s", upstream.name, exc, request_id)
                self._abort(request, response)
        finally:
            self._release(upstream)
            upstream_response.release()
        return response

    def _response_headers(
        self, upstream_response: aiohttp.ClientResponse, request_id: str, upstream: Upstream
    ) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection = ""
        for name, value in upstream_response.headers.items():
            lower = name.lower()
            if lower not in HOP_BY_HOP:
                headers.add(name, value)
            elif lower == "connection":
                connection = f"{connection},{value}"
        if connection:
            for token in connection.split(","):
                if token := token.strip():
                    headers.popall(token, None)
        headers["X-Request-Id"] = request_id
        if not self.edge:
            headers["X-Served-By"] = upstream.name
        return headers

    def _abort(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        """Break off a response already under way, so the client sees it incomplete."""
        response.force_close()
        transport = request.transport
        if transport is not None:
            # abort, not close: a stalled client would keep a closing transport forever.
            transport.abort()

    def _client_gone(self, request: web.BaseRequest, request_id: str, doing: str) -> None:
        """Count a client that went away.

        A cancellation while the client is still connected is the server shutting down.
        """
        if request.transport is None:
            self._metrics.client_disconnects.inc()
            log.debug("client went away while %s (%s)", doing, request_id)
        else:
            log.debug("cancelled while %s (%s)", doing, request_id)

    async def _refuse(
        self, request: web.BaseRequest, status: int, request_id: str, problem: str
    ) -> web.Response:
        """Answer a client whose body won't be read (malformed or stalled), then hang up.

        Left to aiohttp, the connection would linger up to 10 s draining a body that
        can't be trusted or isn't coming. Other errors keep that lingering, so a client
        still sending can read its answer.
        """
        response = self._error(request, status, request_id, problem)
        with contextlib.suppress(ConnectionError):
            await response.prepare(request)
            await response.write_eof()
        request.protocol.force_close()  # after the answer is flushed
        return response

    def _error(
        self,
        request: web.BaseRequest,
        status: int,
        request_id: str,
        problem: str,
        *,
        retry_after: bool = False,
    ) -> web.Response:
        """A short plain-text error of the stack's own."""
        headers: CIMultiDict[str] = CIMultiDict(
            {"Content-Type": "text/plain; charset=utf-8", "X-Request-Id": request_id}
        )
        if retry_after:
            headers["Retry-After"] = "1"
        response = web.Response(
            status=status,
            body=f"{status} {_REASONS[status]}: {problem}\n".encode(),
            headers=headers,
        )
        if status in (400, 408, 413) or not request.content.is_eof():
            # The rest of the body is not worth reading; the connection can't be reused.
            response.force_close()
        return response


class UnknownUpstream(LookupError):
    """No current upstream has that name (404)."""


class UpstreamConflict(Exception):
    """The change conflicts with the upstream's state: it exists, or isn't draining (409)."""


# The admin app's handle on its forwarder, for routes that act on it.
FORWARDER: Final = web.AppKey("forwarder", Forwarder)
