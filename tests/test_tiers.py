"""One tier per host, on loopback: a proxy tier and a balancer tier in front of it (fixed
addresses), each under its own supervisor. What a supervisor does on one host still
works on a tier: a rolling restart and an upgrade lose no request, the proxy host scales
its own group, and the banner says what runs where."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, statuses, steady_load, until

pytestmark = pytest.mark.integration


def _free_ports(count: int) -> int:
    """A base port with ``count`` free ports from it and 1000 above (the admin APIs)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = int(probe.getsockname()[1])
        if base + 1000 + count > 65535:
            continue
        taken = []
        try:
            for port in [*range(base, base + count), *range(base + 1000, base + 1000 + count)]:
                sock = socket.socket()
                taken.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in taken:
                sock.close()
    raise AssertionError("no free ports")


@dataclass
class Tiers:
    proxies: RunningStack
    balancers: RunningStack
    port: int


@pytest.fixture
async def tiers() -> AsyncIterator[Tiers]:
    port = _free_ports(2)
    proxy_config = f"""
tier = "proxy"
proxies = 2
servers_per_proxy = 2
[network]
port = {port}
"""
    balancer_config = f"""
tier = "balancer"
[network]
port = {port + 10}
[balancer]
upstreams = ["tcp://127.0.0.1:{port}", "tcp://127.0.0.1:{port + 1}"]
"""
    async with (
        running_stack(config=proxy_config) as proxies,
        running_stack(config=balancer_config) as balancers,
    ):
        yield Tiers(proxies, balancers, port)


async def test_each_tier_says_what_it_runs_and_requests_cross_them(tiers: Tiers) -> None:
    assert "lbstack up: tier proxy, 2 proxies, 4 servers;" in tiers.proxies.banner
    assert f"listen:   tcp://127.0.0.1:{tiers.port}" in tiers.proxies.banner
    assert "lbstack up: tier balancer, 1 balancer;" in tiers.balancers.banner
    names = (await tiers.balancers.status()).names()
    assert names == ["supervisor", "balancer-0"]
    async with steady_load(tiers.balancers, workers=4) as seen:
        await until(lambda: _served(seen, 100), "requests through both tiers")
    assert statuses(seen) == {"200"}
    balancer = await tiers.balancers.admin("balancer-0").request("GET", "/status")
    assert {u["name"] for u in balancer["upstreams"]} == {
        f"127.0.0.1-{tiers.port}",
        f"127.0.0.1-{tiers.port + 1}",
    }
    assert all(u["admin"] for u in balancer["upstreams"])  # scraped at port + 1000


async def _served(seen: Counter[str], count: int) -> bool:
    return seen.total() >= count


async def test_a_rolling_restart_of_each_tier_loses_no_request(tiers: Tiers) -> None:
    async with steady_load(tiers.balancers, workers=4, posts=True) as seen:
        for stack in (tiers.proxies, tiers.balancers):
            out = await cli("restart", "--rolling", "--run-dir", str(stack.run_dir), timeout=120)
            assert out.returncode == 0, out.stderr
    assert statuses(seen) == {"200"}, seen


async def test_the_proxy_host_scales_its_own_groups_and_the_balancer_host_refuses(
    tiers: Tiers,
) -> None:
    out = await cli("scale", "proxy-0", "3", "--run-dir", str(tiers.proxies.run_dir), timeout=60)
    assert out.returncode == 0, out.stderr
    assert len((await tiers.proxies.status()).names("server")) == 5
    out = await cli("scale", "proxy-0", "3", "--run-dir", str(tiers.balancers.run_dir))
    assert out.returncode == 1
    assert "scaled on the host that runs its proxy: this one runs tier=balancer" in out.stderr


async def test_an_upgrade_of_a_tier_keeps_its_tcp_sockets_and_loses_no_request(
    tiers: Tiers,
) -> None:
    before = (await tiers.proxies.status()).component("proxy-0").pid
    async with steady_load(tiers.balancers, workers=4) as seen:
        out = await cli("upgrade", "--run-dir", str(tiers.proxies.run_dir), timeout=120)
        assert out.returncode == 0, out.stderr
    assert statuses(seen) == {"200"}, seen
    assert (await tiers.proxies.status()).component("proxy-0").pid != before
