"""WebSocket tunnels through balancer → proxy → server, on the real stack."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter

import aiohttp
import pytest

from lbstack.metrics import parse
from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, router_status, until

WAIT = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def tunnels_total(stack: RunningStack, name: str, result: str = "opened") -> float:
    text = await stack.admin(name).metrics()
    return sum(
        value
        for metric, labels, value in parse(text)
        if metric == "lbstack_tunnels_total" and labels["result"] == result
    )


async def echo(ws: aiohttp.ClientWebSocketResponse, message: str | bytes) -> None:
    if isinstance(message, str):
        await ws.send_str(message)
    else:
        await ws.send_bytes(message)
    answer = await asyncio.wait_for(ws.receive(), WAIT)
    assert answer.data == message


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_websocket_echoes_through_both_tiers(transport: str) -> None:
    port = free_port()
    async with running_stack("--listen", f"tcp://127.0.0.1:{port}") as stack:
        if transport == "unix":
            client = stack.session()
        else:
            client = aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}")
        async with client, client.ws_connect("/ws", heartbeat=None) as ws:
            assert ws._response.headers["X-Served-By"].startswith("server-")
            await echo(ws, "hello, tunnel")
            await echo(ws, bytes(range(256)) * 4096)  # 1 MiB, binary
            await echo(ws, "é" * 300_000)
            pong = ws.ping(b"are you there")
            await asyncio.wait_for(pong, WAIT)
            await ws.close()
            assert ws.close_code == 1000
        assert await tunnels_total(stack, "balancer-0") == 1
        assert sum([await tunnels_total(stack, f"proxy-{p}") for p in (0, 1)]) == 1


async def test_two_hundred_tunnels_held_while_requests_flow() -> None:
    async with (
        running_stack() as stack,
        aiohttp.ClientSession(
            base_url="http://localhost", connector=aiohttp.UnixConnector(stack.socket, limit=0)
        ) as client,
    ):
        sockets = [await client.ws_connect("/ws") for _ in range(200)]
        try:
            seen: Counter[int] = Counter()
            for n in range(100):
                async with client.get(f"/plain/{n}") as response:
                    await response.read()
                    seen[response.status] += 1
            assert seen == Counter({200: 100})
            status = await router_status(stack, "balancer-0")
            assert status.tunnels is not None and status.tunnels.open == 200
            # Tunnels count as load: every proxy holds some of them.
            proxies = [u.in_flight for u in status.upstreams]
            assert sum(proxies) == 200 and min(proxies) > 0, proxies
            await asyncio.gather(*(echo(ws, f"still here {i}") for i, ws in enumerate(sockets)))
            out = await cli("status", "--run-dir", str(stack.run_dir))
            assert out.returncode == 0, out.stderr
            assert "TUNNELS" in out.stdout
            [row] = [line for line in out.stdout.splitlines() if "balancer-0" in line]
            assert " 200 " in f"{row} ", row
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))

        async def all_closed() -> bool:
            tunnels = (await router_status(stack, "balancer-0")).tunnels
            return tunnels is not None and tunnels.open == 0

        await until(all_closed, "every tunnel to close", WAIT)


async def test_idle_tunnels_are_closed_and_the_count_is_capped() -> None:
    config = '[balancer.tunnels]\nmax = 2\nidle_timeout = "600ms"\n'
    async with running_stack(config=config) as stack, stack.session() as client:
        first = await client.ws_connect("/ws", autoping=False)
        second = await client.ws_connect("/ws", autoping=False)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await client.ws_connect("/ws")
        assert refused.value.status == 503
        assert await tunnels_total(stack, "balancer-0", "refused") == 1
        for ws in (first, second):  # idle: the balancer says going away, then closes
            message = await asyncio.wait_for(ws.receive(), WAIT)
            assert message.type == aiohttp.WSMsgType.CLOSE, message
            assert message.data == 1001
            await ws.close()
        async with client.ws_connect("/ws") as third:  # room again
            await echo(third, "after")


async def test_kill_9_of_the_server_ends_the_tunnel_promptly() -> None:
    async with (
        running_stack() as stack,
        stack.session() as client,
        client.ws_connect("/ws") as ws,
    ):
        await echo(ws, "before")
        server = ws._response.headers["X-Served-By"]
        await stack.kill(server)
        message = await asyncio.wait_for(ws.receive(), 5.0)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message


async def test_a_tunnel_outlives_a_reload_until_the_graceful_timeout() -> None:
    config = (
        '[supervisor]\ngraceful_timeout = "5s"\ndrain_window = "500ms"\n'
        '[proxy]\npolicy = "p2c_ewma"\n'
    )
    async with (
        running_stack("--proxies", "1", "--servers-per-proxy", "2", config=config) as stack,
        stack.session() as client,
        client.ws_connect("/ws") as old,
    ):
        await echo(old, "before the reload")
        before = (await stack.component("proxy-0")).pid
        (stack.run_dir.parent / "lbstack.toml").write_text(
            config.replace("p2c_ewma", "least_outstanding")
        )
        reload = asyncio.create_task(cli("reload", "--run-dir", str(stack.run_dir)))
        await stack.wait_for("proxy-0", not_pid=before, timeout=60)
        # The old proxy is draining: its tunnel still carries messages...
        await echo(old, "during the drain")
        # ...while a new tunnel goes to its successor.
        async with client.ws_connect("/ws") as new:
            await echo(new, "to the successor")
            assert await tunnels_total(stack, "proxy-0") == 1
        # Then, by the graceful timeout, the old tunnel is closed with a close frame.
        message = await asyncio.wait_for(old.receive(), 10.0)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert message.data == 1001
        assert (await reload).returncode == 0


async def test_a_server_replaced_by_a_reload_says_going_away() -> None:
    config = (
        '[supervisor]\ngraceful_timeout = "3s"\ndrain_window = "500ms"\n'
        '[server.simulation]\nlatency = "1ms"\n'
    )
    async with (
        running_stack("--proxies", "1", "--servers-per-proxy", "2", config=config) as stack,
        stack.session() as client,
        client.ws_connect("/ws") as ws,
    ):
        await echo(ws, "before the reload")
        (stack.run_dir.parent / "lbstack.toml").write_text(config.replace("1ms", "2ms"))
        out = await cli("reload", "--run-dir", str(stack.run_dir), timeout=90)
        assert out.returncode == 0, out.stderr
        # The old server ran to its graceful timeout, then closed with 1001 through
        # both tunnels; the client never saw a cut connection.
        message = await asyncio.wait_for(ws.receive(), 15.0)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert message.data == 1001
