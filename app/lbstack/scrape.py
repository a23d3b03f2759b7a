"""Metrics feedback: what each upstream says of its own load, folded into routing.

A ``Scraper`` reads every upstream's ``/metrics`` from its admin socket each
``tier.scrape_interval`` and sets the ``Upstream.reported_*`` fields the routing
policies weigh: requests in flight (queued ones included), mean latency over the last interval,
and, for an upstream that routes itself, the share of its own upstreams that are in.
Figures are stamped with ``reported_at``; a failed scrape leaves the stamp alone so
the policy can let stale figures age out. Upstreams come and go at runtime (``add``,
``remove``); each round scrapes the set of the moment.

A scrape costs both sides: a router with 64 upstreams makes 64 requests a second, and
each upstream renders its exposition. So each round spreads its scrapes evenly over
the interval (jittered, never 64 at once), and each asks only for the series read here
(``/metrics?name[]=...``, the filter Prometheus' own client library serves), which an
upstream renders in a fraction of the time of its whole exposition. And a router makes
at most ``tier.scrape_max_rate`` scrapes a second: with more upstreams the round
stretches (``interval``), so the cost stays bounded however wide the group grows.

An admin API reached over TCP (an upstream on another host) gets the stack's admin
token with every scrape (``token``); one on a unix socket needs none.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from random import Random
from typing import Final
from urllib.parse import urlencode

import aiohttp
from prometheus_client import Counter

from lbstack import client
from lbstack.admin import bearer
from lbstack.client import cancel
from lbstack.config import TierConfig
from lbstack.log import get_logger
from lbstack.metrics import RouterMetrics, parse
from lbstack.routing.upstream import Upstream

log = get_logger("scrape")

METRICS_PATH = "/metrics"
# A figure is worth little once the next one is due, but a tiny interval must not make
# every scrape of a busy upstream time out.
MIN_TIMEOUT = 0.25
MAX_TIMEOUT = 1.0
JITTER = (0.9, 1.1)

IN_FLIGHT = "lbstack_in_flight_requests"
QUEUE = "lbstack_queue_length"
DURATION_SUM = "lbstack_request_duration_seconds_sum"
DURATION_COUNT = "lbstack_request_duration_seconds_count"
UPSTREAM_HEALTHY = "lbstack_upstream_healthy"
_NAMES: Final = (IN_FLIGHT, QUEUE, DURATION_SUM, DURATION_COUNT, UPSTREAM_HEALTHY)
# The sample lines Report.parse reads: each name followed by its labels or its value.
_WANTED: Final = tuple(f"{name}{after}" for name in _NAMES for after in ("{", " "))
# What a scrape asks for: only those series. An upstream that ignores the filter sends
# its whole exposition, which Report.parse reads just as well.
SCRAPE_PATH: Final = f"{METRICS_PATH}?{urlencode([('name[]', name) for name in _NAMES])}"


@dataclass(slots=True)
class Report:
    """The figures one scrape of an upstream's ``/metrics`` yields."""

    in_flight: float = 0.0
    queue: float = 0.0  # requests waiting for a free upstream (routers only)
    duration_sum: float | None = None  # None: the upstream has no latency histogram
    duration_count: float | None = None
    health: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Report:
        """The figures in a Prometheus text exposition; ValueError if it isn't one.

        Only the samples of the series read here go through the Prometheus parser:
        an upstream's exposition is mostly histogram buckets of no interest, and
        parsing all of it every scrape cost more than a thousand forwarded requests.
        A text without any of them is parsed whole, so that garbage is still refused.
        """
        report = cls()
        healthy = upstreams = 0.0
        wanted = "\n".join(line for line in text.splitlines() if line.startswith(_WANTED))
        for name, _labels, value in parse(f"{wanted}\n" if wanted else text):
            if name == IN_FLIGHT:
                report.in_flight += value
            elif name == QUEUE:
                report.queue += value
            elif name == DURATION_SUM:
                report.duration_sum = (report.duration_sum or 0.0) + value
            elif name == DURATION_COUNT:
                report.duration_count = (report.duration_count or 0.0) + value
            elif name == UPSTREAM_HEALTHY:
                healthy += value
                upstreams += 1
        if upstreams:
            report.health = healthy / upstreams
        return report


@dataclass(slots=True)
class _Memory:
    """What the scraper keeps of one upstream between two scrapes."""

    errors: Counter
    duration_sum: float = math.nan
    duration_count: float = math.nan
    latency: float = 0.0  # mean over the last interval that saw requests
    latency_at: float = -math.inf  # when that interval ended
    failing: bool = False  # the last scrape failed (to log failures once, not each time)


class Scraper:
    """Reads the load every upstream with an admin address reports, in the background."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        tier: TierConfig,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        rng: Random | None = None,
        token: str | None = None,
    ) -> None:
        self._upstreams = tuple(u for u in upstreams if u.admin is not None)
        self._credentials = bearer(token)
        self._interval = tier.scrape_interval
        self._max_rate = tier.scrape_max_rate
        self._timeout = min(max(self._interval, MIN_TIMEOUT), MAX_TIMEOUT)
        self._pool_idle = tier.timeouts.pool_idle
        # An idle upstream's latency figure fades with the same time constant as the
        # router's own latency estimate, so it gets tried again rather than shunned.
        self._decay = tier.decay
        self._clock = clock
        self._rng = rng or Random()
        self._metrics = metrics
        self._memory = {u: self._new_memory(u) for u in self._upstreams}
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}
        self._task: asyncio.Task[None] | None = None
        # Scrapes the background loop started and that haven't finished, by upstream.
        self._scraping: dict[Upstream, asyncio.Task[bool]] = {}
        self._started = False
        self._closed = False
        # Sessions of removed upstreams, being closed.
        self._retiring: set[asyncio.Task[None]] = set()

    def _new_memory(self, upstream: Upstream) -> _Memory:
        metrics = self._metrics
        return _Memory(errors=metrics.scrape_errors.labels(*metrics.labels(upstream.name)))

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        """The upstreams scraped: those with an admin address."""
        return self._upstreams

    async def start(self) -> None:
        """Start scraping in the background, unless the interval is 0."""
        self._started = True
        self._start_task()

    def _start_task(self) -> None:
        running = self._task is not None or self._closed
        if self._started and not running and self._interval > 0 and self._upstreams:
            self._task = asyncio.create_task(self._run(), name="metrics-scraper")

    async def close(self) -> None:
        """Stop scraping and close the sessions."""
        self._closed = True
        task, self._task = self._task, None
        await cancel(task)
        scraping = list(self._scraping.values())
        self._scraping.clear()
        await asyncio.gather(*(cancel(t) for t in scraping))
        await asyncio.gather(*self._retiring)
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(session.close() for session in sessions))

    # -- membership ----------------------------------------------------------------------

    def add(self, upstream: Upstream) -> None:
        """Scrape ``upstream`` too from the next round (if it has an admin address)."""
        if upstream.admin is None:
            return
        if upstream in self._memory:
            raise ValueError(f"upstream {upstream.name} is already scraped")
        self._memory[upstream] = self._new_memory(upstream)
        self._upstreams = (*self._upstreams, upstream)
        self._start_task()

    def remove(self, upstream: Upstream) -> None:
        """Stop scraping ``upstream``: its series goes, its session closes in the background.

        A scrape of it under way when it goes is dropped, neither applied nor counted.
        """
        if self._memory.pop(upstream, None) is None:
            return
        self._upstreams = tuple(u for u in self._upstreams if u is not upstream)
        self._metrics.scrape_errors.remove(*self._metrics.labels(upstream.name))
        session = self._sessions.pop(upstream, None)
        if session is not None:
            retiring = asyncio.create_task(session.close())
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    @property
    def interval(self) -> float:
        """Seconds between two scrapes of one upstream now: ``scrape_interval``, or longer
        when the upstreams are more than ``scrape_max_rate`` allows at that pace."""
        if self._max_rate <= 0:
            return self._interval
        return max(self._interval, len(self._upstreams) / self._max_rate)

    @property
    def running(self) -> bool:
        """Whether the background scrape loop is on."""
        return self._task is not None and not self._task.done()

    async def scrape_once(self) -> None:
        """Scrape every upstream once, concurrently."""
        await asyncio.gather(*(self.scrape(u) for u in self._upstreams))  # this round's set

    async def scrape(self, upstream: Upstream) -> bool:
        """Scrape one upstream and apply its figures; False (and counted) on failure.

        Never raises but for cancellation: a scrape must not take the loop down.
        """
        if self._closed:
            raise RuntimeError("the scraper is closed")
        memory = self._memory.get(upstream)
        if memory is None:
            return False  # removed before its turn in this round came
        try:
            report = Report.parse(await self._fetch(upstream))
        except _ScrapeError as exc:
            problem = str(exc)
        except TimeoutError:
            problem = f"timed out after {self._timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            problem = f"{exc or type(exc).__name__}"
        except ValueError as exc:  # not a Prometheus exposition (or not UTF-8)
            problem = f"unreadable metrics: {exc}"
        except Exception as exc:  # a bug: say so loudly, but keep scraping
            log.exception("scraping %s crashed", upstream.name)
            problem = repr(exc)
        else:
            if self._memory.get(upstream) is not memory:
                return False  # removed meanwhile
            self.apply(upstream, report)
            if memory.failing:
                memory.failing = False
                log.info("scraping %s works again", upstream.name)
            return True
        if self._memory.get(upstream) is not memory:
            return False  # removed meanwhile: its session was closed under the scrape
        memory.errors.inc()
        if not memory.failing:
            memory.failing = True
            log.warning("cannot scrape %s (%s); its reported load ages out", upstream.name, problem)
        return False

    async def _fetch(self, upstream: Upstream) -> str:
        """The text of ``upstream``'s /metrics; _ScrapeError if it doesn't answer 200."""
        assert upstream.admin is not None  # only upstreams with an admin are scraped
        headers = None if upstream.admin.is_unix else self._credentials
        async with self._session(upstream).get(SCRAPE_PATH, headers=headers) as response:
            if response.status != 200:
                raise _ScrapeError(f"{METRICS_PATH} answered {response.status}")
            return await response.text()

    def apply(self, upstream: Upstream, report: Report) -> None:
        """Set ``upstream``'s reported figures from one scrape, stamped now."""
        now = self._clock()
        memory = self._memory[upstream]
        # Not in_flight + queue: a router counts a request in flight from its arrival,
        # so its queued requests are already in lbstack_in_flight_requests.
        upstream.reported_in_flight = report.in_flight
        upstream.reported_health = report.health
        total, count = report.duration_sum, report.duration_count
        if total is not None and count is not None:
            if (
                math.isnan(memory.duration_count)
                or count < memory.duration_count
                or total < memory.duration_sum
            ):
                # The first scrape, or the upstream restarted (its counters went back):
                # the mean since it started is the best guess until the next scrape.
                new_count, new_total = count, total
            else:
                new_count = count - memory.duration_count
                new_total = total - memory.duration_sum
            memory.duration_count, memory.duration_sum = count, total
            if new_count > 0:
                memory.latency = new_total / new_count
                memory.latency_at = now
        upstream.reported_latency = memory.latency * self._fade(now - memory.latency_at)
        upstream.reported_at = now

    def _fade(self, age: float) -> float:
        """How much of a latency figure ``age`` seconds old is still believed."""
        if age <= 0 or self._decay <= 0:
            return 1.0
        return math.exp(-age / self._decay)

    async def _run(self) -> None:
        """Each round, one scrape per upstream, spaced evenly over the interval.

        A scrape runs on its own, so a slow upstream delays nobody else's; one still
        under way when its upstream's turn comes again is left to finish instead.
        """
        while True:
            upstreams = self._upstreams
            gap = self.interval / max(len(upstreams), 1)
            for upstream in upstreams:
                if upstream in self._memory and upstream not in self._scraping:
                    self._scraping[upstream] = task = asyncio.create_task(
                        self.scrape(upstream), name=f"metrics-scrape {upstream.name}"
                    )
                    task.add_done_callback(partial(self._scraped, upstream))
                await asyncio.sleep(gap * self._rng.uniform(*JITTER))
            if not upstreams:
                await asyncio.sleep(self._interval)

    def _scraped(self, upstream: Upstream, task: asyncio.Task[bool]) -> None:
        if self._scraping.get(upstream) is task:
            del self._scraping[upstream]

    def _session(self, upstream: Upstream) -> aiohttp.ClientSession:
        """The one session ``upstream``'s admin is scraped through, opened on first use."""
        session = self._sessions.get(upstream)
        if session is None:
            address = upstream.admin
            assert address is not None  # only upstreams with an admin are scraped
            # One pooled keep-alive connection: a scrape every interval reuses it.
            session = self._sessions[upstream] = client.session(
                address, self._timeout, limit=1, keepalive_timeout=self._pool_idle
            )
        return session


class _ScrapeError(Exception):
    """An upstream answered its /metrics with something other than 200."""


__all__ = ["Report", "Scraper"]
