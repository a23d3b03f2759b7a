"""The load exchange between balancers: its protocol, its folding into routing, a real stack.

The combination tests run two balancers' policies side by side with a fake clock and
hand each the other's ``/load`` view directly (no HTTP), so every pick is
deterministic: with the exchange they spread a burst across the proxies, without it
they pile onto the one that looks idle from each alone. The poll tests go through real
HTTP on unix sockets; the stack test runs ``lbstack up --balancers 2``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import signal
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from prometheus_client import generate_latest
from pytest_aiohttp import AiohttpClient
from rich.console import Console

from lbstack.address import Address
from lbstack.api import LoadReport, PeerStatus
from lbstack.component import ChildSpec, UpstreamSpec
from lbstack.config import BalancerConfig, Config, ExchangeConfig, TierConfig, load
from lbstack.errors import ConfigError
from lbstack.metrics import Metrics, parse
from lbstack.peering import LoadView, Peering, PeerView, ViewError, peer_label
from lbstack.routing import Policy, Upstream, create_policy
from lbstack.statusview import render_router
from lbstack.testing import RunningStack, running_stack
from lbstack.tiers.router import create_router
from tests.conftest import FakeClock, UnixServers
from tests.harness import router_status, until
from tests.load import Load

PROXIES = ("proxy-0", "proxy-1")
SETTINGS = ExchangeConfig(interval=0.25, timeout=0.2, stale_after=1.0)


class Balancer:
    """One balancer's routing state: its upstreams, policy, exchange and /load view."""

    def __init__(self, name: str, policy: str, clock: FakeClock, seed: int) -> None:
        self.name = name
        self.clock = clock
        self.upstreams = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
        tier = TierConfig(slow_start=0, scrape_interval=1.0)
        self.policy: Policy = create_policy(
            policy, self.upstreams, random.Random(seed), tier=tier, clock=clock
        )
        self.exchange = Peering(
            [Address.unix(f"/tmp/{'b' if name == 'a' else 'a'}.admin.sock")],
            lambda: self.upstreams,
            SETTINGS,
            Metrics("balancer", name),
            clock=clock,
        )
        self.view = LoadView(
            name,
            "balancer",
            lambda: self.upstreams,
            lambda: sum(u.in_flight for u in self.upstreams),
            clock=clock,
        )

    def route(self) -> str:
        """Pick a proxy for one long request: it stays in flight."""
        upstream = self.policy.pick()
        assert upstream is not None
        upstream.in_flight += 1
        upstream.requests += 1
        return upstream.name

    def hear(self, other: Balancer) -> None:
        """Receive ``other``'s view now, as a poll of its /load would."""
        view = PeerView.parse(json.loads(json.dumps(other.view())), decay=2.0)
        self.exchange.accept(self.exchange.peers[0], view)

    def get(self, name: str) -> Upstream:
        return next(u for u in self.upstreams if u.name == name)


def totals(*balancers: Balancer) -> dict[str, int]:
    """Requests in flight to each proxy from all the balancers together."""
    return {p: sum(b.get(p).in_flight for b in balancers) for p in PROXIES}


def pair(policy: str) -> tuple[Balancer, Balancer, FakeClock]:
    clock = FakeClock()
    return Balancer("a", policy, clock, seed=1), Balancer("b", policy, clock, seed=2), clock


def burst(a: Balancer, b: Balancer, requests: int, *, exchange_every: int | None) -> None:
    """``requests`` arrivals taking turns at ``a`` and ``b``; views swapped every few."""
    for i in range(requests):
        (a if i % 2 == 0 else b).route()
        if exchange_every is not None and (i + 1) % exchange_every == 0:
            a.hear(b)
            b.hear(a)


# -- combination logic ------------------------------------------------------------------


def recovering_proxy(a: Balancer, b: Balancer, clock: FakeClock) -> None:
    """proxy-0 carries 4 requests from each balancer (and says so); proxy-1 is idle.

    The situation after proxy-1 restarted: its fresh report says 0 in flight, proxy-0's
    says 8. Both proxies answer equally fast.
    """
    for balancer in (a, b):
        for upstream in balancer.upstreams:
            upstream.ewma, upstream.ewma_at = 0.01, clock.now
            upstream.reported_at = clock.now
        balancer.get("proxy-0").in_flight = 4
        balancer.get("proxy-0").reported_in_flight = 8
        balancer.get("proxy-1").reported_in_flight = 0


@pytest.mark.parametrize("exchange_every", [1, 2, 4])
def test_p2c_with_the_exchange_two_balancers_spread_a_burst(exchange_every: int) -> None:
    a, b, clock = pair("p2c_ewma")
    recovering_proxy(a, b, clock)
    a.hear(b)
    b.hear(a)
    burst(a, b, 16, exchange_every=exchange_every)
    load = totals(a, b)
    # 24 in flight in all: 12 each, give or take what a view's lag lets through.
    assert abs(load["proxy-0"] - load["proxy-1"]) <= exchange_every, load
    if exchange_every == 1:  # views swapped after the last pick: each sees the other exactly
        assert a.get("proxy-1").peer_in_flight == b.get("proxy-1").in_flight


def test_p2c_without_the_exchange_two_balancers_herd_onto_the_idle_looking_proxy() -> None:
    a, b, clock = pair("p2c_ewma")
    recovering_proxy(a, b, clock)
    burst(a, b, 16, exchange_every=None)
    # Each balancer alone fills proxy-1 up to proxy-0's reported 8: together, twice over.
    assert totals(a, b) == {"proxy-0": 8, "proxy-1": 16}


@pytest.mark.parametrize("policy", ["least_outstanding", "p2c_ewma"])
@pytest.mark.parametrize("exchanged", [True, False])
def test_a_peers_backlog_steers_the_other_balancer(policy: str, exchanged: bool) -> None:
    # a took 8 long requests while proxy-1 was out; now b gets the next 8.
    a, b, _ = pair(policy)
    a.get("proxy-1").available = b.get("proxy-1").available = False
    for _ in range(8):
        assert a.route() == "proxy-0"
    a.get("proxy-1").available = b.get("proxy-1").available = True
    if exchanged:
        b.hear(a)
    picks = [b.route() for _ in range(8)]
    if exchanged:
        assert picks == ["proxy-1"] * 8
        assert totals(a, b) == {"proxy-0": 8, "proxy-1": 8}
    else:
        assert sorted(picks) == ["proxy-0"] * 4 + ["proxy-1"] * 4
        assert totals(a, b) == {"proxy-0": 12, "proxy-1": 4}


def test_round_robin_ignores_the_peers() -> None:
    a, b, _ = pair("round_robin")
    for _ in range(8):
        a.route()
    b.hear(a)
    b.get("proxy-0").peer_in_flight = 100.0
    assert [b.route() for _ in range(4)] == ["proxy-0", "proxy-1", "proxy-0", "proxy-1"]


def test_stale_views_fade_then_are_ignored() -> None:
    a, b, clock = pair("least_outstanding")
    for _ in range(6):
        a.get("proxy-0").in_flight += 1
    b.hear(a)
    upstream = b.get("proxy-0")
    assert upstream.peer_in_flight == 6
    clock.advance(SETTINGS.stale_after / 2)  # still counts fully
    b.exchange.fold()
    assert upstream.peer_in_flight == 6
    clock.advance(SETTINGS.stale_after / 4)  # halfway through the fade
    b.exchange.fold()
    assert upstream.peer_in_flight == pytest.approx(3.0)
    clock.advance(SETTINGS.stale_after / 4 + 0.001)  # past stale_after: ignored
    b.exchange.fold()
    assert upstream.peer_in_flight == 0.0
    assert not b.exchange.fresh(b.exchange.peers[0])
    # b routes on its own view again: proxy-0 and proxy-1 take turns.
    assert sorted(b.route() for _ in range(4)) == ["proxy-0"] * 2 + ["proxy-1"] * 2
    # A new view counts at once.
    b.hear(a)
    assert upstream.peer_in_flight == 6


def test_no_double_counting_of_a_report_that_includes_the_peers() -> None:
    a, b, clock = pair("p2c_ewma")
    for balancer in (a, b):
        for upstream in balancer.upstreams:
            upstream.ewma, upstream.ewma_at = 0.01, clock.now
    a.get("proxy-0").in_flight = 3
    b.get("proxy-0").in_flight = 2
    b.hear(a)
    upstream = b.get("proxy-0")
    policy = b.policy
    assert isinstance(policy, Policy) and hasattr(policy, "cost")
    cost: Callable[[Upstream, float], float] = policy.cost
    assert cost(upstream, clock.now) == pytest.approx(0.01 * (2 + 3 + 1))
    # The proxy's own report counts both balancers' requests: a max, not a sum.
    upstream.reported_in_flight, upstream.reported_at = 5, clock.now
    assert cost(upstream, clock.now) == pytest.approx(0.01 * (5 + 1))
    upstream.reported_in_flight = 9  # someone else's requests too
    assert cost(upstream, clock.now) == pytest.approx(0.01 * (9 + 1))


def test_a_peer_exports_only_its_own_load() -> None:
    a, b, _ = pair("least_outstanding")
    a.get("proxy-0").in_flight = 5
    b.hear(a)
    assert b.get("proxy-0").peer_in_flight == 5
    a.hear(b)  # b's view must not carry a's 5 back to a
    assert a.get("proxy-0").peer_in_flight == 0
    assert b.view()["upstreams"][0]["in_flight"] == 0


def test_peer_latency_is_the_prior_of_an_upstream_without_samples() -> None:
    a, b, clock = pair("p2c_ewma")
    a.policy.observe(a.get("proxy-1"), 0.2, clock.now)
    a.policy.observe(a.get("proxy-0"), 0.01, clock.now)
    b.hear(a)
    assert b.get("proxy-1").peer_latency == pytest.approx(0.2)
    # b never sent anything: it trusts a's measurements over a blind prior.
    assert [b.route() for _ in range(3)] == ["proxy-0"] * 3


# -- protocol -----------------------------------------------------------------------------


def test_load_view_numbers_each_answer_and_reports_the_gate() -> None:
    clock = FakeClock()
    ups = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
    ups[0].in_flight, ups[0].requests, ups[0].ewma, ups[0].ewma_at = 2, 10, 0.02, clock.now - 1
    ups[1].ejected_until, ups[1].available = clock.now + 5, False
    view = LoadView("balancer-0", "balancer", lambda: ups, lambda: 2, 0.25, clock=clock)
    first, second = view(), view()
    assert (first["seq"], second["seq"]) == (1, 2)
    assert first["pid"] == os.getpid() and first["name"] == "balancer-0"
    assert first["in_flight"] == 2 and first["interval"] == 0.25
    p0, p1 = first["upstreams"]
    assert p0 == {
        "name": "proxy-0",
        "in_flight": 2,
        "requests": 10,
        "errors": 0,
        "latency_ewma": 0.02,
        "latency_age": 1.0,
        "available": True,
        "healthy": True,
        "ejected": False,
        "draining": False,
    }
    assert p1["latency_age"] is None and p1["ejected"] and not p1["available"]
    parsed = PeerView.parse(first, decay=1.0)
    assert parsed.upstreams["proxy-0"].latency == pytest.approx(0.02 * 0.36787944, rel=1e-6)
    assert parsed.upstreams["proxy-1"].latency == 0.0


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"name": "x"},
        {"name": "x", "pid": 1, "seq": 1, "in_flight": 0, "upstreams": [{"name": "p"}]},
        {"name": "x", "pid": 1, "seq": 1, "in_flight": 0, "upstreams": ["p"]},
        {
            "name": "x",
            "pid": 1,
            "seq": 1,
            "in_flight": 0,
            "upstreams": [
                {
                    "name": "p",
                    "in_flight": -1,
                    "requests": 0,
                    "latency_ewma": 0,
                    "latency_age": 0,
                    "available": True,
                }
            ],
        },
    ],
)
def test_a_malformed_view_is_refused(body: Any) -> None:
    with pytest.raises(ViewError):
        PeerView.parse(body, decay=2.0)


def test_peer_labels() -> None:
    assert peer_label(Address.unix("/run/lb/balancer-1.admin.sock")) == "balancer-1"
    assert peer_label(Address("tcp", host="10.0.0.2", port=9001)) == "10.0.0.2:9001"


def test_exchange_config_is_checked() -> None:
    with pytest.raises(ConfigError, match=r"stale_after: expected more than interval"):
        load(None, {"balancer.exchange.interval": "1s", "balancer.exchange.stale_after": "1s"})
    with pytest.raises(ConfigError, match=r"interval: expected a duration above 0"):
        load(None, {"balancer.exchange.interval": 0})
    with pytest.raises(ConfigError, match=r"balancer\.exchange\.enabled"):
        load(None, {"balancer.exchange.enabled": "sometimes"})
    with pytest.raises(ConfigError, match=r"proxy\.exchange: unknown field"):
        load(None, {"proxy.exchange.enabled": False})
    assert load(None).balancer.exchange.enabled


# -- polling over HTTP ---------------------------------------------------------------------


class FakePeer:
    """A peer's admin socket: answers /load with a view, or hangs, or fails."""

    def __init__(self, view: Callable[[], dict[str, Any]]) -> None:
        self.view = view
        self.mode = "answer"
        self.release = asyncio.Event()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path != "/load":
            return web.Response(status=404)
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "error":
            return web.Response(status=500)
        if self.mode == "garbage":
            return web.Response(text="not json")
        return web.json_response(self.view())


def series(metrics: Metrics, name: str, **labels: str) -> float:
    text = generate_latest(metrics.registry).decode()
    for sample, sample_labels, value in parse(text):
        if sample == name and all(sample_labels.get(k) == v for k, v in labels.items()):
            return value
    raise KeyError(name)


async def test_polls_count_failures_log_once_and_recover(
    unix_servers: UnixServers, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    other = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
    other[1].in_flight = 4
    peer_app = FakePeer(LoadView("balancer-1", "balancer", lambda: other, lambda: 4, clock=clock))
    address = await unix_servers.serve(peer_app.handle, "balancer-1.admin")
    ours = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
    metrics = Metrics("balancer", "balancer-0")
    exchange = Peering([address], lambda: ours, SETTINGS, metrics, clock=clock)
    peer = exchange.peers[0]
    caplog.set_level(logging.INFO, logger="lbstack")
    try:
        assert await exchange.poll(peer)
        assert ours[1].peer_in_flight == 4 and ours[0].peer_in_flight == 0
        assert series(metrics, "lbstack_peer_up", peer="balancer-1") == 1.0
        assert series(
            metrics, "lbstack_upstream_peer_in_flight_requests", upstream="proxy-1"
        ) == pytest.approx(4.0)
        status = exchange.status()[0]
        assert status["name"] == "balancer-1" and status["up"] and status["seq"] == 1
        assert status["upstreams"]["proxy-1"]["in_flight"] == 4

        for mode in ("hang", "error", "garbage", "hang"):
            peer_app.mode = mode
            assert not await exchange.poll(peer)
        assert series(metrics, "lbstack_peer_exchange_errors_total", peer="balancer-1") == 4
        assert "no answer within 0.2 s" in str(exchange.status()[0]["last_error"])
        stopped = [r for r in caplog.records if "stopped answering" in r.getMessage()]
        assert len(stopped) == 1, "a peer going down is logged once"
        # Still within stale_after: its last view counts; past it, it is ignored.
        assert ours[1].peer_in_flight == 4
        clock.advance(SETTINGS.stale_after + 0.01)
        exchange.fold()
        assert ours[1].peer_in_flight == 0
        assert series(metrics, "lbstack_peer_up", peer="balancer-1") == 0.0
        assert not exchange.status()[0]["up"]

        peer_app.mode = "answer"
        peer_app.release.set()
        other[1].in_flight = 1
        assert await exchange.poll(peer)
        assert ours[1].peer_in_flight == 1
        answers = [r for r in caplog.records if "answers" in r.getMessage()]
        assert len(answers) == 2, "first contact and the recovery"
    finally:
        peer_app.release.set()
        await exchange.close()
    assert ours[1].peer_in_flight == 0, "a closed exchange leaves routing to our own figures"


async def test_the_background_loop_polls_every_peer(unix_servers: UnixServers) -> None:
    clock = FakeClock()
    views = {}
    addresses = []
    for name in ("balancer-1", "balancer-2"):
        ups = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
        ups[0].in_flight = 2
        view = LoadView(name, "balancer", partial(tuple, ups), lambda: 2, clock=clock)
        views[name] = FakePeer(view)
        addresses.append(await unix_servers.serve(views[name].handle, f"{name}.admin"))
    ours = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
    settings = ExchangeConfig(interval=0.02, timeout=0.5, stale_after=1.0)
    exchange = Peering(addresses, lambda: ours, settings, Metrics("balancer", "b0"), clock=clock)
    await exchange.start()
    try:

        async def both_heard() -> bool:
            return ours[0].peer_in_flight == 4 and all(p["seq"] for p in exchange.status())

        await until(both_heard, "both peers' views folded in", timeout=10)
        seqs = [p["seq"] for p in exchange.status()]

        async def polled_again() -> bool:
            return all(p["seq"] > s for p, s in zip(exchange.status(), seqs, strict=True))

        await until(polled_again, "the next round of polls", timeout=10)
    finally:
        await exchange.close()


# -- a router's admin app ---------------------------------------------------------------


def balancer_spec(peers: list[Address], **exchange: Any) -> tuple[ChildSpec, BalancerConfig]:
    config = Config.model_validate({"balancer": {"exchange": exchange}})
    spec = ChildSpec(
        name="balancer-0",
        role="balancer",
        listen_fds=(),
        admin_fd=-1,
        upstreams=tuple(
            UpstreamSpec(name=p, address=Address.unix(f"/tmp/{p}.sock")) for p in PROXIES
        ),
        peers=tuple(peers),
        config=config,
    )
    return spec, config.balancer


async def test_a_balancer_serves_load_and_shows_its_peers(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers
) -> None:
    other = [Upstream(p, Address.unix(f"/tmp/{p}.sock")) for p in PROXIES]
    other[0].in_flight = 3
    peer = FakePeer(LoadView("balancer-1", "balancer", lambda: other, lambda: 3))
    address = await unix_servers.serve(peer.handle, "balancer-1.admin")
    spec, tier = balancer_spec([address], interval=0.05, stale_after=1.0)
    admin = await aiohttp_client(create_router(spec, tier, edge=True).admin)

    async with admin.get("/load") as response:
        view = await response.json()
    assert view["name"] == "balancer-0" and view["interval"] == 0.05
    assert [u["name"] for u in view["upstreams"]] == list(PROXIES)

    async def heard() -> bool:
        async with admin.get("/status") as response:
            status = await response.json()
        peers = status["peers"]
        assert [p["name"] for p in peers] == ["balancer-1"]
        in_flight = {u["name"]: u["peer_in_flight"] for u in status["upstreams"]}
        return bool(peers[0]["up"]) and in_flight == {"proxy-0": 3, "proxy-1": 0}

    await until(heard, "balancer-1's load in balancer-0's status", timeout=10)
    async with admin.get("/metrics") as response:
        metrics = await response.text()
    assert 'lbstack_peer_up{instance="balancer-0",peer="balancer-1",role="balancer"} 1.0' in (
        metrics
    )


async def test_the_exchange_can_be_turned_off(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers
) -> None:
    spec, tier = balancer_spec([Address.unix("/tmp/nobody.admin.sock")], enabled=False)
    admin = await aiohttp_client(create_router(spec, tier, edge=True).admin)
    async with admin.get("/status") as response:
        status = await response.json()
    assert "peers" not in status and "peer_in_flight" not in status["upstreams"][0]
    async with admin.get("/metrics") as response:
        assert "lbstack_peer_up" not in await response.text()
    async with admin.get("/load") as response:
        assert response.status == 200  # still served: a peer with it on may read it


# -- a real stack ----------------------------------------------------------------------------

# Short enough that a stopped peer is ignored well before the supervisor's liveness
# probe (3 missed /healthz, 2 s apart) kills it; the timeout leaves room for a busy box.
STACK_CONFIG = """
servers_per_proxy = 1
[balancer.exchange]
interval = "100ms"
timeout = "500ms"
stale_after = "1s"
[server.simulation]
latency = "20ms"
"""


async def load_of(stack: RunningStack, name: str) -> LoadReport:
    return await stack.admin(name).load()


async def peer_of(stack: RunningStack, name: str) -> PeerStatus:
    [peer] = (await router_status(stack, name)).peers
    return peer


def fresh_connections(stack: RunningStack) -> aiohttp.ClientSession:
    """A session that opens a new connection for each request (so that each balancer
    gets its share, and a stopped one holds none)."""
    connector = aiohttp.UnixConnector(path=stack.socket, force_close=True)
    return aiohttp.ClientSession("http://localhost", connector=connector)


async def get(client: aiohttp.ClientSession) -> str:
    """One GET's status."""
    async with client.get("/") as response:
        await response.read()
        return str(response.status)


async def fresh_requests(stack: RunningStack, count: int) -> list[str]:
    """``count`` GETs, one after another, each on a new connection: their statuses."""
    async with fresh_connections(stack) as client:
        return [await get(client) for _ in range(count)]


BALANCERS = ("balancer-0", "balancer-1")
EACH_SEEING_THE_OTHER = (("balancer-0", "balancer-1"), ("balancer-1", "balancer-0"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[RunningStack]:
    """One stack of two balancers for the tests below, which run on the module's loop
    and are marked integration by hand (the stack is started here, not in them)."""
    async with running_stack("--balancers", "2", config=STACK_CONFIG) as stack:
        yield stack


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_two_balancers_see_each_others_load_under_traffic(stack: RunningStack) -> None:
    pids = {n: (await stack.component(n)).pid for n in BALANCERS}

    async def both_busy() -> bool:
        for name in BALANCERS:
            view = await load_of(stack, name)
            if sum(u.requests for u in view.upstreams) < 20:
                return False
        return True

    async with (
        fresh_connections(stack) as client,
        Load(partial(get, client), clients=4, bound=2000) as load,
    ):
        # Both balancers take a share of the connections, and each sees the other.
        await until(both_busy, "both balancers serving", timeout=30)
        for name, other in EACH_SEEING_THE_OTHER:
            seen = await peer_of(stack, name)
            after = await load_of(stack, other)
            assert seen.name == other and seen.up and seen.pid == pids[other]
            assert seen.age is not None and seen.age <= 1.0
            for proxy, figures in seen.upstreams.items():
                own = {u.name: u for u in after.upstreams}[proxy]
                assert figures.requests <= own.requests, (proxy, figures, own)
            assert seen.seq is not None and seen.seq < after.seq  # served earlier
    assert set(load.seen) == {"200"}


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_at_rest_each_balancer_sees_exactly_the_others_figures(stack: RunningStack) -> None:
    assert await fresh_requests(stack, 20) == ["200"] * 20
    for name, other in EACH_SEEING_THE_OTHER:

        async def matches(name: str = name, other: str = other) -> bool:
            own = {u.name: u for u in (await load_of(stack, other)).upstreams}
            seen = (await peer_of(stack, name)).upstreams
            return set(seen) == set(own) and all(
                seen[p].requests == own[p].requests and seen[p].in_flight == 0 for p in own
            )

        await until(matches, f"{name}'s view of {other} to match it", timeout=10)
    status = await router_status(stack, "balancer-0")
    assert all(u.peer_in_flight == 0 for u in status.upstreams)
    metrics = await stack.admin("balancer-0").metrics()
    assert 'lbstack_peer_up{instance="balancer-0",peer="balancer-1",role="balancer"} 1.0' in (
        metrics
    )


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_a_stopped_peer_is_ignored_once_stale_and_counts_again_when_back(
    stack: RunningStack,
) -> None:
    # Requests keep succeeding meanwhile.
    stopped = await stack.kill("balancer-1", signal.SIGSTOP)
    try:

        async def ignored() -> bool:
            return not (await peer_of(stack, "balancer-0")).up

        await until(ignored, "balancer-1's view going stale", timeout=5)
        statuses = await fresh_requests(stack, 20)
        peer = await peer_of(stack, "balancer-0")
        assert peer.errors >= 1 and peer.weight == 0
        status = await router_status(stack, "balancer-0")
        assert all(u.peer_in_flight == 0 for u in status.upstreams)
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert statuses == ["200"] * 20
    seq = peer.seq or 0

    async def back() -> bool:
        again = await peer_of(stack, "balancer-0")
        return again.up and again.seq is not None and again.seq > seq

    await until(back, "balancer-1's view to count again", timeout=10)
    assert (await stack.component("balancer-1")).pid == stopped
    assert "peer balancer-1 stopped answering" in stack.logs()


def test_the_routing_view_shows_the_peers() -> None:
    upstream = {
        "name": "proxy-0",
        "weight": 1,
        "in_flight": 2,
        "peer_in_flight": 3.5,
        "requests": 10,
        "errors": 0,
        "latency_ewma": 0.01,
        "cost": 0.05,
        "reported": {"age": None},
        "available": True,
    }
    status: dict[str, Any] = {
        "name": "balancer-0",
        "policy": "p2c_ewma",
        "in_flight": 2,
        "queued": 0,
        "retry_budget": 100,
        "upstreams": [upstream],
        "peers": [
            {"name": "balancer-1", "up": True, "age": 0.08, "in_flight": 3.5, "errors": 0},
            {"name": "balancer-2", "up": False, "age": 2.5, "in_flight": 1.0, "errors": 7},
        ],
    }
    console = Console(width=200, record=True)
    console.print(render_router(status))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "PEERS" in text and " 3.5 " in text
    assert "balancer-1 up (0.08s old, 3.5 in flight)" in text
    assert "balancer-2 IGNORED (2.5s old, 7 errors)" in text
    del status["peers"]  # a proxy, or a lone balancer
    console.print(render_router(status))
    assert "PEERS" not in console.export_text()
