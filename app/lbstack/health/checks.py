"""The active health checks: a probe of each upstream every interval, unless its live
traffic vouches for it, with rise/fall hysteresis on ``Upstream.healthy``.

A probe of an admin API over TCP carries the stack's admin token (``/readyz`` is open
without it, but an admin API is only ever sent it); a probe of a data address never
does: the token is not the application's to see."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from random import Random

import aiohttp

from lbstack import client
from lbstack.address import Address
from lbstack.admin import DRAINING_HEADER, bearer
from lbstack.client import cancel
from lbstack.config import TierConfig
from lbstack.log import get_logger
from lbstack.routing.upstream import Upstream
from lbstack.tls import upstream_context

log = get_logger("health")

READY_PATH = "/readyz"
# Each wait between two checks of one upstream is the interval times a factor in this
# range, so checks started together drift apart instead of firing in lockstep.
JITTER = (0.9, 1.1)


@dataclass(slots=True)
class _Probes:
    """What the active checks remember of one upstream."""

    passes: int = 0  # checks passed in a row
    fails: int = 0  # checks failed in a row
    problem: str = ""  # what the last failed check saw
    served: bool = False  # a request to it succeeded since the last check was due
    checked_at: float = -math.inf  # when the last check was made
    skipped: int = 0  # checks traffic made unnecessary


class ActiveChecks:
    """The active checks of a router's upstreams: a loop, a session and rise/fall
    counts each. When a result changes ``Upstream.healthy``, ``changed(upstream, why)``
    is told (``why``: what brought it back, or "" when it fell)."""

    def __init__(
        self,
        tier: TierConfig,
        changed: Callable[[Upstream, str], None],
        clock: Callable[[], float],
        rng: Random,
        *,
        token: str | None = None,
    ) -> None:
        self._settings = tier.health
        self._credentials = bearer(token)
        self._tls = tier.upstream_tls
        self._changed = changed
        self._clock = clock
        self._rng = rng
        self._probes: dict[Upstream, _Probes] = {}
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}
        self._loops: dict[Upstream, asyncio.Task[None]] = {}
        # Check loops and sessions of removed upstreams, being stopped and closed.
        self._retiring: set[asyncio.Task[None]] = set()
        self._running = False
        self._closed = False

    # -- lifecycle and membership ----------------------------------------------------------

    def start(self) -> None:
        """Start a loop per upstream (in the running loop), unless the interval is 0."""
        self._running = True
        for upstream in self._probes:
            self._start(upstream)

    async def close(self) -> None:
        """Stop every loop and close every session."""
        self._closed = True
        tasks = [*self._loops.values(), *self._retiring]
        self._loops.clear()
        await asyncio.gather(*(cancel(task) for task in tasks))
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(*(session.close() for session in sessions))

    def add(self, upstream: Upstream) -> None:
        self._probes[upstream] = _Probes()
        if self._running:
            self._start(upstream)

    def remove(self, upstream: Upstream) -> None:
        """Forget ``upstream`` now; its loop is stopped and its session closed in the
        background, which ``close`` waits for."""
        self._probes.pop(upstream, None)
        task = self._loops.pop(upstream, None)
        session = self._sessions.pop(upstream, None)
        if task is not None:
            task.cancel()
        if task is not None or session is not None:
            retiring = asyncio.create_task(self._retire(task, session))
            self._retiring.add(retiring)
            retiring.add_done_callback(self._retiring.discard)

    @staticmethod
    async def _retire(
        task: asyncio.Task[None] | None, session: aiohttp.ClientSession | None
    ) -> None:
        try:
            await cancel(task)
        finally:
            if session is not None:
                await session.close()

    def _start(self, upstream: Upstream) -> None:
        if self._settings.interval > 0 and not self._closed:
            self._loops[upstream] = asyncio.create_task(
                self._check_loop(upstream), name=f"health-check {upstream.name}"
            )

    # -- what the monitor reads and tells ------------------------------------------------

    def served(self, upstream: Upstream) -> None:
        """A request to ``upstream`` succeeded: evidence enough to skip its next check."""
        probes = self._probes.get(upstream)
        if probes is not None:
            probes.served = True

    def failing(self, upstream: Upstream) -> str:
        """Why the checks took ``upstream`` out."""
        probes = self._probes.get(upstream) or _Probes()
        return f"failed {probes.fails} active checks in a row, last: {probes.problem}"

    def skipped(self, upstream: Upstream) -> int:
        probes = self._probes.get(upstream)
        return 0 if probes is None else probes.skipped

    # -- the checks ----------------------------------------------------------------------

    async def check_once(self, upstream: Upstream) -> bool:
        """Probe ``upstream`` once and record the result; True when it passed."""
        if self._closed:
            raise RuntimeError("the health monitor is closed")
        if upstream not in self._probes:
            raise KeyError(f"upstream {upstream.name} is not monitored")
        address, path = self.check_target(upstream)
        admin_over_tcp = address is upstream.admin and not address.is_unix
        try:
            session = self._session(upstream, address)
            async with session.get(
                path,
                allow_redirects=False,
                server_hostname=self._tls.server_name or None,
                headers=self._credentials if admin_over_tcp else None,
            ) as response:
                passed = 200 <= response.status < 300
                problem = f"{path} answered {response.status}"
                if DRAINING_HEADER in response.headers:
                    # It is stopping: out now, before it closes its idle connections.
                    self.record_check(upstream, False, f"{path}: draining", immediate=True)
                    return False
        except TimeoutError:
            passed, problem = False, f"{path} timed out after {self._settings.timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            passed, problem = False, f"{path} failed: {exc or type(exc).__name__}"
        probes = self._probes.get(upstream)
        if probes is not None:
            probes.checked_at = self._clock()
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
        probes = self._probes.get(upstream)
        if probes is None:
            return
        if passed:
            probes.fails = 0
            probes.passes += 1
            if not upstream.healthy and probes.passes >= self._settings.rise:
                upstream.healthy = True
                self._changed(upstream, f"passed {probes.passes} active checks in a row")
        else:
            probes.passes = 0
            probes.fails += 1
            probes.problem = problem
            if upstream.healthy and (immediate or probes.fails >= self._settings.fall):
                upstream.healthy = False
                self._changed(upstream, "")

    async def _check_loop(self, upstream: Upstream) -> None:
        interval = self._settings.interval
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
        probes = self._probes.get(upstream)
        if probes is None:
            return False
        served, probes.served = probes.served, False
        settings = self._settings
        if settings.traffic_interval <= settings.interval:
            return False
        if (
            served
            and upstream.healthy
            and not upstream.ejected_until
            and not upstream.consecutive_failures
            and self._clock() - probes.checked_at < settings.traffic_interval
        ):
            probes.skipped += 1
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
                self._settings.timeout or None,
                ssl=upstream_context(self._tls, address),
                force_close=True,
                limit=1,
            )
        return session
