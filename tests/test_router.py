"""A router's admin API for upstreams that come and go: add, drain, undrain, remove."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pytest_aiohttp import AiohttpClient

from lbstack.address import Address
from lbstack.component import ChildSpec, UpstreamSpec
from lbstack.config import Config, TierConfig
from lbstack.forwarding import FORWARDER, Forwarder
from lbstack.metrics import Metrics
from lbstack.routing import POLICIES
from lbstack.tiers.router import create_forwarder, create_router
from tests.conftest import SHUTDOWN_TIMEOUT, UnixServers
from tests.load import Load

WAIT = 10.0  # the longest any single step of a test may take
# What every test's proxy tier starts from: no background checks or scrapes (they would
# open connections of their own), one try per request so that no failure hides behind
# a retry, and round robin so that every upstream takes its turn.
BASE_TIER: dict[str, Any] = {
    "policy": "round_robin",
    "health": {"interval": 0},
    "scrape_interval": 0,
    "retries": {"attempts": 1},
}


@dataclass
class Connections:
    """What an upstream server saw of its connections."""

    opened: int = 0
    closed: int = 0
    errors: list[BaseException] = field(default_factory=list)  # not a clean close


class FakeServer:
    """An upstream: answers its name, holds ``/hold`` until released, counts connections.

    ``/healthz`` answers ``health`` and is counted apart; ``admin`` serves ``/readyz``
    and ``/metrics`` on a socket of its own when the upstream is given one.
    """

    def __init__(self, name: str, *, holds: bool = True, delay: float = 0.0) -> None:
        self.name = name
        self.holds = holds
        self.delay = delay
        self.served = 0
        self.held = 0
        self.health = 200
        self.health_checks = 0
        self.admin_paths: list[str] = []
        self.release = asyncio.Event()
        self.connections = Connections()
        self.metrics = Metrics("server", name)
        self.runner: web.ServerRunner | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.path == "/healthz":
            self.health_checks += 1
            return web.Response(status=self.health, text="health")
        self.served += 1
        if request.path == "/hold" and self.holds:
            self.held += 1
            await self.release.wait()
        elif self.delay:
            await asyncio.sleep(self.delay)  # wait-ok: the fake upstream's own latency
        return web.Response(text=self.name)

    async def handle_admin(self, request: web.BaseRequest) -> web.StreamResponse:
        self.admin_paths.append(request.path)
        if request.path == "/metrics":
            body = generate_latest(self.metrics.registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
        return web.json_response({"status": "ready"})

    def server_class(self) -> type[web.Server]:
        """A ``web.Server`` that counts this upstream's connections."""
        seen = self.connections

        class Counting(web.Server):
            def connection_made(
                self, handler: RequestHandler, transport: asyncio.Transport
            ) -> None:
                super().connection_made(handler, transport)
                seen.opened += 1

            def connection_lost(
                self, handler: RequestHandler, exc: BaseException | None = None
            ) -> None:
                super().connection_lost(handler, exc)
                seen.closed += 1
                if exc is not None:
                    seen.errors.append(exc)

        return Counting

    async def stop(self) -> None:
        """Stop serving, as the supervisor stops a removed server."""
        runner, self.runner = self.runner, None
        if runner is not None:
            await runner.cleanup()


async def serve(
    servers: UnixServers, fake: FakeServer, *, socket: str = "", admin: bool = False
) -> UpstreamSpec:
    """Serve ``fake`` on ``<socket or its name>.sock`` (and an admin socket) until teardown."""
    runner = web.ServerRunner(
        fake.server_class()(fake.handle, handler_cancellation=True),
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    await runner.setup()
    fake.runner = runner
    servers.stack.push_async_callback(fake.stop)
    path = str(servers.directory / f"{socket or fake.name}.sock")
    await web.UnixSite(runner, path).start()
    admin_address = None
    if admin:
        admin_address = await servers.serve(fake.handle_admin, f"{fake.name}.admin")
    return UpstreamSpec(name=fake.name, address=Address.unix(path), admin=admin_address)


def body(spec: UpstreamSpec) -> dict[str, Any]:
    """The ``POST /upstreams`` body that adds ``spec``."""
    return {
        "name": spec.name,
        "address": str(spec.address),
        "admin": None if spec.admin is None else str(spec.admin),
        "health_path": spec.health_path,
    }


@dataclass
class Router:
    """A proxy from ``create_router``: its admin app under a test client, its data socket."""

    forwarder: Forwarder
    admin: TestClient[web.Request, web.Application]
    data: aiohttp.ClientSession

    async def get(self, path: str = "/") -> tuple[int, str]:
        """One request through the data socket: its status and the server that served it."""
        async with self.data.get(f"http://proxy{path}") as response:
            await response.read()
            return response.status, response.headers.get("X-Served-By", "")

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        async with self.admin.request(method, path, **kwargs) as response:
            assert response.content_type == "application/json"
            return response.status, await response.json()

    async def upstreams(self) -> dict[str, dict[str, Any]]:
        status, listed = await self.call("GET", "/upstreams")
        assert status == 200
        return {u["name"]: u for u in listed["upstreams"]}

    async def metrics(self) -> str:
        async with self.admin.get("/metrics") as response:
            return await response.text()

    async def served_by(self, name: str, path: str = "/") -> None:
        """Send requests until ``name`` serves one; each must succeed."""
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            status, server = await self.get(path)
            assert status == 200
            if server == name:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{name} never served"


class MakeRouter(Protocol):
    async def __call__(self, upstreams: list[UpstreamSpec], **tier: Any) -> Router: ...


@pytest.fixture
def make_router(aiohttp_client: AiohttpClient, unix_servers: UnixServers) -> MakeRouter:
    async def make(upstreams: list[UpstreamSpec], **tier: Any) -> Router:
        spec = ChildSpec(
            name="proxy-0",
            role="proxy",
            group=0,
            listen_fds=(),
            admin_fd=-1,
            upstreams=tuple(upstreams),
            config=Config(),
        )
        component = create_router(spec, TierConfig.model_validate(BASE_TIER | tier), edge=False)
        admin = await aiohttp_client(component.admin)  # starts the forwarder
        address = await unix_servers.serve_server(component.data_server(), "proxy-0")
        data = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address.path))
        unix_servers.stack.push_async_callback(data.close)
        return Router(component.admin[FORWARDER], admin, data)

    return make


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds, failing after WAIT seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # wait-ok: polling with a deadline


def tasks_named(name: str) -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == name and not t.done()]


# -- adding ------------------------------------------------------------------------------


async def test_an_added_upstream_takes_traffic_with_slow_start(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0"), FakeServer("server-0-1")
    router = await make_router([await serve(unix_servers, s0)], weights={"server-0-1": 2})
    spec = await serve(unix_servers, s1)

    status, view = await router.call("POST", "/upstreams", json=body(spec))
    assert status == 201, view
    assert (view["name"], view["address"], view["admin"]) == (spec.name, str(spec.address), None)
    assert (view["in_flight"], view["draining"], view["available"]) == (0, False, True)
    assert view["healthy"] is True
    assert view["weight"] == 2  # from tier.weights
    # Slow start: it takes a small, growing share at first.
    assert 0 < view["slow_start_remaining_seconds"] <= 5
    assert 0.2 <= view["effective_weight"] < 2

    listed = await router.upstreams()
    assert list(listed) == ["server-0-0", "server-0-1"]
    assert listed["server-0-1"]["slow_start_remaining_seconds"] > 0
    status, one = await router.call("GET", "/upstreams/server-0-1")
    assert (status, one["name"]) == (200, "server-0-1")
    status, full = await router.call("GET", "/status")
    assert [u["name"] for u in full["upstreams"]] == ["server-0-0", "server-0-1"]

    await router.served_by("server-0-1")
    assert 'upstream="server-0-1"' in await router.metrics()


async def test_adding_an_existing_name_is_a_conflict(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0 = FakeServer("server-0-0")
    spec = await serve(unix_servers, s0)
    router = await make_router([spec])
    status, answer = await router.call("POST", "/upstreams", json=body(spec))
    assert status == 409
    assert answer["error"] == "upstream server-0-0 already exists"
    assert list(await router.upstreams()) == ["server-0-0"]


@pytest.mark.parametrize(
    ("sent", "field", "expected", "found"),
    [
        (b"{not json", "(body)", "a JSON object", "not JSON"),
        (b'["server-0-1"]', "(body)", "a JSON object", "a list"),
        (b'{"name": "server-0-1"}', "address", "a value (required)", "nothing"),
        (
            b'{"name": "server-0-1", "address": "http://x"}',
            "address",
            "'unix:/path', 'tcp://host:port' or 'https://host:port'",
            "'http://x'",
        ),
        (b'{"name": 7, "address": "unix:/tmp/x.sock"}', "name", "a valid string", "7"),
        (b'{"name": "a/b", "address": "unix:/tmp/x.sock"}', "name", "a name of", "'a/b'"),
        (
            b'{"name": "s", "address": "unix:/tmp/x.sock", "health_path": "healthz"}',
            "health_path",
            "a path starting with '/'",
            "'healthz'",
        ),
        (
            b'{"name": "s", "address": "unix:/tmp/x.sock", "weight": 2}',
            "weight",
            "one of the fields name, address, admin, health_path",
            "an unknown field",
        ),
    ],
)
async def test_a_malformed_upstream_is_refused_naming_the_field(
    unix_servers: UnixServers,
    make_router: MakeRouter,
    sent: bytes,
    field: str,
    expected: str,
    found: str,
) -> None:
    router = await make_router([await serve(unix_servers, FakeServer("server-0-0"))])
    status, answer = await router.call(
        "POST", "/upstreams", data=sent, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    problems = {p["field"]: p for p in answer["problems"]}
    assert field in problems, answer
    assert problems[field]["expected"].startswith(expected)
    assert problems[field]["found"].startswith(found)
    assert answer["error"].startswith("invalid upstream: ")
    assert field in answer["error"]
    assert list(await router.upstreams()) == ["server-0-0"]


async def test_the_data_socket_has_no_admin_routes(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0"), FakeServer("server-0-1")
    router = await make_router([await serve(unix_servers, s0)])
    spec = await serve(unix_servers, s1)
    async with router.data.post("http://proxy/upstreams", json=body(spec)) as response:
        assert response.status == 200
        assert response.headers["X-Served-By"] == "server-0-0"  # forwarded, like any path
    assert [u.name for u in router.forwarder.upstreams] == ["server-0-0"]


async def test_an_added_upstream_frees_requests_queued_at_the_limit(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0"), FakeServer("server-0-1")
    router = await make_router(
        [await serve(unix_servers, s0)],
        limits={"max_in_flight_per_upstream": 1, "queue_size": 4},
        timeouts={"queue": WAIT * 2},
    )
    held = asyncio.create_task(router.get("/hold"))
    await eventually(lambda: s0.held == 1, "the first request to be held")
    queued = asyncio.create_task(router.get())
    await eventually(lambda: router.forwarder.status()["queued"] == 1, "a queued request")

    status, _ = await router.call("POST", "/upstreams", json=body(await serve(unix_servers, s1)))
    assert status == 201
    async with asyncio.timeout(WAIT):
        assert await queued == (200, "server-0-1")  # well before the queue timeout
    s0.release.set()
    async with asyncio.timeout(WAIT):
        assert await held == (200, "server-0-0")


# -- draining ----------------------------------------------------------------------------


async def test_drain_stops_new_requests_lets_in_flight_finish_and_closes_the_pool(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0", holds=False), FakeServer("server-0-1")
    router = await make_router([await serve(unix_servers, s0), await serve(unix_servers, s1)])
    # A long request on server-0-1 ...
    holds: list[asyncio.Task[tuple[int, str]]] = []
    while not s1.held:
        holds.append(asyncio.create_task(router.get("/hold")))
        await eventually(lambda: s0.served + s1.held == len(holds), "the request to land")
    held = holds.pop()
    assert [await t for t in holds] == [(200, "server-0-0")] * len(holds)
    # ... and an idle pooled connection to it, beside the busy one.
    await router.served_by("server-0-1")
    assert (s1.connections.opened, s1.connections.closed) == (2, 0)

    status, view = await router.call("POST", "/upstreams/server-0-1/drain")
    assert status == 200
    assert (view["draining"], view["available"], view["in_flight"]) == (True, False, 1)
    await eventually(lambda: s1.connections.closed == 1, "the idle connection to close")

    served = s1.served
    for _ in range(10):
        assert await router.get() == (200, "server-0-0")
    assert s1.served == served, "a draining upstream got a new request"

    s1.release.set()
    async with asyncio.timeout(WAIT):
        assert await held == (200, "server-0-1")
    # The connection that served it is not pooled again: closed too, cleanly.
    await eventually(lambda: s1.connections.closed == 2, "the busy connection to close")
    assert s1.connections.errors == []
    listed = await router.upstreams()
    assert listed["server-0-1"]["in_flight"] == 0
    assert listed["server-0-1"]["draining"] is True
    status, again = await router.call("POST", "/upstreams/server-0-1/drain")
    assert (status, again["draining"]) == (200, True)


async def test_undrain_brings_traffic_back_with_slow_start(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0"), FakeServer("server-0-1")
    router = await make_router([await serve(unix_servers, s0), await serve(unix_servers, s1)])
    await router.served_by("server-0-1")
    status, _ = await router.call("POST", "/upstreams/server-0-1/drain")
    assert status == 200
    for _ in range(4):
        assert await router.get() == (200, "server-0-0")

    status, view = await router.call("POST", "/upstreams/server-0-1/undrain")
    assert status == 200
    assert (view["draining"], view["available"]) == (False, True)
    assert view["slow_start_remaining_seconds"] > 0
    await router.served_by("server-0-1")
    assert s1.connections.errors == []


# -- removing ----------------------------------------------------------------------------


async def test_remove_needs_a_drain_and_unknown_names_are_404(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    router = await make_router([await serve(unix_servers, FakeServer("server-0-0"))])
    status, answer = await router.call("DELETE", "/upstreams/server-0-0")
    assert status == 409
    assert "drain it first" in answer["error"]
    assert list(await router.upstreams()) == ["server-0-0"]
    for method, path in [
        ("GET", "/upstreams/server-0-9"),
        ("DELETE", "/upstreams/server-0-9"),
        ("POST", "/upstreams/server-0-9/drain"),
        ("POST", "/upstreams/server-0-9/undrain"),
    ]:
        status, answer = await router.call(method, path)
        assert (status, answer) == (404, {"error": "no upstream server-0-9"}), (method, path)


async def test_remove_forgets_the_upstream_its_checks_scrapes_and_series(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1 = FakeServer("server-0-0"), FakeServer("server-0-1")
    router = await make_router(
        [await serve(unix_servers, s0)],
        health={"interval": 0.02},
        scrape_interval=0.02,
    )
    spec = await serve(unix_servers, s1, admin=True)
    status, _ = await router.call("POST", "/upstreams", json=body(spec))
    assert status == 201
    # Its own health checks (on its admin's /readyz) and scrapes (its /metrics).
    await eventually(
        lambda: {"/readyz", "/metrics"} <= set(s1.admin_paths), "checks and scrapes of it"
    )
    assert tasks_named("health-check server-0-1")
    await router.served_by("server-0-1")
    lines = (await router.metrics()).splitlines()
    for series in (
        "lbstack_upstream_requests_total",
        "lbstack_upstream_in_flight_requests",
        "lbstack_upstream_healthy",
        "lbstack_upstream_ejections_total",
        "lbstack_scrape_errors_total",
    ):
        assert any(
            line.startswith(f"{series}{{") and 'upstream="server-0-1"' in line for line in lines
        ), series

    assert (await router.call("POST", "/upstreams/server-0-1/drain"))[0] == 200
    status, view = await router.call("DELETE", "/upstreams/server-0-1")
    assert status == 200
    assert (view["name"], view["draining"]) == ("server-0-1", True)

    assert list(await router.upstreams()) == ["server-0-0"]
    _, full = await router.call("GET", "/status")
    assert [u["name"] for u in full["upstreams"]] == ["server-0-0"]
    assert 'upstream="server-0-1"' not in await router.metrics()
    assert 'upstream="server-0-0"' in await router.metrics()
    await eventually(lambda: not tasks_named("health-check server-0-1"), "its check loop to stop")
    # Checks of the upstream that stays go on; none reaches the removed one any more.
    checks = s0.health_checks
    await eventually(lambda: s0.health_checks > checks, "a check of server-0-0")
    seen = len(s1.admin_paths)
    checks = s0.health_checks
    await eventually(lambda: s0.health_checks >= checks + 3, "more checks of server-0-0")
    assert len(s1.admin_paths) == seen
    for _ in range(4):
        assert await router.get() == (200, "server-0-0")
    # Its pool is closed: the server saw every connection go, cleanly.
    await eventually(
        lambda: s1.connections.closed == s1.connections.opened, "its connections to close"
    )
    assert s1.connections.errors == []
    status, _ = await router.call("GET", "/upstreams/server-0-1")
    assert status == 404


async def test_a_request_in_flight_outlives_the_removal_of_its_upstream(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0 = FakeServer("server-0-0")
    router = await make_router([await serve(unix_servers, s0)])
    held = asyncio.create_task(router.get("/hold"))
    await eventually(lambda: s0.held == 1, "the request to be held")
    assert (await router.call("POST", "/upstreams/server-0-0/drain"))[0] == 200
    status, view = await router.call("DELETE", "/upstreams/server-0-0")
    assert (status, view["in_flight"]) == (200, 1)
    assert await router.upstreams() == {}
    assert await router.get() == (503, "")  # nothing left to route to

    s0.release.set()
    async with asyncio.timeout(WAIT):
        assert await held == (200, "server-0-0")
    await eventually(lambda: s0.connections.closed == s0.connections.opened, "the pool to close")
    assert s0.connections.errors == []
    assert 'upstream="server-0-0"' not in await router.metrics(), "a series came back"


async def test_panic_counts_the_current_upstreams(
    unix_servers: UnixServers, make_router: MakeRouter
) -> None:
    s0, s1, s2 = (FakeServer(f"server-0-{i}") for i in range(3))
    s0.health = 503
    router = await make_router(
        [await serve(unix_servers, s0), await serve(unix_servers, s1)],
        health={"interval": 0.02, "rise": 1, "fall": 1},
        ejection={"panic_threshold": 0.5},
    )
    forwarder = router.forwarder
    await eventually(lambda: not forwarder.upstreams[0].healthy, "server-0-0 to go out")
    assert forwarder.status()["panic"] is False  # 1 of 2 in

    s2.health = 503
    status, _ = await router.call("POST", "/upstreams", json=body(await serve(unix_servers, s2)))
    assert status == 201
    await eventually(lambda: forwarder.status()["panic"], "panic: 1 of 3 in")

    assert (await router.call("POST", "/upstreams/server-0-2/drain"))[0] == 200
    assert (await router.call("DELETE", "/upstreams/server-0-2"))[0] == 200
    assert forwarder.status()["panic"] is False  # 1 of 2 again


# -- under load --------------------------------------------------------------------------


async def answered(router: Router) -> str:
    """One request's status, as ``Load`` counts it."""
    status, _ = await router.get()
    return str(status)


async def remove(router: Router, fake: FakeServer, *, wait_idle: bool) -> None:
    """Drain, (maybe) wait for nothing in flight, remove, then stop the server."""
    name = fake.name
    assert (await router.call("POST", f"/upstreams/{name}/drain"))[0] == 200
    if wait_idle:  # what the supervisor does, up to its drain timeout
        deadline = asyncio.get_running_loop().time() + WAIT
        while (await router.call("GET", f"/upstreams/{name}"))[1]["in_flight"]:
            assert asyncio.get_running_loop().time() < deadline, f"{name} never drained"
            await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
    assert (await router.call("DELETE", f"/upstreams/{name}"))[0] == 200
    await eventually(
        lambda: fake.connections.closed == fake.connections.opened, f"{name}'s pool to close"
    )
    await fake.stop()


@pytest.mark.parametrize("policy", sorted(POLICIES))
async def test_membership_changes_under_load_fail_no_request(
    unix_servers: UnixServers, make_router: MakeRouter, policy: str
) -> None:
    fakes = {f"server-0-{i}": FakeServer(f"server-0-{i}", delay=0.002) for i in range(4)}
    specs = {name: await serve(unix_servers, fake) for name, fake in fakes.items()}
    router = await make_router([specs["server-0-0"], specs["server-0-1"]], policy=policy)
    async with Load(partial(answered, router), clients=8) as load:
        await load.progress(50)
        for name in ("server-0-2", "server-0-3"):
            status, _ = await router.call("POST", "/upstreams", json=body(specs[name]))
            assert status == 201
        await eventually(lambda: fakes["server-0-3"].served > 0, "server-0-3 to take traffic")
        await remove(router, fakes["server-0-0"], wait_idle=True)
        await load.progress(50)
        # In flight ones finish after the removal.
        await remove(router, fakes["server-0-2"], wait_idle=False)
        await load.progress(50)
        assert (await router.call("POST", "/upstreams/server-0-1/drain"))[0] == 200
        await load.progress(20)
        assert (await router.call("POST", "/upstreams/server-0-1/undrain"))[0] == 200
        # The same name again, on a new server.
        fakes["server-0-0"] = FakeServer("server-0-0", delay=0.002)
        again = await serve(unix_servers, fakes["server-0-0"], socket="server-0-0b")
        status, _ = await router.call("POST", "/upstreams", json=body(again))
        assert status == 201
        await eventually(lambda: fakes["server-0-0"].served > 0, "the new server-0-0 to serve")
        await load.progress(50)
    assert load.seen.total() >= 250
    assert set(load.seen) == {"200"}, f"outcomes of {load.seen.total()} requests: {load.seen}"
    assert sorted(await router.upstreams()) == ["server-0-0", "server-0-1", "server-0-3"]
    assert all(not fake.connections.errors for fake in fakes.values())


async def test_a_forwarder_not_started_routes_an_added_upstream_once_started(
    unix_servers: UnixServers,
) -> None:
    s0 = FakeServer("server-0-0")
    spec = await serve(unix_servers, s0)
    forwarder, _ = create_forwarder(
        "proxy-0", "proxy", TierConfig.model_validate(BASE_TIER), (), edge=False
    )
    forwarder.add_upstream(spec)
    await forwarder.start()
    try:
        address = await unix_servers.serve_server(forwarder.data_server(), "proxy-0")
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address.path)) as client,
            client.get("http://proxy/") as response,
        ):
            assert (response.status, response.headers["X-Served-By"]) == (200, "server-0-0")
    finally:
        await forwarder.close()
    with pytest.raises(RuntimeError, match="stopped"):
        forwarder.add_upstream(spec.model_copy(update={"name": "server-0-1"}))
