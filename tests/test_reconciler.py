"""A router's upstreams following a source: a proxy whose servers are found by DNS
(dnsmasq on loopback, ``tests.nameserver``; servers on loopback TCP addresses) gets a
new record's server in slow start, drains a vanished one and removes it once idle
with no request failing meanwhile, undrains one that comes back, and keeps its set
while DNS fails; a balancer's fixed upstreams take the same path once."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from lbstack.address import Address, parse_address
from lbstack.component import ChildSpec
from lbstack.config import Config, UpstreamTLS
from lbstack.identity import UPSTREAM_NAME, address_name
from lbstack.reconciler import tls_configured, upstream_spec
from lbstack.tiers.router import create_router
from tests.conftest import UnixServers
from tests.harness import until
from tests.load import Load
from tests.nameserver import Backend, Dnsmasq, backends, nameservers

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
# Every change is seen within a fifth of a second: the records' TTL (1 s) is clamped.
DISCOVERY = {"min_ttl": "50ms", "max_ttl": "200ms", "timeout": "1s"}
# No background checks or scrapes (nothing serves the servers' admin ports), one try per
# request so that no failure hides behind a retry, round robin so every server serves.
TIER = {
    "policy": "round_robin",
    "health": {"interval": 0},
    "scrape_interval": 0,
    "retries": {"attempts": 1},
}


# -- names and specs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("tcp://198.18.0.3:8080", "198.18.0.3-8080"),
        ("https://198.18.0.3:8443", "198.18.0.3-8443"),
        ("tcp://[::1]:8080", "0--1-8080"),
        ("tcp://[2001:db8::7]:80", "2001-db8--7-80"),
        ("tcp://[fe80::]:80", "fe80---80"),
        ("tcp://proxy-a.example:8080", "proxy-a.example-8080"),
        ("unix:/run/lbstack/proxy-0.sock", "proxy-0"),
    ],
)
def test_an_address_names_its_upstream(address: str, name: str) -> None:
    assert address_name(parse_address(address)) == name
    assert UPSTREAM_NAME.fullmatch(name)


def test_an_upstream_at_an_address_has_its_admin_at_the_offset() -> None:
    spec = upstream_spec(parse_address("tcp://10.0.0.5:8080"), admin_offset=1000)
    assert (str(spec.address), str(spec.admin)) == ("tcp://10.0.0.5:8080", "tcp://10.0.0.5:9080")
    assert spec.health_path == "/healthz"
    over_tls = upstream_spec(
        parse_address("tcp://[::1]:8443"), admin_offset=1, health_path="/ready", tls=True
    )
    assert (str(over_tls.address), str(over_tls.admin)) == (
        "https://[::1]:8443",
        "tcp://[::1]:8444",
    )
    assert over_tls.health_path == "/ready"
    assert upstream_spec(parse_address("tcp://10.0.0.5:65000"), admin_offset=1000).admin is None
    assert tls_configured(UpstreamTLS(verify=False)) and not tls_configured(UpstreamTLS())


# -- a proxy following its servers' name ------------------------------------------------------


@dataclass
class Proxy:
    """A proxy from ``create_router``: its admin app under a test client, its data socket."""

    admin: TestClient[web.Request, web.Application]
    data: aiohttp.ClientSession

    async def get(self, path: str = "/") -> tuple[int, str]:
        async with self.data.get(f"http://proxy{path}") as response:
            return response.status, await response.text()

    async def status(self) -> dict[str, Any]:
        async with self.admin.get("/status") as response:
            assert response.status == 200
            status: dict[str, Any] = await response.json()
            return status

    async def upstreams(self) -> dict[str, dict[str, Any]]:
        return {u["name"]: u for u in (await self.status())["upstreams"]}


async def start_proxy(
    aiohttp_client: AiohttpClient,
    unix_servers: UnixServers,
    server: Dnsmasq,
    discover: str,
    **config: Any,
) -> Proxy:
    settings = Config.model_validate(
        {
            "groups": [{"server": {"kind": "dns", "discover": discover}}],
            "proxy": TIER,
            "discovery": {"nameservers": [server.nameserver], **DISCOVERY},
            **config,
        }
    )
    spec = ChildSpec(
        name="proxy-0", role="proxy", group=0, listen_fds=(), admin_fd=-1, config=settings
    )
    component = create_router(spec, settings.proxy, edge=False)
    admin = await aiohttp_client(component.admin)  # starts the forwarder, then discovery
    address = await unix_servers.serve_server(component.data_server(), "proxy-0")
    data = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address.path))
    unix_servers.stack.push_async_callback(data.close)
    return Proxy(admin, data)


async def answered(proxy: Proxy) -> str:
    """One GET's status, as ``Load`` counts it."""
    status, _ = await proxy.get()
    return str(status)


async def hold_one(proxy: Proxy, backend: Backend) -> asyncio.Task[tuple[int, str]]:
    """A request held by ``backend`` (the only one holding), in flight until released."""
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        held = backend.held
        task = asyncio.create_task(proxy.get("/hold"))
        while backend.held == held and not task.done():
            assert asyncio.get_running_loop().time() < deadline, f"{backend.name} held nothing"
            await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
        if backend.held > held:
            return task
        assert task.result()[0] == 200  # another server answered it at once


async def test_servers_come_and_go_with_their_records_and_no_request_fails(
    aiohttp_client: AiohttpClient,
    unix_servers: UnixServers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = nameservers(unix_servers)
    caplog.set_level(logging.INFO, logger="lbstack")
    found = await backends(unix_servers.stack, HOSTS)
    two, three, four = (found[host] for host in HOSTS)
    three.holds = True
    port = two.port
    server = await dns.start({"web.test": ["127.0.0.2", "127.0.0.3"]})
    proxy = await start_proxy(
        aiohttp_client,
        unix_servers,
        server,
        f"dns://web.test:{port}",
        supervisor={"graceful_timeout": "30s", "drain_window": "1s"},
    )

    # At start: one upstream per record, named after it, its admin at port + 1000.
    upstreams = await proxy.upstreams()
    assert sorted(upstreams) == [two.name, three.name]
    assert upstreams[two.name]["address"] == f"tcp://127.0.0.2:{port}"
    assert upstreams[two.name]["admin"] == f"tcp://127.0.0.2:{port + 1000}"
    [source] = (await proxy.status())["discovery"]
    assert (source["source"], source["for"], source["state"]) == (
        f"dns://web.test:{port}",
        "upstreams",
        "ok",
    )

    async with Load(partial(answered, proxy), clients=4, bound=2000) as load:
        await load.progress(20)

        # A record added: its server joins in slow start and takes traffic.
        await server.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3", "127.0.0.4"]})

        async def joined() -> bool:
            return four.name in await proxy.upstreams()

        await until(joined, "the new record's server", timeout=10)
        view = (await proxy.upstreams())[four.name]
        assert view["slow_start_remaining_seconds"] > 0 and not view["draining"]
        await until(partial(served, four), "the new server to serve", timeout=10)

        # A record removed while its server holds a request: drained, not removed.
        held = await hold_one(proxy, three)
        await server.set_hosts({"web.test": ["127.0.0.2", "127.0.0.4"]})

        async def draining() -> bool:
            view = (await proxy.upstreams()).get(three.name)
            return view is not None and view["draining"] and view["in_flight"] == 1

        await until(draining, "the vanished record's server to drain", timeout=10)
        await load.progress(20)
        before = three.served
        await load.progress(50)
        assert three.served == before, "a draining server gets no new request"
        assert three.name in await proxy.upstreams(), "still there: a request is in flight"

        # Its last request over, it goes.
        three.release.set()
        assert (await held)[0] == 200

        async def removed() -> bool:
            return three.name not in await proxy.upstreams()

        await until(removed, "the drained server's removal once idle", timeout=10)
        await load.progress(50)
    assert load.seen.total() >= 190
    assert set(load.seen) == {"200"}, f"outcomes of {load.seen.total()} requests: {load.seen}"
    assert sorted(await proxy.upstreams()) == [two.name, four.name]
    logs = caplog.text
    assert f"upstream {four.name} found by dns://web.test:{port}" in logs
    assert f"upstream {three.name} gone from dns://web.test:{port}: draining" in logs


async def served(backend: Backend) -> bool:
    return backend.served > 0


@dataclass
class Vanishing:
    """Two servers on web.test; the second holds a request (``held``) as its record goes."""

    proxy: Proxy
    server: Dnsmasq
    two: Backend
    three: Backend
    held: asyncio.Task[tuple[int, str]]


async def vanishing(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers, **config: Any
) -> Vanishing:
    found = await backends(unix_servers.stack, HOSTS[:2])
    two, three = found["127.0.0.2"], found["127.0.0.3"]
    three.holds = True
    server = await nameservers(unix_servers).start({"web.test": ["127.0.0.2", "127.0.0.3"]})
    discover = f"dns://web.test:{two.port}"
    proxy = await start_proxy(aiohttp_client, unix_servers, server, discover, **config)
    held = await hold_one(proxy, three)
    await server.set_hosts({"web.test": ["127.0.0.2"]})
    return Vanishing(proxy, server, two, three, held)


async def test_a_server_back_while_draining_is_undrained(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers
) -> None:
    case = await vanishing(aiohttp_client, unix_servers)
    proxy, three = case.proxy, case.three

    async def is_draining(expected: bool) -> bool:
        return bool((await proxy.upstreams())[three.name]["draining"]) is expected

    await until(partial(is_draining, True), "the server to drain", timeout=10)
    await case.server.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3"]})
    await until(partial(is_draining, False), "the server back", timeout=10)
    three.release.set()
    assert (await case.held)[0] == 200
    three.holds = False
    before = three.served
    await until(partial(served_more, proxy, three, before), "it to serve again", timeout=10)
    assert sorted(await proxy.upstreams()) == [case.two.name, three.name]


async def served_more(proxy: Proxy, backend: Backend, before: int) -> bool:
    status, _ = await proxy.get()
    assert status == 200
    return backend.served > before


async def test_a_vanished_server_still_busy_is_removed_after_the_graceful_timeout(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers
) -> None:
    case = await vanishing(
        aiohttp_client,
        unix_servers,
        supervisor={"graceful_timeout": "300ms", "drain_window": "100ms"},
    )

    async def removed() -> bool:
        return case.three.name not in await case.proxy.upstreams()

    await until(removed, "the busy server's removal after the timeout", timeout=10)
    assert not case.held.done(), "its request goes on through the retired pool"
    case.three.release.set()
    assert (await case.held)[0] == 200


async def test_while_dns_fails_the_router_keeps_its_servers(
    aiohttp_client: AiohttpClient,
    unix_servers: UnixServers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = nameservers(unix_servers)
    caplog.set_level(logging.INFO, logger="lbstack.discovery")
    found = await backends(unix_servers.stack, HOSTS[:2])
    names = sorted(backend.name for backend in found.values())
    server = await dns.start({"web.test": list(found)})
    port = found["127.0.0.2"].port
    proxy = await start_proxy(aiohttp_client, unix_servers, server, f"dns://web.test:{port}")
    await server.stop()

    async def failing() -> bool:
        [source] = (await proxy.status())["discovery"]
        return bool(source["resolutions"]["failed"] >= 2)

    await until(failing, "failed resolutions", timeout=10)
    [source] = (await proxy.status())["discovery"]
    assert source["state"] == "failed" and source["last_error"]
    assert sorted(await proxy.upstreams()) == names
    for _ in range(4):
        assert (await proxy.get())[0] == 200
    async with proxy.admin.get("/metrics") as response:
        metrics = await response.text()
    assert "lbstack_discovery_resolutions_total{" in metrics
    source_labels = f'instance="proxy-0",role="proxy",source="dns://web.test:{port}"'
    assert f"lbstack_discovery_addresses{{{source_labels}}} 2.0" in metrics

    await server.start()

    async def recovered() -> bool:
        [source] = (await proxy.status())["discovery"]
        return bool(source["state"] == "ok")

    await until(recovered, "resolutions to work again", timeout=10)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "keeping the last good set (2 addresses)" in warned[0].message
    assert "resolves again: 2 addresses" in caplog.text
    assert sorted(await proxy.upstreams()) == names


# -- a balancer with fixed upstreams ---------------------------------------------------------


async def test_a_balancers_fixed_upstreams_join_the_same_way(
    aiohttp_client: AiohttpClient, unix_servers: UnixServers
) -> None:
    found = await backends(unix_servers.stack, HOSTS[:2])
    addresses = [f"tcp://{b.host}:{b.port}" for b in found.values()]
    config = Config.model_validate(
        {"tier": "balancer", "balancer": {**TIER, "upstreams": addresses}}
    )
    spec = ChildSpec(name="balancer-0", role="balancer", listen_fds=(), admin_fd=-1, config=config)
    component = create_router(spec, config.balancer, edge=True)
    admin = await aiohttp_client(component.admin)
    async with admin.get("/status") as response:
        status = await response.json()
    views = {u["name"]: u for u in status["upstreams"]}
    assert sorted(views) == sorted(b.name for b in found.values())
    assert all(v["slow_start_remaining_seconds"] > 0 for v in views.values())
    assert status["discovery"][0]["source"] == "fixed"
    address = await unix_servers.serve_server(component.data_server(), "balancer-0")
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address.path)) as client,
        client.get("http://balancer/") as response,
    ):
        assert response.status == 200
        assert await response.text() in {b.name for b in found.values()}
    assert Address.unix(address.path) == address
