"""Load-aware routing and failover on the real stack, under bounded load."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, server_status, statuses, steady_load, until

# Fast health and ejection settings, so each test takes seconds, not minutes.
FAST = """
[proxy]
slow_start = "1s"
[proxy.health]
interval = "200ms"
timeout = "300ms"
[proxy.ejection]
consecutive_failures = 3
base_time = "1s"
[balancer.health]
interval = "200ms"
timeout = "300ms"
"""


async def _share(
    stack: RunningStack, server: str, requests: int = 240, concurrency: int = 8
) -> float:
    """The share of ``requests`` GETs (``concurrency`` at a time) that ``server`` served."""
    seen: Counter[str] = Counter()
    remaining = requests

    async def worker(client: aiohttp.ClientSession) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            async with client.get("/share") as response:
                await response.read()
                seen[response.headers.get("X-Served-By", "?")] += 1

    async with stack.session() as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return seen[server] / sum(seen.values())


async def test_a_slow_server_gets_a_small_share_and_recovers_after_clear() -> None:
    async with running_stack(config=FAST) as stack:
        run_dir = str(stack.run_dir)
        slow = "server-0-1"
        assert (await cli("fault", slow, "latency=100ms", "--run-dir", run_dir)).returncode == 0

        async def avoided() -> bool:
            return await _share(stack, slow) < 0.04

        await until(avoided, f"{slow} to get under 4% of requests")
        assert (await cli("fault", slow, "clear", "--run-dir", run_dir)).returncode == 0

        async def recovered() -> bool:
            return await _share(stack, slow) > 0.08  # a fair share is 1/6

        await until(recovered, f"{slow} to get its share back")


async def test_an_erroring_server_is_ejected_and_readmitted() -> None:
    async with running_stack(config=FAST) as stack:
        run_dir = str(stack.run_dir)
        bad = "server-1-2"
        assert (await cli("fault", bad, "error_rate=1", "--run-dir", run_dir)).returncode == 0

        async def ejected() -> bool:
            await _share(stack, bad, requests=30)
            upstream = await stack.admin("proxy-1").upstream(bad)
            return not upstream.available and upstream.ejections >= 1

        await until(ejected, f"{bad} to be ejected")
        # Out, it serves nothing (the other five take everything).
        assert await _share(stack, bad, requests=60) == 0.0
        assert (await cli("fault", bad, "clear", "--run-dir", run_dir)).returncode == 0

        async def readmitted() -> bool:
            return await _share(stack, bad, requests=60) > 0.0

        await until(readmitted, f"{bad} to be re-admitted")
        metrics = await stack.admin("proxy-1").metrics()
        assert (
            f'lbstack_upstream_ejections_total{{instance="proxy-1",role="proxy",upstream="{bad}"}}'
            in metrics
        )


async def test_killing_a_server_then_a_proxy_fails_no_get() -> None:
    async with running_stack(config=FAST) as stack, steady_load(stack, workers=8) as seen:
        for victim in ("server-0-1", "proxy-0"):
            before = await stack.kill(victim)
            await stack.wait_for(victim, not_pid=before)
            mark = sum(seen.values()) + 200

            async def more_served(mark: int = mark) -> bool:
                return sum(seen.values()) > mark

            await until(more_served, "traffic to go on after the restart")
    assert statuses(seen) == {"200"}, seen
    assert sum(seen.values()) > 400


async def test_a_post_whose_server_dies_is_502_and_never_replayed() -> None:
    config = "proxies = 1\nservers_per_proxy = 2\n" + FAST
    async with running_stack(config=config) as stack:
        run_dir = str(stack.run_dir)
        for server in ("server-0-0", "server-0-1"):
            assert (await cli("fault", server, "latency=5s", "--run-dir", run_dir)).returncode == 0
        async with stack.session() as client:
            post = asyncio.create_task(client.post("/once", data=b"pay exactly once"))
            holder = ""

            async def received() -> bool:
                nonlocal holder
                for server in ("server-0-0", "server-0-1"):
                    if (await server_status(stack, server)).received.get("POST"):
                        holder = server
                await asyncio.sleep(0.02)  # wait-ok: polling with a deadline
                return bool(holder)

            await until(received, "a server to receive the POST")
            other = "server-0-1" if holder == "server-0-0" else "server-0-0"
            await stack.kill(holder)
            response = await post
            assert response.status == 502
            response.release()
        assert (await server_status(stack, other)).received.get("POST", 0) == 0
