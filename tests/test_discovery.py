"""DNS discovery against a real nameserver (dnsmasq on loopback, ``tests.nameserver``):
names resolved into addresses with their TTLs, a source that keeps its last good set
when DNS fails or answers nothing, balancers found by DNS counted once, and the admin
token sent to admin APIs over TCP. (A router's upstreams following a name:
``test_reconciler``.)"""

from __future__ import annotations

import logging
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest

from lbstack.address import Address
from lbstack.admin import require_token
from lbstack.component import ChildSpec, UpstreamSpec
from lbstack.config import Config, Discovery, parse_dns_name
from lbstack.discovery import DiscoveryMetrics, Resolver, Source
from lbstack.loadview import LoadView
from lbstack.metrics import ComponentMetrics, parse
from lbstack.routing import Upstream
from lbstack.tiers.router import create_router
from tests.conftest import UnixServers
from tests.harness import until
from tests.nameserver import backends, free_port, nameservers, serve_tcp, until_true

TOKEN = "a-token-of-sixteen-characters-or-more"


def tcp(host: str, port: int) -> Address:
    return Address("tcp", host=host, port=port)


def series(metrics: ComponentMetrics, name: str, **labels: str) -> float:
    return sample(generate_latest(metrics.registry).decode(), name, **labels)


# -- resolution ---------------------------------------------------------------------------


async def test_a_name_is_its_a_and_aaaa_records_at_its_port_ttl_clamped(
    unix_servers: UnixServers,
) -> None:
    dns = nameservers(unix_servers)
    short = await dns.start(
        {"web.test": ["127.0.0.3", "127.0.0.2", "::1"], "v4.test": ["127.0.0.5"]}
    )
    resolver = Resolver(Discovery(nameservers=(short.nameserver,)))
    answer = await resolver.resolve(parse_dns_name("dns://web.test:8080"))
    assert [str(a) for a in answer.addresses] == [
        "tcp://127.0.0.2:8080",
        "tcp://127.0.0.3:8080",
        "tcp://[::1]:8080",
    ]
    assert answer.ttl == 1.0
    # No AAAA record: an empty answer of one family is no failure.
    only_v4 = await resolver.resolve(parse_dns_name("dns://v4.test:80"))
    assert only_v4.addresses == (tcp("127.0.0.5", 80),)

    # A TTL below min_ttl is raised to it; one above max_ttl lowered to it.
    long = await dns.start({"web.test": ["127.0.0.2"]}, local_ttl=300)
    for server, settings, expected in [
        (short, Discovery(nameservers=(short.nameserver,), min_ttl=2.5), 2.5),
        (long, Discovery(nameservers=(long.nameserver,), max_ttl=30), 30.0),
        (long, Discovery(nameservers=(long.nameserver,), max_ttl=600), 300.0),
    ]:
        metrics = ComponentMetrics("proxy", "proxy-0")
        source, _ = await started_source(settings, "dns://web.test:8080", metrics)
        try:
            assert source.ttl == expected, server.nameserver
            assert series(metrics, "lbstack_discovery_ttl_seconds") == expected
        finally:
            await source.close()


async def test_srv_records_name_their_targets_at_their_ports(unix_servers: UnixServers) -> None:
    dns = nameservers(unix_servers)
    server = await dns.start(
        {"a.srv.test": ["127.0.0.7"]},
        [
            "srv-host=_http._tcp.svc.test,a.srv.test,8081",
            "srv-host=_http._tcp.svc.test,c.srv.test,8083",
            "srv-host=_http._tcp.svc.test,d.srv.test,8084",  # an alias: not in additional
            "srv-host=_http._tcp.svc.test,gone.srv.test,8085",  # no such target
            "host-record=c.srv.test,127.0.0.9",
            "cname=d.srv.test,a.srv.test",
        ],
    )
    resolver = Resolver(Discovery(nameservers=(server.nameserver,)))
    answer = await resolver.resolve(parse_dns_name("dns+srv://_http._tcp.svc.test"))
    assert answer.addresses == (
        tcp("127.0.0.7", 8081),
        tcp("127.0.0.7", 8084),
        tcp("127.0.0.9", 8083),
    )
    assert answer.ttl == 1.0
    # The additional section gave a's and c's addresses; d's were asked for.
    assert "query[A] d.srv.test" in server.log
    assert "query[A] c.srv.test" not in server.log
    assert "query[A] a.srv.test" not in server.log


async def started_source(
    settings: Discovery, name: str, metrics: ComponentMetrics
) -> tuple[Source, list[tuple[Address, ...]]]:
    """A source following ``name``, started; the sets it handed over, in order."""
    changes: list[tuple[Address, ...]] = []
    source = Source(
        parse_dns_name(name),
        changes.append,
        purpose="upstreams",
        settings=settings,
        resolver=Resolver(settings),
        metrics=DiscoveryMetrics(metrics),
    )
    await source.start()
    return source, changes


async def test_failures_and_empty_answers_keep_the_last_good_set(
    unix_servers: UnixServers, caplog: pytest.LogCaptureFixture
) -> None:
    dns = nameservers(unix_servers)
    caplog.set_level(logging.INFO, logger="lbstack.discovery")
    server = await dns.start({"web.test": ["127.0.0.2", "127.0.0.3"]})
    settings = Discovery(nameservers=(server.nameserver,), min_ttl=0.05, timeout=0.5)
    metrics = ComponentMetrics("proxy", "proxy-0")
    source, changes = await started_source(settings, "dns://web.test:8080", metrics)
    good = (tcp("127.0.0.2", 8080), tcp("127.0.0.3", 8080))
    name = "dns://web.test:8080"

    def count(result: str) -> float:
        return series(metrics, "lbstack_discovery_resolutions_total", source=name, result=result)

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    try:
        assert changes == [good] and source.state == "ok"
        assert series(metrics, "lbstack_discovery_addresses", source=name) == 2
        assert series(metrics, "lbstack_discovery_last_success_timestamp_seconds") > 0

        await server.stop()  # no nameserver answering
        for _ in range(2):
            assert await source.refresh() == settings.min_ttl  # tried again soon
        assert (source.state, source.addresses, count("failed")) == ("failed", good, 2)
        assert len(warnings()) == 1, "a failure is logged when it starts, not each time"
        assert "keeping the last good set (2 addresses)" in warnings()[0]

        server.hosts = {}  # NXDOMAIN
        await server.start()
        await source.refresh()
        assert source.addresses == good and "NXDOMAIN" in source.last_error
        assert count("failed") == 3

        server.conf = ['txt-record=web.test,"no address here"']  # NOERROR, no A or AAAA
        await server.restart()
        await source.refresh()
        assert (source.state, source.addresses, count("empty")) == ("empty", good, 1)
        assert len(warnings()) == 2, "a new kind of failure is a change of state"
        assert series(metrics, "lbstack_discovery_addresses", source=name) == 2

        await server.set_hosts({"web.test": ["127.0.0.2", "127.0.0.3"]})
        assert await source.refresh() == 1.0
        assert source.state == "ok" and count("ok") == 2
        assert any("resolves again: 2 addresses" in r.getMessage() for r in caplog.records)
        assert changes == [good], "the same set again is no change"

        await server.set_hosts({"web.test": ["127.0.0.4"]})

        async def moved() -> bool:
            await source.refresh()
            return len(changes) == 2

        await until(moved, "the new set")
        assert changes[-1] == (tcp("127.0.0.4", 8080),)
        assert source.status()["addresses"] == ["tcp://127.0.0.4:8080"]
    finally:
        await source.close()


async def test_fixed_addresses_are_handed_over_once_without_dns() -> None:
    changes: list[tuple[Address, ...]] = []
    fixed = (tcp("127.0.0.2", 8080), tcp("127.0.0.3", 8080))
    source = Source(fixed, changes.append, purpose="upstreams", settings=Discovery())
    await source.start()
    await source.close()
    assert changes == [fixed]
    assert source.status()["source"] == "fixed" and source.status()["state"] == "fixed"


# -- peers found by DNS --------------------------------------------------------------------


def peer_app(name: str, host: str, in_flight: int, token: str | None = None) -> web.Application:
    """A balancer's admin app as its peers read it: ``/load`` with ``in_flight`` requests
    to proxy-0 (behind the admin token over TCP, when given)."""
    upstream = Upstream("proxy-0", Address.unix("/tmp/proxy-0.sock"))
    upstream.in_flight = in_flight
    view = LoadView(name, "balancer", lambda: [upstream], lambda: in_flight, host=host)

    async def load(request: web.Request) -> web.Response:
        return web.json_response(view())

    app = web.Application(middlewares=[require_token(token)] if token else [])
    app.router.add_get("/load", load)
    return app


def balancer(peers: tuple[Address, ...], exchange: dict[str, Any], **config: Any) -> ChildSpec:
    settings = Config.model_validate(
        {
            "balancer": {
                "health": {"interval": 0},
                "scrape_interval": 0,
                "exchange": {"interval": "50ms", "timeout": "1s", "stale_after": "2s", **exchange},
            },
            "discovery": {"min_ttl": "50ms", "max_ttl": "200ms", "timeout": "1s"},
            **config,
        }
    )
    return ChildSpec(
        name="balancer-0",
        role="balancer",
        listen_fds=(),
        admin_fd=-1,
        upstreams=(UpstreamSpec(name="proxy-0", address=Address.unix("/tmp/proxy-0.sock")),),
        peers=peers,
        config=settings,
    )


async def status_of(address: Address) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{address.http_base}/status") as response,
    ):
        assert response.status == 200
        status: dict[str, Any] = await response.json()
        return status


async def test_peers_found_by_dns_count_once(unix_servers: UnixServers) -> None:
    """peers.test names: another host's balancer (.2), this balancer (.3), the local
    balancer-1's TCP admin (.4), and the other host's balancer again (.5)."""
    dns = nameservers(unix_servers)
    here = socket.gethostname()
    port = free_port("127.0.0.2")
    local_address = await serve_unix(
        unix_servers, peer_app("balancer-1", here, 1), "balancer-1.admin"
    )
    await serve_tcp(unix_servers.stack, peer_app("balancer-1", here, 1), "127.0.0.4", port)
    for host in ("127.0.0.2", "127.0.0.5"):
        await serve_tcp(unix_servers.stack, peer_app("balancer-7", "elsewhere", 10), host, port)
    server = await dns.start({"peers.test": ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]})
    spec = balancer(
        (local_address,),
        {"peers": f"dns://peers.test:{port}"},
        discovery={"nameservers": [server.nameserver], "min_ttl": "50ms", "max_ttl": "200ms"},
    )
    component = create_router(spec, spec.config.balancer, edge=True)
    await serve_tcp(unix_servers.stack, component.admin, "127.0.0.3", port)  # this balancer itself
    me = tcp("127.0.0.3", port)

    async def counted(expected: dict[str, str | None], in_flight: float) -> bool:
        status = await status_of(me)
        peers = {p["name"]: p["same_as"] for p in status["peers"] if p["seq"]}
        return peers == expected and status["upstreams"][0]["peer_in_flight"] == in_flight

    other, again = f"127.0.0.2:{port}", f"127.0.0.5:{port}"
    expected: dict[str, str | None] = {
        "balancer-1": None,
        other: None,
        f"127.0.0.3:{port}": "this balancer",
        f"127.0.0.4:{port}": "balancer-1",
        again: other,
    }
    await until(lambda: counted(expected, 11), "each balancer counted once")
    status = await status_of(me)
    [source] = status["discovery"]
    assert (source["source"], source["for"], len(source["addresses"])) == (
        f"dns://peers.test:{port}",
        "peers",
        4,
    )
    by_name = {p["name"]: p for p in status["peers"]}
    assert by_name["balancer-1"]["local"] and not by_name[other]["local"]
    assert by_name[other]["identity"] == "balancer-7@elsewhere"
    assert not by_name[again]["up"] and by_name[other]["up"]

    # The other host's first address goes: its second one counts instead.
    await server.set_hosts({"peers.test": ["127.0.0.3", "127.0.0.4", "127.0.0.5"]})
    del expected[other]
    expected[again] = None
    await until(lambda: counted(expected, 11), "the second address counted")


async def serve_unix(servers: UnixServers, app: web.Application, name: str) -> Address:
    runner = web.AppRunner(app)
    await runner.setup()
    servers.stack.push_async_callback(runner.cleanup)
    path = str(servers.directory / f"{name}.sock")
    await web.UnixSite(runner, path).start()
    return Address.unix(path)


# -- the admin token over TCP ----------------------------------------------------------------


class StubAdmin:
    """An upstream's admin API on TCP behind the token: 401 without it."""

    def __init__(self, token: str) -> None:
        self.seen: list[tuple[str, int]] = []  # (path, with the token) of each answered
        self.app = web.Application(middlewares=[require_token(token)])
        self.app.router.add_get("/readyz", self.ready)
        self.app.router.add_get("/metrics", self.metrics)

    async def ready(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, int("Authorization" in request.headers)))
        return web.json_response({"status": "ready"})

    async def metrics(self, request: web.Request) -> web.Response:
        self.seen.append((request.path, int("Authorization" in request.headers)))
        return web.Response(text="lbstack_in_flight_requests 3\n")


async def test_the_token_goes_to_admin_apis_over_tcp_and_nowhere_else(
    unix_servers: UnixServers, sockdir: Path
) -> None:
    dns = nameservers(unix_servers)
    token_file = sockdir / "token"
    token_file.write_text(TOKEN)
    found = await backends(unix_servers.stack, ["127.0.0.2"])
    backend = found["127.0.0.2"]
    stub = StubAdmin(TOKEN)
    await serve_tcp(unix_servers.stack, stub.app, "127.0.0.2", backend.port + 1000)
    peer_port = free_port("127.0.0.6")
    await serve_tcp(
        unix_servers.stack, peer_app("balancer-3", "elsewhere", 2, TOKEN), "127.0.0.6", peer_port
    )
    server = await dns.start({"web.test": ["127.0.0.2"], "peers.test": ["127.0.0.6"]})
    discovery = {"nameservers": [server.nameserver], "min_ttl": "50ms", "max_ttl": "200ms"}

    # A proxy whose servers are found by DNS: health checks and scrapes of their admin.
    config = Config.model_validate(
        {
            "groups": [{"server": {"kind": "dns", "discover": f"dns://web.test:{backend.port}"}}],
            "proxy": {"health": {"interval": "50ms"}, "scrape_interval": "50ms"},
            "discovery": discovery,
            "admin": {"token_file": str(token_file)},
        }
    )
    proxy = ChildSpec(
        name="proxy-0", role="proxy", group=0, listen_fds=(), admin_fd=-1, config=config
    )
    await serve_tcp(
        unix_servers.stack, create_router(proxy, config.proxy, edge=False).admin, "127.0.0.1", 0
    )
    await until_true(
        lambda: {("/readyz", 1), ("/metrics", 1)} <= set(stub.seen), "checks and scrapes"
    )
    assert all(authorized for _, authorized in stub.seen), stub.seen
    assert backend.authorized == 0, "the data address never sees the token"

    # A balancer with a peer found by DNS: its polls carry the token.
    spec = balancer(
        (),
        {"peers": f"dns://peers.test:{peer_port}"},
        discovery=discovery,
        admin={"token_file": str(token_file)},
    )
    port = free_port("127.0.0.7")
    balancer_admin = create_router(spec, spec.config.balancer, edge=True).admin
    await serve_tcp(unix_servers.stack, balancer_admin, "127.0.0.7", port)

    async def heard() -> bool:
        status = await status_of(tcp("127.0.0.7", port))
        return bool(status["peers"] and status["peers"][0]["up"])

    await until(heard, "the peer's view, read with the token")


async def test_without_the_token_a_tcp_admin_api_refuses_the_scrapes(
    unix_servers: UnixServers,
) -> None:
    """The stub really checks: a proxy without the token gets 401s, counted as failed
    scrapes, while the open /readyz still answers its health checks."""
    dns = nameservers(unix_servers)
    found = await backends(unix_servers.stack, ["127.0.0.2"])
    backend = found["127.0.0.2"]
    stub = StubAdmin(TOKEN)
    await serve_tcp(unix_servers.stack, stub.app, "127.0.0.2", backend.port + 1000)
    server = await dns.start({"web.test": ["127.0.0.2"]})
    config = Config.model_validate(
        {
            "groups": [{"server": {"kind": "dns", "discover": f"dns://web.test:{backend.port}"}}],
            "proxy": {"health": {"interval": "50ms"}, "scrape_interval": "50ms"},
            "discovery": {"nameservers": [server.nameserver]},
        }
    )
    proxy = ChildSpec(
        name="proxy-0", role="proxy", group=0, listen_fds=(), admin_fd=-1, config=config
    )
    port = free_port("127.0.0.8")
    await serve_tcp(
        unix_servers.stack, create_router(proxy, config.proxy, edge=False).admin, "127.0.0.8", port
    )
    labels = {"upstream": f"127.0.0.2-{backend.port}"}

    async def refused() -> bool:
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.8:{port}/metrics") as response,
        ):
            text = await response.text()
        return sample(text, "lbstack_scrape_errors_total", **labels) >= 2

    await until(refused, "scrapes refused without the token")
    assert ("/readyz", 0) in stub.seen, "the open probe needs no token"
    assert not [path for path, _ in stub.seen if path == "/metrics"]
    upstream = (await status_of(tcp("127.0.0.8", port)))["upstreams"][0]
    assert upstream["healthy"] and upstream["reported"]["age"] is None


def sample(text: str, name: str, **labels: str) -> float:
    for found, found_labels, value in parse(text):
        if found == name and all(found_labels.get(k) == v for k, v in labels.items()):
            return value
    return 0.0
