"""The routing gate: which upstreams may take traffic, from the active checks, passive
ejection and panic mode (see ``lbstack.health``)."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from random import Random
from typing import Any

from prometheus_client import Counter

from lbstack.config import TierConfig
from lbstack.health.checks import ActiveChecks
from lbstack.log import get_logger
from lbstack.metrics import RouterMetrics
from lbstack.routing.upstream import Upstream

log = get_logger("health")

# Beyond this many ejections in a row the doubling is capped anyway; it keeps 2**n finite.
_MAX_DOUBLINGS = 60


@dataclass(slots=True)
class _Track:
    """What the monitor remembers of one upstream beyond the fields routing reads."""

    ejections_total: Counter
    ejected_why: str = ""
    readmitted_at: float = -math.inf  # end of the last ejection, for the streak reset
    was_in: bool = True  # in (panic aside) at the last refresh, to log transitions
    was_draining: bool = False
    back_why: str = ""  # why it may be coming back, logged by the next refresh


class HealthMonitor:
    """Decides, for one router, which of its upstreams policies may pick.

    The forwarder calls ``success(upstream)`` or ``failure(upstream)`` after every try
    (failure: connect error, reset, timeout or a 5xx answer); whoever changes
    ``Upstream.draining`` calls ``refresh()``. Everything else runs by itself between
    ``start()`` and ``close()`` (``checks``, and the re-admission timer); ``add`` and
    ``remove`` change the set at any time.
    """

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
        self._upstreams = tuple(upstreams)
        self._ejection = tier.ejection
        self._slow_start = tier.slow_start
        self._clock = clock
        self._metrics = metrics
        self._panic_gauge = metrics.panic
        self.checks = ActiveChecks(tier, self._health_changed, clock, rng or Random(), token=token)
        self._tracks: dict[Upstream, _Track] = {}
        for upstream in self._upstreams:
            self._watch(upstream)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self.in_panic = False
        self.refresh()

    @property
    def upstreams(self) -> tuple[Upstream, ...]:
        return self._upstreams

    def _watch(self, upstream: Upstream) -> None:
        metrics = self._metrics
        self._tracks[upstream] = _Track(
            ejections_total=metrics.ejections.labels(*metrics.labels(upstream.name)),
            was_in=self._is_in(upstream, self._clock()),
            was_draining=upstream.draining,
        )
        self.checks.add(upstream)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Start the active checks (unless the interval is 0) and the re-admission timer."""
        self._loop = asyncio.get_running_loop()
        self.checks.start()
        self.refresh()  # arms the timer for an ejection that happened before start

    async def close(self) -> None:
        """Stop every check and timer and close the check sessions."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        await self.checks.close()

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
        self._watch(upstream)
        self._upstreams = (*self._upstreams, upstream)
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
        self.checks.remove(upstream)
        self.refresh()  # the panic threshold counts the upstreams left

    # -- passive ejection (called by the forwarder) ---------------------------------------

    def success(self, upstream: Upstream) -> None:
        """A try on ``upstream`` got a non-5xx answer: its failure streak is over."""
        upstream.consecutive_failures = 0
        self.checks.served(upstream)

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

    def _health_changed(self, upstream: Upstream, why: str) -> None:
        """The active checks changed ``upstream.healthy``: ``why`` it is back, if it is."""
        track = self._tracks.get(upstream)
        if track is not None and why:
            track.back_why = why
        self.refresh()

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
            reasons.append(self.checks.failing(upstream))
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
            "checks_skipped": self.checks.skipped(upstream),
        }
