"""The real stack, started with the CLI in a temp run dir, driven over its sockets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from aiohttp import web

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, serving, short_tmpdir, statuses, steady_load, until

SERVERS = {f"server-{p}-{s}" for p in range(2) for s in range(3)}


@pytest.fixture
async def stack() -> AsyncIterator[RunningStack]:
    # Round robin: these tests check that every server is reachable, not routing.
    async with running_stack("--policy", "round_robin") as running:
        yield running


async def _served_by(stack: RunningStack, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with stack.session() as client:
        for _ in range(count):
            async with client.get("/hello") as response:
                assert response.status == 200, await response.text()
                seen[response.headers["X-Served-By"]] += 1
    return seen


async def _reach_all(
    stack: RunningStack, servers: set[str] = SERVERS, timeout: float = 30.0
) -> None:
    """Send requests until every one of ``servers`` has answered one (health checks may
    keep a just-restarted upstream out for a moment)."""
    seen: set[str] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while seen != servers:
        seen |= set(await _served_by(stack, 12))
        assert seen <= servers
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {sorted(seen)} answered within {timeout}s")


async def test_every_server_is_reached_through_the_balancer(stack: RunningStack) -> None:
    assert "curl --unix-socket" in stack.banner
    seen = await _served_by(stack, 60)
    assert set(seen) == SERVERS


async def test_requests_and_bodies_come_back_intact(stack: RunningStack) -> None:
    async with stack.session() as client:
        async with client.get("/a/b?x=1&y=%20z", headers={"X-Custom": "v"}) as response:
            echo = await response.json()
            assert response.status == 200
            assert echo["method"] == "GET"
            assert echo["path"] == "/a/b"
            assert echo["headers"]["X-Custom"] == "v"
            assert response.headers["X-Request-Id"]
        async with client.post("/submit", data=b"x" * 100_000) as response:
            echo = await response.json()
            assert echo["body_bytes"] == 100_000
            assert echo["body_sha256"] == hashlib.sha256(b"x" * 100_000).hexdigest()

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(64):
                yield bytes([i % 256]) * 65536

        digest = hashlib.sha256(b"".join(bytes([i % 256]) * 65536 for i in range(64)))
        async with client.put("/upload", data=chunks()) as response:
            echo = await response.json()
            assert echo["body_bytes"] == 64 * 65536
            assert echo["body_sha256"] == digest.hexdigest()
        size = 50 * 1024 * 1024
        async with client.get("/big", headers={"X-Sim-Response-Bytes": str(size)}) as response:
            assert response.status == 200
            received = 0
            async for chunk in response.content.iter_chunked(1 << 20):
                received += len(chunk)
            assert received == size


@pytest.mark.parametrize("victim", ["server-0-1", "proxy-1", "balancer-0"])
async def test_a_killed_child_is_restarted_and_the_stack_keeps_answering(
    stack: RunningStack, victim: str
) -> None:
    before = await stack.component(victim)
    await stack.kill(victim)
    after = await stack.wait_for(victim, not_pid=before.pid)
    assert after.restarts == before.restarts + 1
    await _reach_all(stack)
    assert "died: killed by SIGKILL" in stack.logs()


async def test_sigterm_leaves_no_process_and_no_socket_file() -> None:
    async with running_stack() as stack:
        status = await stack.status()
        pids = [c.pid for c in status.components]
        assert len(pids) == 1 + 1 + 2 + 6
        assert sorted(p.name for p in stack.run_dir.glob("*.sock")) == sorted(
            ["balancer.sock", "control.sock", "balancer-0.admin.sock"]
            + [f"proxy-{p}{s}.sock" for p in range(2) for s in ("", ".admin")]
            + [f"{name}{s}.sock" for name in SERVERS for s in ("", ".admin")]
        )
        assert (stack.run_dir / "balancer.sock").stat().st_mode & 0o777 == 0o660
        assert (stack.run_dir / "control.sock").stat().st_mode & 0o777 == 0o600
        assert await stack.stop() == 0
        assert not list(stack.run_dir.glob("*.sock"))
        assert not [
            pid
            for pid in pids
            if pid is not None
            and psutil.pid_exists(pid)
            and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        ]


async def test_malformed_and_oversize_requests_get_4xx_and_the_balancer_keeps_serving(
    stack: RunningStack,
) -> None:
    async def raw(payload: bytes) -> bytes:
        reader, writer = await asyncio.open_unix_connection(stack.socket)
        writer.write(payload)
        await writer.drain()
        answer = await reader.read(65536)
        writer.close()
        return answer.split(b"\r\n", 1)[0].split(b" ")[1]  # the status code

    assert await raw(b"NOT HTTP AT ALL\r\n\r\n") == b"400"
    big = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    assert await raw(big) == b"431"
    chunked10 = b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert await raw(chunked10) == b"400"
    await _reach_all(stack)


async def test_status_json_has_the_contract_fields(stack: RunningStack) -> None:
    out = await cli("status", "--json", "--run-dir", str(stack.run_dir))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["run_dir"] == str(stack.run_dir)
    by_name = {c["name"]: c for c in status["components"]}
    assert by_name["supervisor"]["role"] == "supervisor"
    server = by_name["server-0-1"]
    assert server["role"] == "server"
    assert server["group"] == "proxy-0"
    assert server["state"] == "ready"
    assert server["restarts"] == 0
    assert server["listen"] == [f"unix:{stack.run_dir}/server-0-1.sock"]
    assert server["admin"] == f"unix:{stack.run_dir}/server-0-1.admin.sock"
    assert by_name["balancer-0"]["listen"][0] == f"unix:{stack.run_dir}/balancer.sock"
    table = await cli("status", "--run-dir", str(stack.run_dir))
    assert table.returncode == 0
    assert "server-1-2" in table.stdout and "ready" in table.stdout


async def test_fault_injection_through_the_cli(stack: RunningStack) -> None:
    run_dir = str(stack.run_dir)
    out = await cli("fault", "server-0-0", "error_rate=1", "--run-dir", run_dir)
    assert out.returncode == 0, out.stderr
    seen: Counter[int] = Counter()
    async with stack.session() as client:
        for _ in range(30):
            async with client.get("/") as response:
                if response.headers.get("X-Served-By") == "server-0-0":
                    seen[response.status] += 1
    assert seen and set(seen) == {500}
    bad = await cli("fault", "server-0-0", "latency=soon", "--run-dir", run_dir)
    assert bad.returncode != 0 and "latency" in bad.stderr
    unknown = await cli("fault", "server-9-9", "clear", "--run-dir", run_dir)
    assert unknown.returncode != 0 and "no simulated server named 'server-9-9'" in unknown.stderr
    before = await stack.component("server-0-0")
    assert (await cli("fault", "server-0-0", "crash", "--run-dir", run_dir)).returncode == 0
    await stack.wait_for("server-0-0", not_pid=before.pid)
    # A restarted server starts from its configured behaviour again.
    await _reach_all(stack)


async def test_a_one_gib_upload_streams_with_bounded_memory(stack: RunningStack) -> None:
    status = await stack.status()
    pids = {
        c.name: c.pid for c in status.components if c.pid is not None and c.role != "supervisor"
    }
    baseline = {name: psutil.Process(pid).memory_info().rss for name, pid in pids.items()}
    chunk = os.urandom(1 << 20)
    total = 1024

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total):
            yield chunk

    peak = dict(baseline)

    async def sample() -> None:
        while True:
            for name, pid in pids.items():
                peak[name] = max(peak[name], psutil.Process(pid).memory_info().rss)
            await asyncio.sleep(0.05)  # wait-ok: sampling memory, not waiting for a state

    sampler = asyncio.create_task(sample())
    try:
        async with (
            stack.session(timeout=aiohttp.ClientTimeout(total=300)) as client,
            client.post("/upload", data=body()) as response,
        ):
            echo = await response.json()
    finally:
        sampler.cancel()
    assert echo["body_bytes"] == total * len(chunk)
    growth = {name: (peak[name] - baseline[name]) / 2**20 for name in pids}
    assert max(growth.values()) < 64, growth


async def test_listen_adds_a_tcp_listener() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with running_stack("--listen", f"tcp://127.0.0.1:{port}") as stack:
        assert f"tcp://127.0.0.1:{port}" in stack.banner
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{port}/x") as response,
        ):
            assert response.status == 200
            assert response.headers["X-Served-By"] in SERVERS


async def test_a_bad_config_exits_2_with_the_field_and_starts_nothing() -> None:
    run_dir = short_tmpdir() / "run"
    out = await cli("up", "--run-dir", str(run_dir), "--proxies", "0")
    assert out.returncode == 2
    assert "proxies" in out.stderr and "found 0" in out.stderr
    assert not run_dir.exists()
    out = await cli("up", "--run-dir", "/tmp/" + "d" * 100)
    assert out.returncode == 2 and "107-byte limit" in out.stderr


async def test_refuses_to_clobber_a_live_socket_or_a_busy_port() -> None:
    async with running_stack() as stack:
        out = await cli("up", "--run-dir", str(stack.run_dir), "--metrics-listen", "off")
        assert out.returncode == 1
        assert "a live server is already listening" in out.stderr
        assert (await stack.component("balancer-0")).state == "ready"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = await cli(
            "up",
            "--run-dir",
            str(short_tmpdir() / "r"),
            "--metrics-listen",
            f"tcp://127.0.0.1:{port}",
        )
        assert out.returncode == 1 and "port is in use" in out.stderr


async def test_a_child_failing_at_boot_stops_the_stack_with_a_clear_message() -> None:
    config = (
        '[supervisor]\nboot_failures = 2\nrestart_backoff_initial = "10ms"\n'
        '[server]\nkind = "command"\ncommand = "false {socket}"\n'
    )
    base = short_tmpdir()
    (base / "c.toml").write_text(config)
    out = await cli(
        "up",
        "--run-dir",
        str(base / "run"),
        "--config",
        str(base / "c.toml"),
        "--metrics-listen",
        "off",
    )
    assert out.returncode == 1
    assert "failed 2 times in a row before becoming ready" in out.stderr
    assert not list((base / "run").glob("*.sock"))


LEFTOVER = "987654"  # a sleep nothing else runs


async def test_a_server_that_served_is_restarted_for_as_long_as_it_cannot_start() -> None:
    """``boot_failures`` stops the stack only while it boots: a server that served and
    then can't start again is retried (and logged) while the others serve, and comes
    back once it can start. What a dead server leaves in its session goes with it."""
    gunicorn = Path(sys.executable).parent / "gunicorn"
    gate = short_tmpdir() / "gate"  # the server starts only while this file exists
    gate.touch()
    # ``sleep`` stands for a helper the server leaves behind: it ignores its parent's death.
    config = (
        "proxies = 1\nservers_per_proxy = 2\n"
        '[supervisor]\nboot_failures = 2\nrestart_backoff_initial = "10ms"\n'
        'restart_backoff_max = "100ms"\n'
        '[server]\nkind = "command"\n'
        f"command = \"sh -c 'test -e {gate} && {{ sleep {LEFTOVER} & exec {gunicorn} "
        "tests.apps:app -k aiohttp.GunicornWebWorker --bind unix:{socket} "
        "--no-control-socket --workers 1; }'\"\n"
    )
    async with running_stack(config=config) as stack:
        first = await stack.component("server-0-0")
        assert first.pid is not None
        left = [p for p in psutil.Process(first.pid).children() if p.name() == "sleep"]
        assert len(left) == 1, left
        gate.unlink()
        await stack.kill("server-0-0")

        async def retried() -> bool:
            return "server-0-0 failed 2 times in a row" in stack.logs()

        await until(retried, "server-0-0 to fail to start twice")
        assert "still restarted" in stack.logs()
        assert stack.process.returncode is None, stack.logs()

        async def cleaned() -> bool:
            return not left[0].is_running() or left[0].status() == psutil.STATUS_ZOMBIE

        await until(cleaned, "the dead server's leftover to be killed with it")
        async with stack.session() as client:
            for _ in range(10):
                async with client.get("/own") as response:
                    assert response.status == 200
                    assert response.headers["X-Served-By"] == "server-0-1"
        # Something else holding the server's socket is a failed start too, retried.
        # (Bound and listening elsewhere first, then renamed in place: a start's stale
        # socket check must never see it half made.)
        holder = socket.socket(socket.AF_UNIX)
        path = stack.run_dir / "server-0-0.sock"
        holder.bind(str(path.with_name("holder.sock")))
        holder.listen()
        path.with_name("holder.sock").replace(path)

        async def refused() -> bool:
            return "could not start: a live server is already listening" in stack.logs()

        await until(refused, "a start to find the socket taken")
        holder.close()
        gate.touch()

        async def back() -> bool:
            server = await stack.component("server-0-0")
            return server.state == "ready" and server.pid != first.pid

        await until(back, "server-0-0 to be ready again")
        assert stack.process.returncode is None, stack.logs()
    # The stack's stop takes every server's leftovers too.
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == ["sleep", LEFTOVER]
    ]


async def test_a_group_of_own_servers_under_gunicorn() -> None:
    gunicorn = Path(sys.executable).parent / "gunicorn"
    config = (
        "proxies = 1\nservers_per_proxy = 2\n"
        '[proxy]\npolicy = "round_robin"\n'
        '[server]\nkind = "command"\n'
        f'command = "{gunicorn} tests.apps:app -k aiohttp.GunicornWebWorker '
        '--bind unix:{socket} --no-control-socket --workers 1"\n'
    )
    async with running_stack(config=config) as stack:
        seen: Counter[str] = Counter()
        async with stack.session() as client:
            for _ in range(10):
                async with client.get("/own") as response:
                    assert response.status == 200
                    assert (await response.json())["app"] == "own"
                    seen[response.headers["X-Served-By"]] += 1
        assert set(seen) == {"server-0-0", "server-0-1"}


async def test_a_group_of_servers_at_addresses_something_else_runs() -> None:
    base = short_tmpdir()

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="external")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    config = (
        f'[[groups]]\n[groups.server]\nkind = "address"\naddresses = ["unix:{base}/ext.sock"]\n'
    )
    async with (
        serving(app, base / "ext.sock"),
        running_stack(config=config) as stack,
        stack.session() as client,
        client.get("/") as response,
    ):
        assert await response.text() == "external"
        assert response.headers["X-Served-By"] == "server-0-0"


async def test_two_balancers_share_the_socket_and_one_dying_refuses_nobody() -> None:
    workers = 8
    async with running_stack("--balancers", "2") as stack:
        async with steady_load(stack, workers=workers) as seen:
            victim = await stack.component("balancer-1")

            async def traffic(more: int) -> bool:
                return sum(seen.values()) > more

            await until(lambda: traffic(200), "traffic through both balancers")
            await stack.kill("balancer-1")
            await stack.wait_for("balancer-1", not_pid=victim.pid)
            mark = sum(seen.values()) + 200
            await until(lambda: traffic(mark), "traffic after the replacement")
        outcomes = Counter(key.split(":")[0] for key in seen.elements())
        print(f"outcomes with one of two balancers killed: {dict(outcomes)}")
        assert outcomes["refused"] == 0
        # Only requests in flight on the killed process may fail: one per client at most.
        assert outcomes["failed"] <= workers
        assert statuses(seen) <= {"200", "failed"}
