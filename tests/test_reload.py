"""Reload, rolling restart and graceful stops lose no request (real processes).

Every test runs a bounded stream of GETs and POSTs (a POST is never retried by the
stack, so it shows any connection a component closed under a router) through the
balancer while the stack changes underneath, and requires every answer to be a 200.
"""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import aiohttp

from lbstack.address import Address
from lbstack.client import fetch
from lbstack.testing import RunningStack, running_stack
from tests.harness import (
    cli,
    router_status,
    server_status,
    steady_load,
    supervisor_samples,
    until,
)

TOPOLOGY = ("--proxies", "2", "--servers-per-proxy", "2")
CONFIG = """
[proxy]
policy = "p2c_ewma"

[server.simulation]
latency = "1ms"
"""


def config_file(stack: RunningStack) -> Path:
    return stack.run_dir.parent / "lbstack.toml"


async def pids(stack: RunningStack) -> dict[str, int | None]:
    return {c.name: c.pid for c in (await stack.status()).components}


def only_200s(seen: Counter[str]) -> None:
    outcomes: Counter[str] = Counter()
    for key, count in seen.items():
        outcomes[key.split(":")[0]] += count
    print(f"outcomes: {dict(outcomes)}")
    assert set(outcomes) == {"200"}, outcomes
    assert outcomes["200"] > 50, "the load did not run"


async def served_after(stack: RunningStack, seen: Counter[str], count: int) -> None:
    """Until the stream has answered ``count`` more requests: it runs through the change."""
    target = sum(seen.values()) + count

    async def check() -> bool:
        return sum(seen.values()) >= target

    await until(check, f"{count} more answers")


async def test_sighup_replaces_the_changed_children_one_by_one_losing_no_request() -> None:
    async with running_stack(*TOPOLOGY, config=CONFIG) as stack:
        before = await pids(stack)
        config_file(stack).write_text(
            CONFIG.replace("p2c_ewma", "least_outstanding").replace("1ms", "2ms")
        )
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            stack.process.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return "reload done" in stack.logs()

            await until(reloaded, "the reload", timeout=90)
            await served_after(stack, seen, 50)
        only_200s(seen)
        after = await pids(stack)
        # Servers (simulation) and proxies (policy) changed; the balancer did not.
        changed = {name for name in before if before[name] != after[name]}
        assert changed == {
            "proxy-0",
            "proxy-1",
            "server-0-0",
            "server-0-1",
            "server-1-0",
            "server-1-1",
        }, changed
        assert (await router_status(stack, "proxy-0")).policy == "least_outstanding"
        # The new processes took over the admin paths; the old ones left nothing behind.
        assert not list(stack.run_dir.glob("*.old.admin.sock"))
        assert not list(stack.run_dir.glob("*.next.admin.sock"))
        assert "proxy-0 replaced: pid" in stack.logs()


async def test_rolling_restart_replaces_every_child_losing_no_request() -> None:
    async with running_stack(*TOPOLOGY, "--balancers", "2", config=CONFIG) as stack:
        before = await pids(stack)
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            out = await cli("restart", "--rolling", "--run-dir", str(stack.run_dir), timeout=180)
            assert out.returncode == 0, out.stderr
            await served_after(stack, seen, 50)
        only_200s(seen)
        after = await pids(stack)
        children = set(before) - {"supervisor"}
        assert all(before[n] != after[n] for n in children), (before, after)
        assert after["supervisor"] == before["supervisor"]
        samples = await supervisor_samples(stack, "lbstack_child_replacements_total")
        replacements = {labels["child"]: value for labels, value in samples}
        assert replacements == {name: 1.0 for name in children}, replacements


async def test_an_invalid_config_is_refused_and_the_stack_keeps_serving() -> None:
    async with running_stack(*TOPOLOGY, config=CONFIG) as stack:
        before = await pids(stack)
        config_file(stack).write_text(CONFIG.replace('"p2c_ewma"', '"fastest"'))
        async with steady_load(stack, workers=2) as seen:
            out = await cli("reload", "--run-dir", str(stack.run_dir))
            assert out.returncode == 2, out.stderr
            assert "proxy.policy" in out.stderr and "fastest" in out.stderr, out.stderr

            stack.process.send_signal(signal.SIGHUP)

            async def rejected() -> bool:
                return "reload rejected" in stack.logs()

            await until(rejected, "the SIGHUP reload to be rejected")

            # A change that needs new sockets is refused with its reason.
            config_file(stack).write_text('listen = ["tcp://127.0.0.1:0"]\n' + CONFIG)
            out = await cli("reload", "--run-dir", str(stack.run_dir))
            assert out.returncode == 1, out.stderr
            assert "listen: changing it needs a restart" in out.stderr, out.stderr
            await served_after(stack, seen, 20)
        only_200s(seen)
        assert await pids(stack) == before
        assert (await router_status(stack, "proxy-0")).policy == "p2c_ewma"


async def test_a_dry_run_says_what_a_reload_would_do_and_does_nothing() -> None:
    async with running_stack(*TOPOLOGY, config=CONFIG) as stack:
        before = await pids(stack)
        config_file(stack).write_text(
            "balancers = 2\n" + CONFIG.replace("p2c_ewma", "least_outstanding")
        )
        out = await cli("reload", "--dry-run", "--run-dir", str(stack.run_dir))
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan == {
            "dry_run": True,
            # The proxies' policy changed; the balancer's peers change with their number.
            "replaced": ["proxy-0", "proxy-1", "balancer-0"],
            "balancers": ["+balancer-1"],
            "scaled": {},
        }, plan
        config_file(stack).write_text(CONFIG.replace('"p2c_ewma"', '"fastest"'))
        out = await cli("reload", "--dry-run", "--run-dir", str(stack.run_dir))
        assert out.returncode == 2 and "proxy.policy" in out.stderr, out.stderr
        assert await pids(stack) == before
        assert (await router_status(stack, "proxy-0")).policy == "p2c_ewma"


async def test_a_stopped_proxy_drains_and_loses_no_request() -> None:
    async with running_stack(*TOPOLOGY, config=CONFIG) as stack:
        victim = await stack.component("proxy-1")
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            await stack.kill("proxy-1", signal.SIGTERM)
            await stack.wait_for("proxy-1", not_pid=victim.pid)
            await served_after(stack, seen, 100)
        only_200s(seen)
        assert "SIGTERM: draining" in stack.logs()


async def test_a_draining_component_says_connection_close_and_not_ready() -> None:
    """What a router in front sees of a stopping server: not ready, and no keep-alive."""
    async with running_stack("--proxies", "1", "--servers-per-proxy", "1") as stack:
        data = Address.unix(str(stack.run_dir / "server-0-0.sock"))
        admin = Address.unix(str(stack.run_dir / "server-0-0.admin.sock"))
        # Hold a keep-alive connection open, so the server has to wait out its window.
        async with aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=data.path)
        ) as session:
            async with session.get("http://x/") as response:
                assert response.status == 200
                assert response.headers.get("Connection", "").lower() != "close"
            await stack.kill("server-0-0", signal.SIGTERM)

            async def draining() -> bool:
                try:
                    status, body = await fetch(admin, "/readyz", timeout=1.0)
                except OSError:
                    return False
                return status == 503 and b"draining" in body

            await until(draining, "the server to report draining")
            async with session.get("http://x/") as response:
                assert response.status == 200
                assert response.headers["Connection"].lower() == "close"


async def test_a_drain_outlives_the_replacement_and_the_restart_of_the_router() -> None:
    """A drain lives in the routers; a router replaced or restarted must not undo it."""
    async with running_stack(*TOPOLOGY, config=CONFIG) as stack:
        run_dir = ("--run-dir", str(stack.run_dir))
        assert (await cli("drain", "server-0-1", *run_dir)).returncode == 0

        async def drained() -> dict[str, bool]:
            return {u.name: u.draining for u in await stack.admin("proxy-0").upstreams()}

        assert await drained() == {"server-0-0": False, "server-0-1": True}
        out = await cli("restart", "--rolling", "proxy-0", *run_dir, timeout=120)
        assert out.returncode == 0, out.stderr
        assert await drained() == {"server-0-0": False, "server-0-1": True}

        before = await stack.kill("proxy-0")
        await stack.wait_for("proxy-0", not_pid=before)
        assert await drained() == {"server-0-0": False, "server-0-1": True}
        assert (await stack.component("server-0-1")).state == "draining"
        async with steady_load(stack, workers=2) as seen:
            await served_after(stack, seen, 40)
        assert not [key for key in seen if key.endswith(":server-0-1")], seen


GUNICORN = Path(sys.executable).parent / "gunicorn"
APP_COMMAND = (
    f"{GUNICORN} tests.apps:app -k aiohttp.GunicornWebWorker "
    "--bind unix:{socket} --no-control-socket --workers 1"
)
TWO_KINDS = f"""
[proxy]
policy = "p2c_ewma"
[server.simulation]
latency = "1ms"
[supervisor]
restart_backoff_initial = "10ms"
[[groups]]
servers = 2
[[groups]]
servers = 1
[groups.server]
kind = "command"
command = "{APP_COMMAND}"
"""


async def test_a_reload_that_fails_midway_is_rolled_back_and_the_stack_keeps_serving() -> None:
    """Group 0's servers are replaced first (new latency); then group 1's new command
    cannot start: the reload fails, group 0 gets its old config back, the proxies are
    never touched, and nothing else stops: not the stack, not a request."""
    async with running_stack(config=TWO_KINDS) as stack:
        before = await pids(stack)
        config_file(stack).write_text(
            TWO_KINDS.replace("1ms", "2ms")
            .replace("p2c_ewma", "least_outstanding")
            .replace(APP_COMMAND, "false {socket}")
        )
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            out = await cli("reload", "--run-dir", str(stack.run_dir), timeout=120)
            assert out.returncode == 1, out.stderr
            assert "did not become ready" in out.stderr, out.stderr
            assert "rolled back" in out.stderr, out.stderr
            await served_after(stack, seen, 50)
        only_200s(seen)
        assert stack.process.returncode is None, stack.logs()
        after = await pids(stack)
        assert set(after) == set(before), (before, after)
        assert {n for n in before if before[n] != after[n]} == {"server-0-0", "server-0-1"}
        for name in ("server-0-0", "server-0-1"):
            simulation = (await server_status(stack, name)).simulation
            assert simulation.latency == 0.001, (name, simulation)
        assert (await router_status(stack, "proxy-0")).policy == "p2c_ewma"
        # The next reload reads the running config, not the refused one.
        config_file(stack).write_text(TWO_KINDS)
        out = await cli("reload", "--run-dir", str(stack.run_dir), timeout=120)
        assert out.returncode == 0, out.stderr
        assert await pids(stack) == after
