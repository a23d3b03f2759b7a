"""A stack over five "hosts" (network namespaces on one bridge) that find each other by
DNS: host 1 runs dnsmasq for the zone lbstack.test, host 2 two balancers (tier
balancer), hosts 3 and 4 a proxy tier each with its servers (tier proxy); host 5 joins
later. Real processes, real TCP between the hosts, real DNS.

The servers are ``tests/recorder.py``: each logs every request that reaches it, so a
test can tell which host served what, and that no POST reached two servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from lbstack.address import Address
from lbstack.client import AdminClient
from lbstack.testing import RunningStack, running_stack, short_tmpdir
from loadtests.netns import Dnsmasq, Host, Network, hosts, namespaces, unprivileged
from tests.harness import until

# CI runs as root with dnsmasq installed (.ci/run): there, nothing is skipped.
_MISSING = unprivileged() or (None if shutil.which("dnsmasq") else "dnsmasq is not installed")
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_MISSING is not None and not os.environ.get("CI"), reason=_MISSING or ""),
]

RECORDER = Path(__file__).with_name("recorder.py")
ZONE = "lbstack.test"
PROXIES = f"proxies.{ZONE}"
DATA_PORT = 8080
ADMIN_PORT = DATA_PORT + 1000
MAX_TTL = 1.0
DNS, BALANCERS, PROXY_A, PROXY_B, PROXY_C = 1, 2, 3, 4, 5


def _upstream(host: Host) -> str:
    """The name a balancer gives the proxy it found at ``host``."""
    return f"{host.address}-{DATA_PORT}"


@dataclass
class World:
    network: Network
    dns: Dnsmasq
    work: Path
    token: Path
    balancers: RunningStack
    proxies: dict[int, RunningStack] = field(default_factory=dict)

    def host(self, number: int) -> Host:
        return self.network.hosts[number]

    def served(self, number: int) -> list[dict[str, str]]:
        """The requests host ``number``'s servers recorded so far."""
        found = []
        for log in self.work.glob(f"h{number}-*.log"):
            for line in log.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "head":
                    found.append(event)
        return found

    async def upstreams(self, balancer: str = "balancer-0") -> dict[str, dict[str, object]]:
        """The balancer's upstreams as its status shows them, by name."""
        address = self.balancers.run_dir / f"{balancer}.admin.sock"
        status = await AdminClient(Address.unix(str(address))).request("GET", "/status")
        return {u["name"]: u for u in status["upstreams"]}


def _proxy_config(world_work: Path, token: Path, host: Host) -> str:
    command = f"{sys.executable} {RECORDER} {{socket}} {world_work}/h{host.number}-{{name}}.log"
    return f"""
tier = "proxy"
proxies = 1
servers_per_proxy = 2
[network]
bind = "{host.address}"
port = {DATA_PORT}
[admin]
token_file = "{token}"
[server]
kind = "command"
command = "{command}"
"""


def _balancer_config(token: Path, dns: Host, host: Host) -> str:
    return f"""
tier = "balancer"
balancers = 2
[network]
bind = "{host.address}"
port = {DATA_PORT}
[admin]
token_file = "{token}"
[discovery]
nameservers = ["{dns.address}"]
min_ttl = "0.25s"
max_ttl = "{MAX_TTL}s"
timeout = "0.5s"
[balancer]
upstreams = "dns://{PROXIES}:{DATA_PORT}"
[balancer.timeouts]
connect = "0.5s"
[balancer.health]
interval = "0.25s"
[balancer.exchange]
peers = "dns+srv://_lbadmin._tcp.balancers.{ZONE}"
"""


@contextlib.asynccontextmanager
async def _proxy_host(world_work: Path, token: Path, host: Host) -> AsyncIterator[RunningStack]:
    async with running_stack(
        config=_proxy_config(world_work, token, host),
        command=host.command([sys.executable, "-m", "lbstack"]),
        workdir=_workdir(world_work, f"h{host.number}"),
    ) as stack:
        yield stack


def _workdir(base: Path, name: str) -> Path:
    path = base / name
    path.mkdir()
    return path


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world() -> AsyncIterator[World]:
    before = namespaces()
    work = short_tmpdir()
    token = work / "token"
    token.write_text(secrets.token_hex(16))
    token.chmod(0o600)
    try:
        async with (
            hosts(DNS, BALANCERS, PROXY_A, PROXY_B, PROXY_C) as network,
            contextlib.AsyncExitStack() as stacks,
        ):
            dns = Dnsmasq(network.hosts[DNS], work)
            dns.records = {
                PROXIES: [network.hosts[PROXY_A].address, network.hosts[PROXY_B].address],
                f"h2.{ZONE}": [network.hosts[BALANCERS].address],
            }
            dns.srv = [
                (f"_lbadmin._tcp.balancers.{ZONE}", f"h2.{ZONE}", ADMIN_PORT + k) for k in (0, 1)
            ]
            await dns.start()
            proxies = {
                n: await stacks.enter_async_context(_proxy_host(work, token, network.hosts[n]))
                for n in (PROXY_A, PROXY_B)
            }
            balancers = await stacks.enter_async_context(
                running_stack(
                    config=_balancer_config(token, network.hosts[DNS], network.hosts[BALANCERS]),
                    command=network.hosts[BALANCERS].command([sys.executable, "-m", "lbstack"]),
                    workdir=_workdir(work, "h2"),
                )
            )
            yield World(network, dns, work, token, balancers, proxies)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert namespaces() == before, "the test left network namespaces behind"


@dataclass
class Outcomes:
    """What a stream of requests got: per second since its start, by kind and status."""

    started: float = field(default_factory=time.monotonic)
    seen: list[tuple[float, str, str]] = field(default_factory=list)  # (at, method, outcome)
    post_ids: list[str] = field(default_factory=list)

    def failed(self, method: str, after: float = 0.0) -> list[tuple[float, str, str]]:
        return [s for s in self.seen if s[1] == method and s[0] >= after and s[2] != "200"]

    def count(self, method: str) -> int:
        return sum(1 for s in self.seen if s[1] == method)


@contextlib.asynccontextmanager
async def stream(
    stack: RunningStack, *, posts: bool = False, workers: int = 4
) -> AsyncIterator[Outcomes]:
    """GETs (and with ``posts`` every third a POST with a unique id) through the
    balancers until the block ends; bounded in requests."""
    outcomes = Outcomes()
    stop = asyncio.Event()

    async def loop(client: aiohttp.ClientSession, worker: int) -> None:
        for n in range(20_000):
            if stop.is_set():
                return
            post = posts and n % 3 == 2
            request_id = f"w{worker}-{n}"
            try:
                async with client.request(
                    "POST" if post else "GET",
                    f"/r/{request_id}",
                    data=b"x" * 512 if post else None,
                    headers={"X-Request-Id": request_id},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response:
                    await response.read()
                    outcome = str(response.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                outcome = type(exc).__name__
            if post:
                outcomes.post_ids.append(request_id)
            outcomes.seen.append((time.monotonic(), "POST" if post else "GET", outcome))
            await asyncio.sleep(0.01)  # wait-ok: paces the stream, waits for nothing

    async with stack.session() as client:
        tasks = [asyncio.create_task(loop(client, w)) for w in range(workers)]
        try:
            yield outcomes
        finally:
            stop.set()
            await asyncio.gather(*tasks)


def _post_arrivals(world: World, hosts_: tuple[int, ...]) -> Counter[str]:
    arrivals: Counter[str] = Counter()
    for number in hosts_:
        for event in world.served(number):
            head = event["head"]
            if head.startswith("POST "):
                arrivals[head.split()[1].rsplit("/", 1)[-1]] += 1
    return arrivals


@pytest.mark.asyncio(loop_scope="module")
async def test_requests_through_a_balancer_reach_servers_on_both_proxy_hosts(world: World) -> None:
    async def both_in_rotation() -> bool:
        names = await world.upstreams()
        return {_upstream(world.host(PROXY_A)), _upstream(world.host(PROXY_B))} <= set(names)

    await until(both_in_rotation, "both proxy hosts in the balancer's set", timeout=20)
    async with stream(world.balancers) as outcomes:
        await until(
            lambda: _true(len(world.served(PROXY_A)) > 20 and len(world.served(PROXY_B)) > 20),
            "requests on both proxy hosts",
            timeout=20,
        )
    assert outcomes.failed("GET") == []


@pytest.mark.asyncio(loop_scope="module")
async def test_balancers_read_each_others_load_over_tcp_with_the_token_counting_each_once(
    world: World,
) -> None:
    """The peers found by SRV are both balancers' TCP admin APIs: each answers (the token
    goes with the poll), and the one that is the same balancer as a local peer, or this
    balancer itself, is not counted twice."""
    admin = AdminClient(Address.unix(str(world.balancers.run_dir / "balancer-0.admin.sock")))

    async def both_answered() -> bool:
        peers = (await admin.request("GET", "/status"))["peers"]
        remote = [p for p in peers if not p["local"]]
        return len(remote) == 2 and all(p["identity"] and p["errors"] == 0 for p in remote)

    await until(both_answered, "both TCP peers to answer", timeout=20)
    peers = (await admin.request("GET", "/status"))["peers"]
    local = [p for p in peers if p["local"]]
    remote = {p["address"]: p for p in peers if not p["local"]}
    host = world.host(BALANCERS).address
    assert [p["name"] for p in local] == ["balancer-1"]
    assert set(remote) == {f"tcp://{host}:{ADMIN_PORT}", f"tcp://{host}:{ADMIN_PORT + 1}"}
    assert remote[f"tcp://{host}:{ADMIN_PORT}"]["same_as"] == "this balancer"
    assert remote[f"tcp://{host}:{ADMIN_PORT + 1}"]["same_as"] == "balancer-1"  # its local peer
    counted = [p for p in peers if p["up"] and not p["same_as"]]
    assert [p["name"] for p in counted] == ["balancer-1"]


async def _true(value: bool) -> bool:
    return value


@pytest.mark.asyncio(loop_scope="module")
async def test_an_admin_api_on_tcp_refuses_a_request_without_the_token(world: World) -> None:
    token = world.token.read_text().strip()
    base = f"http://{world.host(PROXY_A).address}:{ADMIN_PORT}"

    async def status(*curl: str) -> str:
        process = await asyncio.create_subprocess_exec(
            *world.host(DNS).command(
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", *curl]
            ),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await process.communicate()
        return out.decode()

    assert await status(f"{base}/healthz") == "200"  # probes are open
    assert await status("-X", "POST", "--data", "{}", f"{base}/upstreams") == "401"
    assert await status(f"{base}/metrics") == "401"
    assert (
        await status(
            "-X", "POST", "--data", "{}", "-H", "Authorization: Bearer wrong", f"{base}/upstreams"
        )
        == "401"
    )
    authorised = ("-H", f"Authorization: Bearer {token}")
    assert await status(*authorised, f"{base}/metrics") == "200"
    assert await status(*authorised, "-X", "POST", "--data", "{}", f"{base}/upstreams") == "400"


@pytest.mark.asyncio(loop_scope="module")
async def test_a_new_proxy_host_joins_by_its_record_and_leaves_drained(world: World) -> None:
    new = world.host(PROXY_C)
    async with _proxy_host(world.work, world.token, new), stream(world.balancers) as outcomes:
        await world.dns.set(PROXIES, [world.host(n).address for n in (PROXY_A, PROXY_B, PROXY_C)])
        await until(
            lambda: _true(len(world.served(PROXY_C)) > 20), "host 5 in rotation", timeout=20
        )
        await world.dns.set(PROXIES, [world.host(n).address for n in (PROXY_A, PROXY_B)])

        async def gone() -> bool:
            return _upstream(new) not in await world.upstreams()

        await until(gone, "host 5 drained and removed", timeout=30)
        served = len(world.served(PROXY_C))
        await until(lambda: _true(len(world.served(PROXY_A)) > served), "more traffic", timeout=10)
        assert len(world.served(PROXY_C)) == served  # nothing new reached it
    assert outcomes.count("GET") > 100
    assert outcomes.failed("GET") == [], outcomes.failed("GET")[:5]


@pytest.mark.asyncio(loop_scope="module")
async def test_dns_failing_keeps_the_last_good_set(world: World) -> None:
    await world.dns.stop()
    try:
        admin = AdminClient(Address.unix(str(world.balancers.run_dir / "balancer-0.admin.sock")))

        async def failing() -> bool:  # several re-resolutions have failed
            failed = [
                float(line.rsplit(" ", 1)[1])
                for line in (await admin.metrics()).splitlines()
                if line.startswith("lbstack_discovery_resolutions_total{")
                and 'result="failed"' in line
            ]
            return sum(failed) >= 3

        await until(failing, "resolutions to fail", timeout=20)
        names = await world.upstreams()
        assert {_upstream(world.host(PROXY_A)), _upstream(world.host(PROXY_B))} <= set(names)
        a, b = len(world.served(PROXY_A)), len(world.served(PROXY_B))
        async with stream(world.balancers) as outcomes:
            await until(
                lambda: _true(
                    len(world.served(PROXY_A)) > a + 20 and len(world.served(PROXY_B)) > b + 20
                ),
                "both hosts still served",
                timeout=20,
            )
        assert outcomes.failed("GET") == []
    finally:
        await world.dns.start()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_host_whose_link_goes_down_is_ejected_and_no_post_reaches_two_servers(
    world: World,
) -> None:
    down = world.host(PROXY_A)
    async with stream(world.balancers, posts=True) as outcomes:
        await until(lambda: _true(outcomes.count("POST") > 30), "a stream going", timeout=20)
        down.link(up=False)
        try:

            async def ejected() -> bool:
                view = (await world.upstreams()).get(_upstream(down))
                return view is None or not view["available"]

            await until(ejected, "host 3 ejected", timeout=30)
            ejected_at, gets = time.monotonic(), outcomes.count("GET")
            await until(lambda: _true(outcomes.count("GET") > gets + 200), "more GETs", timeout=30)
        finally:
            down.link(up=True)
    assert outcomes.failed("GET", after=ejected_at) == []
    twice = {i: n for i, n in _post_arrivals(world, (PROXY_A, PROXY_B, PROXY_C)).items() if n > 1}
    assert twice == {}, twice
