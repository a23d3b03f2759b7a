"""What the hops between hosts cost: the open-loop routing benchmark with the whole stack
on one host, then with its tiers on hosts of their own that find each other by DNS.

The same shape both ways: one balancer, two proxies, three simulated servers each at
5 ms, server-0-2 of the first proxy slowed to 50 ms. On one host (``lbstack up``) every
hop is a unix socket. Over hosts (network namespaces on one bridge, addresses from
198.18.0.0/15, built by ``loadtests.netns``; root only): dnsmasq on host 1, the balancer
on host 2 (``--tier balancer``, its proxies from ``dns://proxies.lbstack.test:8080``),
one proxy tier with its three servers on each of hosts 3 and 4 (``--tier proxy``): the
balancer → proxy hop is TCP through a veth pair and a bridge, with the admin token on
its scrapes. Poisson arrivals at each rate from ``loadtests.loadgen`` in a process of its
own on the balancer's unix socket, latency from each request's scheduled start.

Run it from the project root, as root: ``.venv/bin/python -m loadtests.multihost_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

from lbstack.testing import RunningStack, running_stack
from loadtests.netns import Dnsmasq, Network, hosts, unprivileged
from loadtests.openloop import COLUMNS, generate, poisson_parser
from loadtests.options import run_main, timed
from loadtests.report import BenchError, Report, find, ratio
from loadtests.scenarios import SCENARIOS, SLOW_START_S, Poisson, Scenario
from loadtests.topology import kept, lbstack_up

ZONE = "lbstack.test"
Pair = tuple[RunningStack, RunningStack]  # the balancer's stack, the slow server's
PORT = 8080


def _proxy_host(network: Network, number: int, token: Path, latency: str) -> str:
    return f"""
tier = "proxy"
proxies = 1
servers_per_proxy = 3
[network]
bind = "{network.hosts[number].address}"
port = {PORT}
[admin]
token_file = "{token}"
[server.simulation]
latency = "{latency}"
[proxy]
policy = "p2c_ewma"
"""


def _balancer_host(network: Network, token: Path) -> str:
    return f"""
tier = "balancer"
[network]
bind = "{network.hosts[2].address}"
port = {PORT}
[admin]
token_file = "{token}"
[discovery]
nameservers = ["{network.hosts[1].address}"]
[balancer]
policy = "p2c_ewma"
upstreams = "dns://proxies.{ZONE}:{PORT}"
"""


@contextlib.asynccontextmanager
async def over_hosts(workdir: Path, latency: str) -> AsyncIterator[Pair]:
    """The stack over hosts 1-4: (the balancer host's stack, host 3's)."""
    token = workdir / "token"
    token.write_text(secrets.token_hex(16))
    async with hosts(1, 2, 3, 4) as network, contextlib.AsyncExitStack() as stacks:
        dns = Dnsmasq(network.hosts[1], workdir)
        dns.records = {f"proxies.{ZONE}": [network.hosts[n].address for n in (3, 4)]}
        await dns.start()
        up = []
        for number, config in (
            (3, _proxy_host(network, 3, token, latency)),
            (4, _proxy_host(network, 4, token, latency)),
            (2, _balancer_host(network, token)),
        ):
            base = workdir / f"h{number}"
            base.mkdir()
            stack = running_stack(
                config=config,
                command=network.hosts[number].command([sys.executable, "-m", "lbstack"]),
                workdir=base,
                metrics_listen="off",
            )
            up.append(await stacks.enter_async_context(stack))
        proxies_host, _, balancer_host = up
        yield balancer_host, proxies_host


async def _in_rotation(balancer: RunningStack, count: int, timeout: float = 30.0) -> None:
    """Until the balancer has ``count`` proxies available."""
    admin = balancer.admin("balancer-0")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = await admin.request("GET", "/status")
        if sum(1 for u in status["upstreams"] if u["available"]) >= count:
            return
        await asyncio.sleep(0.1)  # wait-ok: polling with a deadline
    raise BenchError(f"the balancer did not find {count} proxies within {timeout:.0f}s")


async def amain(args: argparse.Namespace) -> int:
    if problem := unprivileged():
        raise BenchError(f"needs network namespaces: {problem}")
    scenario = timed(SCENARIOS["multihost"], args)
    scenario = replace(scenario, load=Poisson(tuple(args.rates), args.connections))
    assert scenario.fault is not None and scenario.fault.latency is not None
    report = Report("multihost", {k: v for k, v in vars(args).items() if k not in ("json", "keep")})
    runs = []
    with kept("lbm-", args.keep) as workdir:
        systems: dict[str, Callable[[], AbstractAsyncContextManager[Pair]]] = {
            "one host": lambda: _one_host(workdir, scenario),
            "over hosts": lambda: over_hosts(workdir, scenario.topology.latency),
        }
        for name, start in systems.items():
            async with start() as (balancer, slow_host):
                await slow_host.admin(scenario.fault.server).fault(
                    {"latency": scenario.fault.latency}
                )
                if name == "over hosts":
                    await _in_rotation(balancer, 2)
                await asyncio.sleep(SLOW_START_S)  # wait-ok: new upstreams ramp up first
                for rate_index, rate in enumerate(args.rates):
                    seed = args.seed + rate_index
                    run = generate("http://lbstack/", rate, seed, scenario, balancer.socket)
                    figures = await report.step(f"{name} at {rate}/s", run)
                    if figures is not None:
                        runs.append({"rate": rate, "system": name, **figures})
    report.table("runs", runs, COLUMNS)
    for rate in args.rates:
        one = find(runs, rate=rate, system="one host")
        over = find(runs, rate=rate, system="over hosts")
        for figure in ("p50_ms", "p99_ms"):
            report.figures[f"{figure}_ratio_at_{rate}"] = ratio(over.get(figure), one.get(figure))
        if one.get("p50_ms") is not None and over.get("p50_ms") is not None:
            report.figures[f"p50_added_ms_at_{rate}"] = round(over["p50_ms"] - one["p50_ms"], 3)
    report.notes += [
        "latency from each request's scheduled start, through the balancer's unix socket",
        f"6 servers at {scenario.topology.latency}, {scenario.fault.server} (of proxy host 3 "
        f"over hosts) at {scenario.fault.latency}; over hosts the balancer reaches its proxies "
        "over TCP through a veth pair and a bridge",
    ]
    return report.finish(args.json)


@contextlib.asynccontextmanager
async def _one_host(workdir: Path, scenario: Scenario) -> AsyncIterator[Pair]:
    """The whole stack on this host: (its stack, the same)."""
    report = Report("multihost-one-host", {})
    async with lbstack_up(scenario.topology, workdir, report) as lb:
        yield lb.stack, lb.stack


def main(argv: Sequence[str] | None = None) -> None:
    run_main(amain, poisson_parser("multihost_bench", __doc__, SCENARIOS["multihost"]), argv)


if __name__ == "__main__":
    main()
