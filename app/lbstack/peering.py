"""The load exchange: balancers read each other's load view and route with it.

Several balancers accept on the same sockets, so each one sees only its share of the
traffic. Routing on its own in-flight counts alone, each would find the same proxy
"idle" and they would all pile onto it between two scrapes of the proxies. So every
router serves its own view on its admin socket (``GET /load``, ``lbstack.loadview``),
and each balancer polls the others'.

A ``Peering`` polls each peer every ``interval`` with a ``timeout``, through one
keep-alive connection per peer, keeps each peer's last view with the time it arrived,
and folds the fresh ones into the ``Upstream.peer_*`` fields the policies read. A view
counts fully for half of ``stale_after``, then fades linearly to nothing at
``stale_after``; older, it is ignored. A peer that doesn't answer (stopped, crashed,
hung) is counted in ``lbstack_peer_exchange_errors_total`` and logged once when it
goes and once when it comes back; routing never waits for a poll and nothing here
raises into the data path. Peers' health is shown, not obeyed: a balancer's own
health checks decide whether it uses a proxy.

**The peer set.** The *local* peers are this host's other balancers (their admin
sockets, from the supervisor). Balancers elsewhere (``[balancer.exchange] peers``:
addresses, or a DNS name followed by ``lbstack.discovery``) come and go at runtime
(``follow``, ``add``, ``remove``); over TCP each poll carries the admin token. A name
may well resolve to this balancer's own TCP admin address, or a local peer's, or name
one balancer twice (IPv4 and IPv6): so a peer that is not local and whose view says it
is this balancer, a local peer or a peer listed before it (the identity ``name@host``
of ``lbstack.loadview``) is **not counted** (``same_as`` says which); it is still polled,
so it counts again should the address come to name another balancer.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from random import Random
from typing import Any, Final

import aiohttp
from prometheus_client import Counter, Gauge

from lbstack import client
from lbstack.address import Address
from lbstack.admin import bearer
from lbstack.client import cancel
from lbstack.config import ExchangeConfig
from lbstack.loadview import LOAD_PATH, LoadView, PeerView, UpstreamLoad, ViewError, identity
from lbstack.log import get_logger
from lbstack.metrics import BASE, UPSTREAM, ComponentMetrics
from lbstack.routing.upstream import Upstream

log = get_logger("exchange")

# Below the admin server's keep-alive (30 s), so the pooled connection is ours to close.
POOL_IDLE: Final = 10.0
JITTER: Final = (0.9, 1.1)
PEER = (*BASE, "peer")
SELF: Final = "this balancer"


@dataclass(slots=True)
class Peer:
    """Another balancer: where its admin is, its last view, and how polling it goes."""

    address: Address
    label: str
    errors: Counter
    local: bool = True  # this host's, from the supervisor; else configured or discovered
    same_as: str = ""  # not counted: it is this balancer, or that peer
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


class PeerMetrics:
    """The exchange's series: per peer (``up`` and ``age`` read at scrape time), and
    per upstream, the peers' load as routing counts it."""

    def __init__(self, metrics: ComponentMetrics) -> None:
        registry = metrics.registry
        self.labels = (metrics.role, metrics.instance)
        self.up = Gauge(
            "lbstack_peer_up",
            "1 while a peer balancer's load view is fresh enough to route with, else 0.",
            PEER,
            registry=registry,
        )
        self.age = Gauge(
            "lbstack_peer_view_age_seconds",
            "Age of the last load view from each peer balancer (+Inf before the first).",
            PEER,
            registry=registry,
        )
        self.errors = Counter(
            "lbstack_peer_exchange_errors",
            "Failed polls of each peer balancer's /load (no answer, timeout, bad view).",
            PEER,
            registry=registry,
        )
        self.peer_in_flight = Gauge(
            "lbstack_upstream_peer_in_flight_requests",
            "Requests the other balancers have in flight to each upstream, as routing "
            "counts them (faded by the age of their views).",
            UPSTREAM,
            registry=registry,
        )

    def forget(self, label: str) -> None:
        for family in (self.up, self.age, self.errors):
            family.remove(*self.labels, label)


class Peering:
    """Polls the peers' ``/load`` in the background and folds it into ``upstreams()``.

    ``me``: this balancer's own view, whose identity a peer found by DNS may turn out
    to have. ``token``: the admin token sent to peers over TCP.
    """

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
        me: LoadView | None = None,
        token: str | None = None,
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
        self._me = me
        self._credentials = bearer(token)
        self._metrics = PeerMetrics(metrics)
        self._series: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._started = False
        self._closed = False
        self.peers: list[Peer] = []
        for address in peers:
            self.add(address, local=True)

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start polling in the background (once there is a peer)."""
        self._started = True
        self._start_task()

    def _start_task(self) -> None:
        if self.peers and self._started and self._task is None and not self._closed:
            self._task = asyncio.create_task(self._run(), name="load-exchange")

    async def close(self) -> None:
        """Stop polling, close the connections, and route on our own figures again."""
        self._closed = True
        task, self._task = self._task, None
        await cancel(task)
        await asyncio.gather(*(self._retire(peer) for peer in self.peers), *self._retiring)
        for upstream in self._upstreams():
            upstream.peer_in_flight = 0.0
            upstream.peer_latency = 0.0

    async def _run(self) -> None:
        while True:
            for peer in list(self.peers):
                # A peer still being polled (it is slow to answer) is not polled twice.
                if peer.task is None or peer.task.done():
                    peer.task = asyncio.create_task(self._poll(peer), name=f"poll {peer.label}")
            # Also when no answer came: views age out even if every peer is silent.
            try:
                self.fold()
            except Exception:  # a bug: say so, but keep the exchange (and routing) going
                log.exception("folding the peers' load crashed")
            await asyncio.sleep(self._interval * self._rng.uniform(*JITTER))

    # -- the peer set ---------------------------------------------------------------------

    def find(self, address: Address) -> Peer | None:
        return next((peer for peer in self.peers if peer.address == address), None)

    def add(self, address: Address, *, local: bool = False) -> Peer:
        """Poll ``address`` too from the next round (the peer there if it is known)."""
        known = self.find(address)
        if known is not None:
            return known
        label = peer_label(address)
        metrics = self._metrics
        peer = Peer(address, label, metrics.errors.labels(*metrics.labels, label), local=local)
        # Read at scrape time: the age and freshness are those of the moment.
        metrics.up.labels(*metrics.labels, label).set_function(partial(self._up, peer))
        metrics.age.labels(*metrics.labels, label).set_function(partial(self._age, peer))
        self.peers.append(peer)
        if not local:
            log.info("peer %s added", label)
        self._start_task()
        return peer

    def remove(self, address: Address) -> None:
        """Stop polling ``address`` and forget its view and series."""
        peer = self.find(address)
        if peer is None:
            return
        self.peers.remove(peer)
        self._metrics.forget(peer.label)
        log.info("peer %s removed", peer.label)
        retiring = asyncio.create_task(self._retire(peer))
        self._retiring.add(retiring)
        retiring.add_done_callback(self._retiring.discard)
        self._recount()

    def follow(self, addresses: Iterable[Address]) -> None:
        """Make ``addresses`` the peers besides the local ones (a discovery source's set)."""
        wanted = set(addresses)
        for peer in [p for p in self.peers if not p.local and p.address not in wanted]:
            self.remove(peer.address)
        for address in sorted(wanted, key=str):
            self.add(address)
        self.fold()

    @staticmethod
    async def _retire(peer: Peer) -> None:
        poll, peer.task = peer.task, None
        await cancel(poll)
        session, peer.session = peer.session, None
        if session is not None:
            await session.close()

    def _recount(self) -> None:
        """Mark each peer that is not local and is this balancer or a peer before it."""
        taken: dict[str, str] = {}
        if self._me is not None:
            taken[self._me.identity] = SELF
        for peer in (p for p in self.peers if p.local):
            if self._me is not None:
                taken.setdefault(identity(peer.label, self._me.host), peer.label)
            if peer.view is not None and peer.view.identity is not None:
                taken.setdefault(peer.view.identity, peer.label)
        for peer in (p for p in self.peers if not p.local):
            found = None if peer.view is None else peer.view.identity
            same = "" if found is None else taken.get(found, "")
            if not same and found is not None:
                taken[found] = peer.label
            if same != peer.same_as:
                if same:
                    log.info("peer %s is %s (%s): not counted twice", peer.label, same, found)
                else:
                    log.info("peer %s is %s now: counted", peer.label, found)
                peer.same_as = same

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
        if self._closed or peer not in self.peers:
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
        if peer not in self.peers:
            return  # removed while its poll was under way
        previous = peer.view
        peer.view = view
        peer.at = self._clock()
        if not peer.up:
            log.info("peer %s answers (pid %d); routing with its load", peer.label, view.pid)
            peer.up = True
        elif previous is not None and previous.pid != view.pid:
            log.info("peer %s restarted (pid %d, was %d)", peer.label, view.pid, previous.pid)
        if previous is None or previous.identity != view.identity:
            self._recount()
        self.fold()

    async def _fetch(self, peer: Peer) -> Any:
        """``peer``'s ``/load`` JSON; ViewError if it doesn't answer 200."""
        if peer.session is None:
            # One pooled keep-alive connection per peer: a poll every interval reuses it.
            # (A session's connector reaches one unix socket, hence a session per peer.)
            peer.session = client.session(
                peer.address, self._timeout, limit=1, keepalive_timeout=POOL_IDLE
            )
        headers = None if peer.address.is_unix else self._credentials
        async with peer.session.get(LOAD_PATH, headers=headers) as response:
            if response.status != 200:
                raise ViewError(f"{LOAD_PATH} answered {response.status}")
            return await response.json(content_type=None)

    # -- folding into routing --------------------------------------------------------------

    def weight(self, peer: Peer, now: float) -> float:
        """How much ``peer``'s view counts at ``now``: 1, fading to 0 at ``stale_after``
        (0 for a peer that is this balancer or another peer)."""
        age = now - peer.at
        if peer.view is None or peer.same_as or age > self._stale_after:
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
        gauge, labels = self._metrics.peer_in_flight, self._metrics.labels
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
            gauge.labels(*labels, upstream.name).set(in_flight)
            names.add(upstream.name)
        for gone in self._series - names:
            gauge.remove(*labels, gone)
        self._series = names

    # -- status ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Each peer as ``/status`` shows it: up, the age of its view, its figures."""
        now = self._clock()
        return [_peer_status(peer, self.weight(peer, now), now) for peer in self.peers]


def _peer_status(peer: Peer, weight: float, now: float) -> dict[str, Any]:
    view = peer.view
    return {
        "name": peer.label,
        "address": str(peer.address),
        "local": peer.local,
        "same_as": peer.same_as or None,
        "identity": None if view is None else view.identity,
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


__all__ = [
    "LOAD_PATH",
    "LoadView",
    "Peer",
    "PeerMetrics",
    "PeerView",
    "Peering",
    "UpstreamLoad",
    "ViewError",
    "peer_label",
]
