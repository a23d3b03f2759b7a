"""The supervisor's control socket and Prometheus endpoint, on the real stack."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli

COMPONENTS = {
    "supervisor",
    "balancer-0",
    "proxy-0",
    "proxy-1",
    *(f"server-{p}-{s}" for p in range(2) for s in range(3)),
}


async def _metrics_endpoint(stack: RunningStack) -> str:
    metrics = (await stack.status()).metrics
    assert metrics is not None
    return metrics.http_base


async def test_the_exporter_relays_known_targets_and_refuses_others() -> None:
    async with running_stack() as stack, aiohttp.ClientSession() as client:
        base = await _metrics_endpoint(stack)
        async with stack.session() as data, data.get("/warm") as response:
            assert response.status == 200
        async with client.get(f"{base}/metrics", params={"target": "balancer-0"}) as response:
            text = await response.text()
            assert response.status == 200
            assert (
                'lbstack_requests_total{code="200",instance="balancer-0",role="balancer"}' in text
            )
        async with client.get(f"{base}/metrics") as response:
            text = await response.text()
            assert 'lbstack_child_up{child="server-1-2"' in text
            assert "lbstack_scale_events_total" in text
        for bad in ("nope", "../control", "/tmp/x.sock", "server-0-1.admin.sock"):
            async with client.get(f"{base}/metrics", params={"target": bad}) as response:
                assert response.status == 404, bad
        async with client.get(f"{base}/targets") as response:
            groups = await response.json()
        assert {g["labels"]["lbstack_target"] for g in groups} == COMPONENTS
        on_disk = json.loads((stack.run_dir / "targets.json").read_text())
        assert {g["labels"]["lbstack_target"] for g in on_disk} == COMPONENTS


async def test_a_component_that_does_not_answer_is_a_503_for_prometheus() -> None:
    async with running_stack() as stack:
        base = await _metrics_endpoint(stack)
        pid = await stack.kill("server-0-1", signal.SIGSTOP)
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"{base}/metrics", params={"target": "server-0-1"}) as response,
            ):
                assert response.status == 503
        finally:
            os.kill(pid, signal.SIGCONT)


async def test_status_shows_the_tree_with_live_load() -> None:
    async with running_stack() as stack:
        stop = asyncio.Event()

        async def traffic() -> None:
            async with stack.session() as client:
                for _ in range(5000):  # bounded; ended by ``stop``
                    if stop.is_set():
                        return
                    async with client.get("/") as response:
                        await response.read()

        # Concurrent clients, so both proxies carry load: a lone sequential client may be
        # kept on the faster proxy for the whole one-second window, by design of p2c_ewma.
        load = [asyncio.create_task(traffic()) for _ in range(4)]
        try:
            out = await cli("status", "--run-dir", str(stack.run_dir), "--interval", "1")
        finally:
            stop.set()
            await asyncio.gather(*load)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        balancer = next(line for line in lines if "balancer-0" in line)
        assert balancer.split()[6] != "0"  # NAME STATE PID RESTARTS REQ/S: ├─ shifts by one
        assert any("└─ server-1-2" in line for line in lines)
        # A server's SHARE is its part of its group's requests: where a group had traffic
        # in the window, its servers' shares add up to 100 % (give or take rounding).
        shares: dict[str, list[int]] = {}
        for line in lines:
            name = next((word for word in line.split() if word.startswith("server-")), None)
            if name is not None and line.endswith("%"):
                shares.setdefault(name.rsplit("-", 1)[0], []).append(int(line.split()[-1][:-1]))
        assert shares, out.stdout
        for group, parts in shares.items():
            assert 98 <= sum(parts) <= 102, (group, out.stdout)


async def test_control_status_and_probes() -> None:
    async with running_stack() as stack:
        assert await stack.control.ready()
        assert "lbstack_child_restarts_total" in await stack.control.metrics()
        routing = await cli("status", "proxy-1", "--run-dir", str(stack.run_dir))
        assert routing.returncode == 0, routing.stderr
        assert "policy p2c_ewma" in routing.stdout
        assert [line.split()[:2] for line in routing.stdout.splitlines()[-3:]] == [
            [f"server-1-{s}", "in"] for s in range(3)
        ]
        unknown = await cli("status", "proxy-9", "--run-dir", str(stack.run_dir))
        assert unknown.returncode == 1 and "no component named 'proxy-9'" in unknown.stderr
