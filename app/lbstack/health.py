"""Which upstreams may take traffic: active health checks, passive ejection, panic mode.

A ``HealthMonitor`` owns the routing gate of a router's upstreams (``Upstream.available``
and the fields behind it). Three inputs decide it:

* **active checks**: every ``tier.health.interval`` each upstream is probed (``GET
  /readyz`` on its admin socket, else its ``health_path`` on the data socket), with
  rise/fall hysteresis on ``Upstream.healthy``. Live traffic is evidence too: a healthy
  upstream whose requests all succeeded since its last check is not probed again until
  ``tier.health.traffic_interval`` has passed, so a busy router with many upstreams
  doesn't pay a fresh connection per upstream per interval to learn what its requests
  already told it. Idle, failing, ejected and unhealthy upstreams are probed every
  interval;
* **passive ejection**: the forwarder reports every try with ``success``/``failure``;
  ``tier.ejection.consecutive_failures`` failures in a row eject the upstream for an
  exponentially growing time, after which it comes back with slow start;
* **panic mode**: when fewer than ``tier.ejection.panic_threshold`` of the upstreams
  would be in, health is ignored and every upstream that isn't draining takes traffic
  (Envoy's panic threshold), since a struggling upstream beats none at all.

The decision logic (``record_check``, ``success``, ``failure``, ``refresh``) is
synchronous and reads time only from the injected clock, so it can be driven without
real time; ``start`` adds the background check loops and the re-admission timer.

Upstreams come and go at runtime (``add``, ``remove``): each has its own check loop,
session and metric series, started and stopped with it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any

import aiohttp
from prometheus_client import Counter

from lbstack import client
from lbstack.address import Address
from lbstack.admin import DRAINING_HEADER
from lbstack.client import cancel
from lbstack.config import TierConfig
from lbstack.log import get_logger
from lbstack.metrics import RouterMetrics
from lbstack.routing.upstream import Upstream
from lbstack.tls import upstream_context

log = get_logger("health")

READY_PATH = "/readyz"
# Each wait between two checks of one upstream is the interval times a factor in this
# range, so checks started together drift apart instead of firing in lockstep.
JITTER = (0.9, 1.1)
# Beyond this many ejections in a row the doubling is capped anyway; it keeps 2**n finite.
_MAX_DOUBLINGS = 60


@dataclass(slots=True)
class _Track:
    """What the monitor remembers of one upstream beyond the fields routing reads."""

    ejections_total: Counter
    passes: int = 0  # active checks passed in a row
    fails: int = 0  # active checks failed in a row
    problem: str = ""  # what the last failed check saw
    ejected_why: str = ""
    readmitted_at: float = -math.inf  # end of the last ejection, for the streak reset
    was_in: bool = True  # in (panic aside) at the last refresh, to log transitions
    was_draining: bool = False
    back_why: str = ""  # why it may be coming back, logged by the next refresh
    served: bool = False  # a request to it succeeded since the last check was due
    checked_at: float = -math.inf  # when the last active check was made
    skipped: int = 0  # checks traffic made unnecessary


class HealthMonitor:
    """Decides, for one router, which of its upstreams policies may pick.

    The forwarder calls ``success(upstream)`` or ``failure(upstream)`` after every try
    (failure: connect error, reset, timeout or a 5xx answer); whoever changes
    ``Upstream.draining`` calls ``refresh()``. Everything else runs by itself between
    ``start()`` and ``close()``; ``add`` and ``remove`` change the set at any time.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        tier: TierConfig,
        metrics: RouterMetrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        rng: Random | None = None,
    ) -> None:
        self._upstreams = tuple(upstreams)
        self._health = tier.health
        self._tls = tier.upstream_tls
        self._ejection = tier.ejection
        self._slow_start = tier.slow_start
        self._clock = clock
        self._rng = rng or Random()
        self._metrics = metrics
        self._panic_gauge = metrics.panic
        self._tracks = {u: self._new_track(u) for u in self._upstreams}
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checks: dict[Upstream, asyncio.Task[None]] = {}
        # Check loops and sessions of removed upstreams, being stopped and closed.
        self._retiring: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self.in_panic = False
        self.refresh()

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    def _new_track(self, upstream: Upstream) -> _Track:
        metrics = self._metrics
        return _Track(
            ejections_total=metrics.ejections.labels(*metrics.labels(upstream.name)),
            was_in=self._is_in(upstream, self._clock()),
            was_draining=upstream.draining,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the active checks (unless the interval is 0) and the re-admission timer."""
        self._loop = asyncio.get_running_loop()
        for upstream in self._upstreams:
            self._start_checks(upstream)
        self.refresh()  # arms the timer for an ejection that happened before start

    async def close(self) -> None:
        """Stop every check and timer and close the check sessions."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [*self._checks.values(), *self._retiring]
        self._checks.clear()
        await asyncio.gather(*(cancel(task) for task in tasks))
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(session.close() for session in sessions))

    # -- membership ----------------------------------------------------------------------

    def add(self, upstream: Upstream) -> None:
        """Watch ``upstream`` from now on; it comes in with slow start (``ramp_start``).

        It starts as its fields say (a new ``Upstream`` is healthy); its check loop
        starts at once when the monitor runs. Synchronous: the set changes atomically.
        """
        if upstream in self._tracks:
            raise ValueError(f"upstream {upstream.name} is already monitored")
        if self._closed:
            raise RuntimeError("the health monitor is closed")
        upstream.ramp_start = self._clock()
        self._tracks[upstream] = self._new_track(upstream)
        self._upstreams = (*self._upstreams, upstream)
        if self._loop is not None:
            self._start_checks(upstream)
        self.refresh()

    def remove(self, upstream: Upstream) -> None:
        """Stop watching ``upstream``: its check loop stops, its session and series go.

        The set changes at once (synchronously); the loop is cancelled and the session
        closed in the background, which ``close`` waits for.
        """
        track = self._tracks.pop(upstream, None)
        if track is None:
            raise KeyError(upstream.name)
        self._upstreams = tuple(u for u in self._upstreams if u is not upstream)
        self._metrics.ejections.remove(*self._metrics.labels(upstream.name))
        task = self._checks.pop(upstream, None)
        session = self._sessions.pop(upstream, None)
        if task is not None:
            task.cancel()
        if task is not None or session is not None:
            retiring = asyncio.create_task(self._retire(task, session))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)
        self.refresh()  # the panic threshold counts the upstreams left

    @staticmethod
    async def _retire(
        task: asyncio.Task[None] | None, session: aiohttp.ClientSession | None
    ) -> None:
        try:
            await cancel(task)
        finally:
            if session is not None:
                await session.close()

    def _start_checks(self, upstream: Upstream) -> None:
        if self._health.interval > 0 and not self._closed:
            self._checks[upstream] = asyncio.create_task(
                self._check_loop(upstream), name=f"health-check {upstream.name}"
            )

    # -- passive ejection (called by the forwarder) ---------------------------------------

    def success(self, upstream: Upstream) -> None:
        """A try on ``upstream`` got a non-5xx answer: its failure streak is over."""
        upstream.consecutive_failures = 0
        track = self._tracks.get(upstream)
        if track is not None:
            track.served = True

    def failure(self, upstream: Upstream) -> None:
        """A try on ``upstream`` failed (connect, reset, timeout or 5xx): maybe eject it."""
        upstream.consecutive_failures += 1
        limit = self._ejection.consecutive_failures
        if not limit or upstream.consecutive_failures < limit:
            return
        now = self._clock()
        if upstream.ejected_until > now:
            return  # already out: tries still landing there (panic, in flight) don't extend it
        track = self._tracks.get(upstream)
        if track is None:
            return  # removed while this request was in flight
        max_time = self._ejection.max_time
        if now - track.readmitted_at >= max_time:
            upstream.ejections = 0  # it stayed in long enough: a new streak starts
        upstream.ejections += 1
        doublings = min(upstream.ejections - 1, _MAX_DOUBLINGS)
        duration = min(self._ejection.base_time * 2.0**doublings, max_time)
        upstream.ejected_until = now + duration
        track.ejections_total.inc()
        track.ejected_why = (
            f"{upstream.consecutive_failures} consecutive failures, ejected for "
            f"{duration:g} s (ejection {upstream.ejections} in a row)"
        )
        self.refresh()

    # -- active checks -------------------------------------------------------------------

    async def check_once(self, upstream: Upstream) -> bool:
        """Probe ``upstream`` once and record the result; True when it passed."""
        if self._closed:
            raise RuntimeError("the health monitor is closed")
        if upstream not in self._tracks:
            raise KeyError(f"upstream {upstream.name} is not monitored")
        address, path = self.check_target(upstream)
        try:
            session = self._session(upstream, address)
            async with session.get(
                path, allow_redirects=False, server_hostname=self._tls.server_name or None
            ) as response:
                passed = 200 <= response.status < 300
                problem = f"{path} answered {response.status}"
                if DRAINING_HEADER in response.headers:
                    # It is stopping: out now, before it closes its idle connections.
                    self.record_check(upstream, False, f"{path}: draining", immediate=True)
                    return False
        except TimeoutError:
            passed, problem = False, f"{path} timed out after {self._health.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            passed, problem = False, f"{path} failed: {exc or type(exc).__name__}"
        track = self._tracks.get(upstream)
        if track is not None:
            track.checked_at = self._clock()
        self.record_check(upstream, passed, problem)
        return passed

    @staticmethod
    def check_target(upstream: Upstream) -> tuple[Address, str]:
        """Where ``upstream`` is probed: its admin's /readyz, else its own health path."""
        if upstream.admin is not None:
            return upstream.admin, READY_PATH
        return upstream.address, upstream.health_path

    def record_check(
        self, upstream: Upstream, passed: bool, problem: str = "", *, immediate: bool = False
    ) -> None:
        """Apply one check result with rise/fall hysteresis (ignored once removed);
        ``immediate``: a failure that needs no ``fall`` repeats."""
        track = self._tracks.get(upstream)
        if track is None:
            return
        if passed:
            track.fails = 0
            track.passes += 1
            if not upstream.healthy and track.passes >= self._health.rise:
                upstream.healthy = True
                track.back_why = f"passed {track.passes} active checks in a row"
                self.refresh()
        else:
            track.passes = 0
            track.fails += 1
            track.problem = problem
            if upstream.healthy and (immediate or track.fails >= self._health.fall):
                upstream.healthy = False
                self.refresh()

    async def _check_loop(self, upstream: Upstream) -> None:
        interval = self._health.interval
        # A random first delay spreads the upstreams' checks over the interval.
        await asyncio.sleep(self._rng.uniform(0.0, interval))
        while True:
            if not self.vouched_for(upstream):
                try:
                    await self.check_once(upstream)
                except Exception:  # a bug here must not stop the other upstreams' checks
                    log.exception("health check of %s crashed", upstream.name)
            await asyncio.sleep(interval * self._rng.uniform(*JITTER))

    def vouched_for(self, upstream: Upstream) -> bool:
        """Whether live traffic makes ``upstream``'s check due now unnecessary.

        True when it is healthy, not ejected, none of its requests failed since and at
        least one succeeded since the last check was due, and its last real check is
        less than ``traffic_interval`` old. A skipped check is neither a pass nor a
        fail: rise and fall count real checks only. Each call starts a new period.
        """
        track = self._tracks.get(upstream)
        if track is None:
            return False
        served, track.served = track.served, False
        if self._health.traffic_interval <= self._health.interval:
            return False
        if (
            served
            and upstream.healthy
            and not upstream.ejected_until
            and not upstream.consecutive_failures
            and self._clock() - track.checked_at < self._health.traffic_interval
        ):
            track.skipped += 1
            return True
        return False

    def _session(self, upstream: Upstream, address: Address) -> aiohttp.ClientSession:
        """The one session ``upstream`` is checked through, opened on first use."""
        session = self._sessions.get(upstream)
        if session is None:
            # force_close: each check sends Connection: close on a fresh connection, so
            # it also proves the upstream still accepts, and no idle connection lingers.
            session = self._sessions[upstream] = client.session(
                address,
                self._health.timeout or None,
                ssl=upstream_context(self._tls, address),
                force_close=True,
                limit=1,
            )
        return session

    # -- the routing gate ----------------------------------------------------------------

    def refresh(self) -> None:
        """Recompute ``available`` for every upstream from health, ejection and draining.

        Also re-admits upstreams whose ejection is over and ends ejection streaks of
        upstreams that stayed in for ``max_time``. Cheap: one pass over the upstreams.
        """
        now = self._clock()
        max_time = self._ejection.max_time
        in_count = eligible = 0
        for upstream, track in self._tracks.items():
            if upstream.ejected_until and upstream.ejected_until <= now:
                track.back_why = f"ejection over ({track.ejected_why})"
                track.readmitted_at = now
                upstream.ejected_until = 0.0
                upstream.consecutive_failures = 0
            if (
                upstream.ejections
                and not upstream.ejected_until
                and now - track.readmitted_at >= max_time
            ):
                upstream.ejections = 0
            is_in = self._is_in(upstream, now)
            if is_in != track.was_in:
                self._log_transition(upstream, track, is_in)
                if is_in:
                    upstream.ramp_start = now  # slow start after any time out
                track.was_in = is_in
            track.was_draining = upstream.draining
            if not upstream.draining:
                eligible += 1
                in_count += is_in
        panic = eligible > 0 and in_count < self._ejection.panic_threshold * eligible
        if panic != self.in_panic:
            self.in_panic = panic
            self._panic_gauge.set(1.0 if panic else 0.0)
            if panic:
                log.warning(
                    "panic: only %d of %d upstreams healthy (threshold %g): "
                    "all %d take traffic regardless",
                    in_count,
                    eligible,
                    self._ejection.panic_threshold,
                    eligible,
                )
            else:
                log.info("panic over: %d of %d upstreams healthy", in_count, eligible)
        for upstream, track in self._tracks.items():
            upstream.available = not upstream.draining if panic else track.was_in
        self._schedule(now)

    @staticmethod
    def _is_in(upstream: Upstream, now: float) -> bool:
        return upstream.healthy and upstream.ejected_until <= now and not upstream.draining

    def _log_transition(self, upstream: Upstream, track: _Track, is_in: bool) -> None:
        if is_in:
            why = (
                "no longer draining"
                if track.was_draining and not upstream.draining
                else track.back_why or "back"
            )
            log.info(
                "upstream %s back in: %s; slow start over %g s",
                upstream.name,
                why,
                self._slow_start,
            )
            track.back_why = ""
            return
        reasons = []
        if upstream.ejected_until:
            reasons.append(track.ejected_why)
        if not upstream.healthy:
            reasons.append(f"failed {track.fails} active checks in a row, last: {track.problem}")
        if upstream.draining:
            reasons.append("draining")
        log.warning("upstream %s out: %s", upstream.name, "; ".join(reasons))

    def _schedule(self, now: float) -> None:
        """Arm the timer for the next ejection to end or streak to reset, without traffic."""
        loop = self._loop
        if loop is None or self._closed:
            return
        max_time = self._ejection.max_time
        due = math.inf
        for upstream, track in self._tracks.items():
            if upstream.ejected_until:
                due = min(due, upstream.ejected_until)
            elif upstream.ejections:
                due = min(due, track.readmitted_at + max_time)
        if due >= self._timer_at and self._timer is not None:
            return  # the armed timer comes first; it re-arms for the rest when it fires
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = due
        if due < math.inf:
            self._timer = loop.call_later(max(due - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self.refresh()

    # -- views ---------------------------------------------------------------------------

    def status(self) -> dict[str, dict[str, Any]]:
        """A JSON-able view of each upstream's gate, by upstream name (for ``/status``)."""
        return {upstream.name: self.view(upstream) for upstream in self._upstreams}

    def view(self, upstream: Upstream) -> dict[str, Any]:
        """A JSON-able view of ``upstream``'s gate (monitored or not)."""
        now = self._clock()
        return {
            "healthy": upstream.healthy,
            "available": upstream.available,
            "draining": upstream.draining,
            "ejected_for_seconds": round(max(upstream.ejected_until - now, 0.0), 3),
            "ejections": upstream.ejections,
            "consecutive_failures": upstream.consecutive_failures,
            "slow_start_remaining_seconds": round(
                max(upstream.ramp_start + self._slow_start - now, 0.0), 3
            ),
            "checks_skipped": track.skipped if (track := self._tracks.get(upstream)) else 0,
        }


__all__ = ["HealthMonitor"]
