"""Scaling a group and draining servers by hand, on the real stack, under bounded load."""

from __future__ import annotations

import json

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, statuses, steady_load, until

# Quick slow start and checks so a new server takes traffic within a second or two.
FAST = """
[proxy]
policy = "round_robin"
slow_start = "500ms"
[proxy.health]
interval = "200ms"
"""


async def _servers(stack: RunningStack, group: str) -> list[str]:
    status = await stack.status()
    return [c.name for c in status.components if c.role == "server" and c.group == group]


async def test_scaling_up_and_down_under_load_fails_no_request() -> None:
    async with running_stack(config=FAST) as stack, steady_load(stack) as seen:
        run_dir = str(stack.run_dir)
        out = await cli("scale", "proxy-0", "5", "--run-dir", run_dir, timeout=120)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["servers"] == [f"server-0-{i}" for i in range(5)]
        assert await _servers(stack, "proxy-0") == [f"server-0-{i}" for i in range(5)]
        assert (stack.run_dir / "server-0-4.sock").exists()

        async def new_servers_serve() -> bool:
            return any(key.endswith("server-0-4") for key in seen)

        await until(new_servers_serve, "server-0-4 to take traffic")
        targets = {
            g["labels"]["lbstack_target"]
            for g in json.loads((stack.run_dir / "targets.json").read_text())
        }
        assert "server-0-4" in targets

        out = await cli("scale", "proxy-0", "2", "--run-dir", run_dir, timeout=120)
        assert out.returncode == 0, out.stderr
        assert await _servers(stack, "proxy-0") == ["server-0-0", "server-0-1"]
        assert not (stack.run_dir / "server-0-2.sock").exists()
        upstreams = await stack.admin("proxy-0").upstreams()
        assert [u.name for u in upstreams] == ["server-0-0", "server-0-1"]
        before = sum(seen.values())

        async def more_traffic() -> bool:
            return sum(seen.values()) > before + 200

        await until(more_traffic, "traffic after the shrink")
        metrics = await stack.control.metrics()
        for direction, count in (("up", 2), ("down", 3)):
            assert (
                f'lbstack_scale_events_total{{direction="{direction}",group="proxy-0",'
                f'instance="supervisor",role="supervisor"}} {count}.0'
            ) in metrics
        assert (
            'lbstack_group_servers{group="proxy-0",instance="supervisor",role="supervisor"} 2.0'
            in metrics
        )
    assert statuses(seen) == {"200"}, seen


async def test_drain_and_undrain_by_hand() -> None:
    async with running_stack(config=FAST) as stack, steady_load(stack) as seen:
        run_dir = str(stack.run_dir)
        out = await cli("drain", "server-1-1", "--run-dir", run_dir)
        assert out.returncode == 0, out.stderr
        assert (await stack.component("server-1-1")).state == "draining"
        mark = seen["200:server-1-1"]
        total = sum(seen.values())

        async def plenty() -> bool:
            return sum(seen.values()) > total + 300

        await until(plenty, "traffic while drained")
        assert seen["200:server-1-1"] == mark  # drained: no new request reached it
        out = await cli("undrain", "server-1-1", "--run-dir", run_dir)
        assert out.returncode == 0, out.stderr

        async def back() -> bool:
            return seen["200:server-1-1"] > mark

        await until(back, "server-1-1 to take traffic again")
        assert (await stack.component("server-1-1")).state == "ready"
    assert statuses(seen) == {"200"}, seen


async def test_scale_and_drain_refuse_what_they_cannot_do() -> None:
    async with running_stack() as stack:
        run_dir = str(stack.run_dir)
        for args, message in (
            (("scale", "proxy-9", "3"), "no group named 'proxy-9'"),
            (("scale", "proxy-0", "0"), "expected 1 to 1024 servers, found 0"),
            (("drain", "server-9-9"), "no server or proxy named 'server-9-9'"),
            (("drain", "balancer-0"), "no server or proxy named 'balancer-0'"),
        ):
            out = await cli(*args, "--run-dir", run_dir)
            assert out.returncode == 1, (args, out.stdout)
            assert message in out.stderr, (args, out.stderr)


async def test_draining_the_last_upstream_of_a_router_needs_force() -> None:
    async with running_stack("--servers-per-proxy", "2") as stack:
        run_dir = str(stack.run_dir)
        assert (await cli("drain", "server-0-0", "--run-dir", run_dir)).returncode == 0
        out = await cli("drain", "server-0-1", "--run-dir", run_dir)
        assert out.returncode == 1, out.stdout
        assert "would leave proxy-0 nothing to send requests to" in out.stderr, out.stderr
        assert (await stack.component("server-0-1")).state == "ready"
        async with stack.session() as client:
            for _ in range(8):  # proxy-0 still serves, through server-0-1
                async with client.get("/") as response:
                    assert response.status == 200
        # Both proxies drained: the balancer too would be left with nothing.
        assert (await cli("drain", "proxy-1", "--run-dir", run_dir)).returncode == 0
        out = await cli("drain", "proxy-0", "--run-dir", run_dir)
        assert out.returncode == 1 and "would leave balancer-0" in out.stderr, out.stderr
        out = await cli("drain", "--force", "server-0-1", "--run-dir", run_dir)
        assert out.returncode == 0, out.stderr
        assert (await stack.component("server-0-1")).state == "draining"
