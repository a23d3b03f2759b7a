"""The load exchange: balancers read each other's load view and route with it.

Several balancers accept on the same sockets, so each one sees only its share of the
traffic. Routing on its own in-flight counts alone, each would find the same proxy
"idle" and they would all pile onto it between two scrapes of the proxies. So every
router serves its own view on its admin socket, and each balancer polls the others':

``GET /load`` (admin socket, every router) answers ``load_view``::

    {"name": "balancer-1", "role": "balancer", "pid": 4242, "seq": 17,
     "time": 1732423456.123, "interval": 0.25, "in_flight": 5,
     "upstreams": [{"name": "proxy-0", "in_flight": 3, "requests": 1200, "errors": 0,
                    "latency_ewma": 0.0021, "latency_age": 0.004, "available": true,
                    "healthy": true, "ejected": false, "draining": false}, ...]}

``in_flight`` per upstream is the router's *own* count, never what it learnt from its
peers, so figures don't echo between balancers. ``seq`` counts the views the process
has served and ``pid`` names the process: a peer that restarted shows a new pid.

An ``Peering`` polls each peer every ``interval`` with a ``timeout``, through one
keep-alive connection per peer, keeps each peer's last view with the time it arrived,
and folds the fresh ones into the ``Upstream.peer_*`` fields the policies read. A view
counts fully for half of ``stale_after``, then fades linearly to nothing at
``stale_after``; older, it is ignored. A peer that doesn't answer (stopped, crashed,
hung) is counted in ``lbstack_peer_exchange_errors_total`` and logged once when it
goes and once when it comes back; routing never waits for a poll and nothing here
raises into the data path. Peers' health is shown, not obeyed: a balancer's own
health checks decide whether it uses a proxy.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from random import Random
from typing import Any, Final

import aiohttp
from prometheus_client import Counter, Gauge

from lbstack import client
from lbstack.address import Address
from lbstack.client import cancel
from lbstack.config import ExchangeConfig
from lbstack.log import get_logger
from lbstack.metrics import BASE, UPSTREAM, ComponentMetrics
from lbstack.routing.upstream import Upstream

log = get_logger("exchange")

LOAD_PATH: Final = "/load"
# Below the admin server's keep-alive (30 s), so the pooled connection is ours to close.
POOL_IDLE: Final = 10.0
JITTER: Final = (0.9, 1.1)
PEER = (*BASE, "peer")


class LoadView:
    """Builds what a router serves on ``GET /load``: its own load, numbered."""

    def __init__(
        self,
        name: str,
        role: str,
        upstreams: Callable[[], Sequence[Upstream]],
        in_flight: Callable[[], int],
        interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.role = role
        self._upstreams = upstreams
        self._in_flight = in_flight
        self._interval = interval
        self._clock = clock
        self._seq = 0
        self._pid = os.getpid()

    def __call__(self) -> dict[str, Any]:
        self._seq += 1
        now = self._clock()
        return {
            "name": self.name,
            "role": self.role,
            "pid": self._pid,
            "seq": self._seq,
            "time": round(time.time(), 3),
            "interval": self._interval,
            "in_flight": self._in_flight(),
            "upstreams": [
                {
                    "name": u.name,
                    "in_flight": u.in_flight,
                    "requests": u.requests,
                    "errors": u.errors,
                    "latency_ewma": u.ewma,
                    "latency_age": None if u.ewma_at == -math.inf else round(now - u.ewma_at, 6),
                    "available": u.available,
                    "healthy": u.healthy,
                    "ejected": u.ejected_until > now,
                    "draining": u.draining,
                }
                for u in self._upstreams()
            ],
        }


@dataclass(frozen=True, slots=True)
class UpstreamLoad:
    """One upstream as a peer sees it."""

    in_flight: float
    requests: int
    latency: float  # the peer's estimate when it answered, seconds (0: none)
    available: bool


@dataclass(frozen=True, slots=True)
class PeerView:
    """One answer of a peer's ``GET /load``."""

    name: str
    pid: int
    seq: int
    in_flight: float
    upstreams: dict[str, UpstreamLoad]

    @classmethod
    def parse(cls, data: Any, decay: float) -> PeerView:
        """The view in a ``/load`` JSON body; ValueError saying what is wrong.

        A latency estimate is decayed by its age, with our own ``decay``, as the peer's
        policy would read it now.
        """
        if not isinstance(data, dict) or not isinstance(data.get("upstreams"), list):
            raise ViewError("expected a JSON object with an upstreams list")
        try:
            upstreams = {}
            for item in data["upstreams"]:
                latency = float(item["latency_ewma"])
                age = item.get("latency_age")
                if age is None:
                    latency = 0.0
                elif decay > 0:
                    latency *= math.exp(-max(float(age), 0.0) / decay)
                in_flight = float(item["in_flight"])
                if not (math.isfinite(in_flight) and in_flight >= 0 and math.isfinite(latency)):
                    raise ViewError(f"{item['name']}: expected finite figures >= 0")
                upstreams[str(item["name"])] = UpstreamLoad(
                    in_flight=in_flight,
                    requests=int(item["requests"]),
                    latency=max(latency, 0.0),
                    available=bool(item["available"]),
                )
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                seq=int(data["seq"]),
                in_flight=float(data["in_flight"]),
                upstreams=upstreams,
            )
        except (KeyError, TypeError) as exc:
            raise ViewError(f"expected a load view, missing or mistyped {exc}") from exc


class ViewError(ValueError):
    """A peer answered something other than a load view."""


@dataclass(slots=True)
class Peer:
    """Another balancer: where its admin is, its last view, and how polling it goes."""

    address: Address
    label: str
    errors: Counter
    view: PeerView | None = None
    at: float = -math.inf  # when ``view`` arrived (our clock)
    up: bool | None = None  # None until the first poll ends
    error_count: int = 0
    last_error: str = ""
    session: aiohttp.ClientSession | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def peer_label(address: Address) -> str:
    """A peer's name in metrics and logs, from its admin address.

    ``unix:/run/lbstack/balancer-1.admin.sock`` is ``balancer-1``; a tcp address is
    ``host:port``. Known before the peer ever answers, and stable across its restarts.
    """
    if address.is_unix:
        base = os.path.basename(address.path)
        for suffix in (".admin.sock", ".sock"):
            if base.endswith(suffix):
                return base[: -len(suffix)]
        return base
    return str(address).removeprefix("tcp://")


class Peering:
    """Polls the peers' ``/load`` in the background and folds it into ``upstreams()``."""

    def __init__(
        self,
        peers: Sequence[Address],
        upstreams: Callable[[], Sequence[Upstream]],
        settings: ExchangeConfig,
        metrics: ComponentMetrics,
        *,
        decay: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        rng: Random | None = None,
    ) -> None:
        self.settings = settings
        self._upstreams = upstreams
        self._interval = settings.interval
        self._timeout = settings.timeout
        self._stale_after = settings.stale_after
        self._full_for = settings.stale_after / 2
        self._decay = decay
        self._clock = clock
        self._rng = rng or Random()
        labels = (metrics.role, metrics.instance)
        self._labels = labels
        registry = metrics.registry
        up = Gauge(
            "lbstack_peer_up",
            "1 while a peer balancer's load view is fresh enough to route with, else 0.",
            PEER,
            registry=registry,
        )
        age = Gauge(
            "lbstack_peer_view_age_seconds",
            "Age of the last load view from each peer balancer (+Inf before the first).",
            PEER,
            registry=registry,
        )
        errors = Counter(
            "lbstack_peer_exchange_errors",
            "Failed polls of each peer balancer's /load (no answer, timeout, bad view).",
            PEER,
            registry=registry,
        )
        self._peer_in_flight = Gauge(
            "lbstack_upstream_peer_in_flight_requests",
            "Requests the other balancers have in flight to each upstream, as routing "
            "counts them (faded by the age of their views).",
            UPSTREAM,
            registry=registry,
        )
        self._series: set[str] = set()
        self.peers: list[Peer] = []
        for address in peers:
            label = peer_label(address)
            peer = Peer(address, label, errors.labels(*labels, label))
            # Read at scrape time: the age and freshness are those of the moment.
            up.labels(*labels, label).set_function(partial(self._up, peer))
            age.labels(*labels, label).set_function(partial(self._age, peer))
            self.peers.append(peer)
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling in the background (nothing to do without peers)."""
        if self.peers and self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="load-exchange")

    async def close(self) -> None:
        """Stop polling, close the connections, and route on our own figures again."""
        self._closed = True
        task, self._task = self._task, None
        await cancel(task)
        for peer in self.peers:
            poll, peer.task = peer.task, None
            await cancel(poll)
        sessions = [p.session for p in self.peers if p.session is not None]
        for peer in self.peers:
            peer.session = None
        await asyncio.gather(*(s.close() for s in sessions))
        for upstream in self._upstreams():
            upstream.peer_in_flight = 0.0
            upstream.peer_latency = 0.0

    async def _run(self) -> None:
        while True:
            for peer in self.peers:
                # A peer still being polled (it is slow to answer) is not polled twice.
                if peer.task is None or peer.task.done():
                    peer.task = asyncio.create_task(self._poll(peer), name=f"poll {peer.label}")
            # Also when no answer came: views age out even if every peer is silent.
            try:
                self.fold()
            except Exception:  # a bug: say so, but keep the exchange (and routing) going
                log.exception("folding the peers' load crashed")
            await asyncio.sleep(self._interval * self._rng.uniform(*JITTER))

    # -- polling ---------------------------------------------------------------------------

    async def _poll(self, peer: Peer) -> None:
        await self.poll(peer)

    async def poll(self, peer: Peer) -> bool:
        """Read ``peer``'s view once and fold it in; False (counted, logged once) on failure.

        Never raises but for cancellation: a poll must not take the loop down.
        """
        try:
            view = PeerView.parse(await self._fetch(peer), self._decay)
        except TimeoutError:
            problem = f"no answer within {self._timeout:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            problem = str(exc) or type(exc).__name__
        except ValueError as exc:  # not JSON, or not a load view
            problem = f"unreadable view: {exc}"
        except Exception as exc:  # a bug: say so loudly, but keep exchanging
            log.exception("polling peer %s crashed", peer.label)
            problem = repr(exc)
        else:
            try:
                self.accept(peer, view)
            except Exception:  # a bug: say so, but keep the exchange (and routing) going
                log.exception("folding the view of peer %s crashed", peer.label)
                return False
            return True
        if self._closed:
            return False
        peer.errors.inc()
        peer.error_count += 1
        peer.last_error = problem
        if peer.up is not False:
            if peer.up:
                log.warning(
                    "peer %s stopped answering (%s); its load is ignored after %g s",
                    peer.label,
                    problem,
                    self._stale_after,
                )
            else:
                log.info("peer %s not answering yet (%s)", peer.label, problem)
            peer.up = False
        return False

    def accept(self, peer: Peer, view: PeerView) -> None:
        """Keep ``view`` as ``peer``'s latest, stamped now, and fold it in."""
        previous = peer.view
        peer.view = view
        peer.at = self._clock()
        if not peer.up:
            log.info("peer %s answers (pid %d); routing with its load", peer.label, view.pid)
            peer.up = True
        elif previous is not None and previous.pid != view.pid:
            log.info("peer %s restarted (pid %d, was %d)", peer.label, view.pid, previous.pid)
        self.fold()

    async def _fetch(self, peer: Peer) -> Any:
        """``peer``'s ``/load`` JSON; ViewError if it doesn't answer 200."""
        if peer.session is None:
            # One pooled keep-alive connection per peer: a poll every interval reuses it.
            # (A session's connector reaches one unix socket, hence a session per peer.)
            peer.session = client.session(
                peer.address, self._timeout, limit=1, keepalive_timeout=POOL_IDLE
            )
        async with peer.session.get(LOAD_PATH) as response:
            if response.status != 200:
                raise ViewError(f"{LOAD_PATH} answered {response.status}")
            return await response.json(content_type=None)

    # -- folding into routing --------------------------------------------------------------

    def weight(self, peer: Peer, now: float) -> float:
        """How much ``peer``'s view counts at ``now``: 1, fading to 0 at ``stale_after``."""
        age = now - peer.at
        if peer.view is None or age > self._stale_after:
            return 0.0
        if age <= self._full_for:
            return 1.0
        return (self._stale_after - age) / (self._stale_after - self._full_for)

    def fresh(self, peer: Peer) -> bool:
        """Whether ``peer``'s view counts at all now."""
        return self.weight(peer, self._clock()) > 0.0

    def _up(self, peer: Peer) -> float:
        return 1.0 if self.fresh(peer) else 0.0

    def _age(self, peer: Peer) -> float:
        return self._clock() - peer.at

    def fold(self) -> None:
        """Set every upstream's ``peer_*`` fields from the peers' views as of now.

        ``peer_in_flight`` is the weighted sum of the peers' own in-flight counts;
        ``peer_latency`` the weighted mean of their latency estimates (0 when none).
        """
        now = self._clock()
        weighted = [(p.view, w) for p in self.peers if (w := self.weight(p, now)) > 0.0]
        upstreams = self._upstreams()
        names = set()
        for upstream in upstreams:
            in_flight = latency = latency_weight = 0.0
            for view, w in weighted:
                assert view is not None  # weight() is 0 without a view
                load = view.upstreams.get(upstream.name)
                if load is None:
                    continue
                in_flight += w * load.in_flight
                if load.latency > 0.0:
                    latency += w * load.latency
                    latency_weight += w
            upstream.peer_in_flight = in_flight
            upstream.peer_latency = latency / latency_weight if latency_weight else 0.0
            self._peer_in_flight.labels(*self._labels, upstream.name).set(in_flight)
            names.add(upstream.name)
        for gone in self._series - names:
            self._peer_in_flight.remove(*self._labels, gone)
        self._series = names

    # -- status ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each peer as ``/status`` shows it: up, the age of its view, its figures."""
        now = self._clock()
        peers = []
        for peer in self.peers:
            view = peer.view
            weight = self.weight(peer, now)
            peers.append(
                {
                    "name": peer.label,
                    "address": str(peer.address),
                    "up": weight > 0.0,
                    "age": None if view is None else round(now - peer.at, 3),
                    "weight": round(weight, 3),
                    "errors": peer.error_count,
                    "last_error": peer.last_error or None,
                    "pid": None if view is None else view.pid,
                    "seq": None if view is None else view.seq,
                    "in_flight": None if view is None else view.in_flight,
                    "upstreams": {}
                    if view is None
                    else {
                        name: {
                            "in_flight": load.in_flight,
                            "requests": load.requests,
                            "latency": round(load.latency, 6),
                            "available": load.available,
                        }
                        for name, load in view.upstreams.items()
                    },
                }
            )
        return peers


__all__ = [
    "LOAD_PATH",
    "LoadView",
    "Peer",
    "PeerView",
    "Peering",
    "UpstreamLoad",
    "ViewError",
    "peer_label",
]
