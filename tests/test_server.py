"""The built-in simulated server: its data plane, its simulation and its fault API."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import random
import statistics
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import pytest
from aiohttp import WSMsgType, WSServerHandshakeError, web
from aiohttp.test_utils import BaseTestServer, TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from lbstack.component import ChildSpec, Component
from lbstack.config import Simulation, validate
from lbstack.errors import StartupError
from lbstack.httpserver import DataServer
from lbstack.metrics import parse
from lbstack.simulation import Simulator, burn_cpu, sample_latency
from lbstack.tiers.server import CRASH_EXIT_STATUS, WEBSOCKET_MAX_MESSAGE, ExitFn, create

NAME = "server-0-0"
MiB = 1024 * 1024


def make_spec(server: dict[str, Any] | None = None, group: int | None = 0) -> ChildSpec:
    config = validate({"servers_per_proxy": 1, "proxies": 1, "server": server or {}})
    return ChildSpec(
        name=NAME, role="server", group=group, listen_fds=(), admin_fd=-1, config=config
    )


class DataTestServer(BaseTestServer):
    """Serves a component's data plane as lbstack.worker does."""

    def __init__(self, component: Component) -> None:
        super().__init__()
        self._component = component

    async def _make_runner(self, **kwargs: Any) -> web.ServerRunner:
        # kwargs (handler_cancellation=True) are the test server's, not the child's.
        return web.ServerRunner(self._component.data_server())


@dataclass
class Harness:
    """One built-in server under test: a client on its data plane and one on its admin."""

    component: Component
    data: TestClient[web.BaseRequest, None]
    admin: TestClient[web.Request, web.Application]

    async def fault(self, body: object) -> tuple[int, dict[str, Any]]:
        async with self.admin.post("/fault", json=body) as response:
            return response.status, await response.json()

    async def status(self) -> dict[str, Any]:
        async with self.admin.get("/status") as response:
            assert response.status == 200
            result: dict[str, Any] = await response.json()
            return result

    async def reports(self, key: str, value: object) -> bool:
        """Whether ``GET /status`` shows ``value`` for ``key``."""
        return bool((await self.status())[key] == value)


class Start(Protocol):
    def __call__(
        self,
        simulation: dict[str, Any] | None = None,
        *,
        seed: int = 7,
        exit_process: ExitFn | None = None,
    ) -> Awaitable[Harness]: ...


def _unexpected_exit(status: int) -> NoReturn:
    raise AssertionError(f"the server tried to exit with status {status}")


@pytest.fixture
def start(aiohttp_client: AiohttpClient) -> Start:
    async def go(
        simulation: dict[str, Any] | None = None,
        *,
        seed: int = 7,
        exit_process: ExitFn | None = None,
    ) -> Harness:
        component = create(
            make_spec({"simulation": simulation or {}}),
            rng=random.Random(seed),
            exit_process=exit_process or _unexpected_exit,
        )
        data: TestClient[web.BaseRequest, None] = await aiohttp_client(DataTestServer(component))
        admin = await aiohttp_client(component.admin)
        return Harness(component, data, admin)

    return go


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10.0) -> None:
    """Poll ``check`` until it holds; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)  # wait-ok: polling with a deadline


# --- data plane ----------------------------------------------------------------------


async def test_echoes_the_request(start: Start) -> None:
    server = await start()
    body = b"hello world\n" * 1000
    headers = CIMultiDict([("X-Test", "one"), ("X-Multi", "1"), ("X-Multi", "2")])
    async with server.data.post("/some/a%20b?a=1&a=2&b=x", data=body, headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Served-By"] == NAME
        echo = await response.json()
    assert echo["server"] == NAME
    assert echo["method"] == "POST"
    assert echo["path"] == "/some/a b"
    assert echo["raw_path"] == "/some/a%20b?a=1&a=2&b=x"
    assert echo["version"] == "1.1"
    assert echo["query_string"] == "a=1&a=2&b=x"
    assert echo["query"] == {"a": ["1", "2"], "b": ["x"]}
    assert echo["headers"]["X-Test"] == "one"
    assert echo["headers"]["X-Multi"] == ["1", "2"]
    assert echo["headers"]["Content-Length"] == str(len(body))
    assert echo["body_bytes"] == len(body)
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["padding"] == ""


async def test_answers_any_method_and_path(start: Start) -> None:
    server = await start()
    async with server.data.request("PURGE", "/") as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["method"] == "PURGE"
    assert echo["body_bytes"] == 0
    assert echo["body_sha256"] == hashlib.sha256(b"").hexdigest()


async def test_upload_is_streamed_in_bounded_memory(start: Start) -> None:
    server = await start()
    chunk = random.Random(1).randbytes(256 * 1024)
    count = 256  # 64 MiB
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    tracemalloc.start()
    try:
        async with server.data.put("/upload", data=body()) as response:
            echo = await response.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert echo["body_bytes"] == count * len(chunk)
    assert echo["body_sha256"] == expected.hexdigest()
    assert peak < 16 * MiB, f"peak {peak} bytes for a {count * len(chunk)}-byte upload"


async def test_response_is_padded(start: Start) -> None:
    server = await start({"response_size": "1KiB"})
    async with server.data.get("/") as response:
        echo = await response.json()
    assert echo["padding"] == "x" * 1024


async def test_error_rate_one_always_fails(start: Start) -> None:
    server = await start({"error_rate": 1.0, "error_status": 503})
    for _ in range(20):
        async with server.data.get("/") as response:
            assert response.status == 503
            assert response.headers["X-Served-By"] == NAME
            assert await response.json() == {
                "server": NAME,
                "error": "simulated error",
                "status": 503,
            }


async def test_error_rate_zero_never_fails(start: Start) -> None:
    server = await start({"error_rate": 0.0})
    for _ in range(50):
        async with server.data.get("/") as response:
            assert response.status == 200


def test_error_rate_is_the_share_of_errors() -> None:
    simulator = Simulator(Simulation(error_rate=0.3, error_status=502), random.Random(3))
    draws = [simulator.draw().error_status for _ in range(10_000)]
    assert set(draws) == {None, 502}
    assert draws.count(502) / len(draws) == pytest.approx(0.3, abs=0.02)


async def test_latency_is_waited(start: Start) -> None:
    server = await start({"latency": "20ms"})
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with server.data.get("/") as response:
        assert response.status == 200
    # A lower bound only, which asyncio.sleep guarantees (give or take the clock's
    # resolution): no machine is too fast for it.
    assert loop.time() - began >= 0.02 - 0.002


def test_cpu_is_burnt() -> None:
    before = time.thread_time()
    used = burn_cpu(0.005)
    assert used >= 0.005
    assert time.thread_time() - before >= 0.005
    assert burn_cpu(0.0) == 0.0


async def test_request_burns_cpu(start: Start) -> None:
    server = await start({"cpu": "5ms"})
    before = time.thread_time()  # the server runs in this very thread
    async with server.data.get("/") as response:
        assert response.status == 200
    assert time.thread_time() - before >= 0.005


async def test_client_going_away_is_counted_quietly(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    server = await start()
    host, port = server.data.host, server.data.port
    assert port is not None
    # One client leaves in the middle of its body, one in the middle of a download.
    _, writer = await asyncio.open_connection(host, port)
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 10)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Sim-Response-Bytes: 1GiB\r\n\r\n")
    await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()

    async def disconnects() -> bool:
        async with server.admin.get("/metrics") as response:
            text = await response.text()
        counted = {name: value for name, _, value in parse(text)}
        return counted["lbstack_client_disconnects_total"] == 2

    await until(disconnects, "both disconnects to be counted")
    assert await server.reports("in_flight", 0)
    assert await server.reports("requests", 0)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


# --- latency distributions -----------------------------------------------------------


def _samples(distribution: str, latency: float = 0.05, sigma: float = 0.5) -> list[float]:
    simulation = Simulation(latency=latency, latency_distribution=distribution, latency_sigma=sigma)
    rng = random.Random(42)
    return [sample_latency(simulation, rng) for _ in range(20_000)]


def test_fixed_latency() -> None:
    assert set(_samples("fixed")) == {0.05}


def test_uniform_latency_spans_zero_to_twice_the_mean() -> None:
    samples = _samples("uniform")
    assert min(samples) >= 0.0
    assert max(samples) <= 0.1
    assert statistics.fmean(samples) == pytest.approx(0.05, rel=0.03)
    assert max(samples) > 0.099  # it really reaches up to 2 × latency


def test_exponential_latency_has_the_mean() -> None:
    samples = _samples("exponential")
    assert min(samples) >= 0.0
    assert statistics.fmean(samples) == pytest.approx(0.05, rel=0.04)
    # Exponential: the standard deviation equals the mean.
    assert statistics.stdev(samples) == pytest.approx(0.05, rel=0.06)


def test_lognormal_latency_has_the_median_and_shape() -> None:
    samples = _samples("lognormal", sigma=0.8)
    assert statistics.median(samples) == pytest.approx(0.05, rel=0.04)
    logs = [math.log(sample) for sample in samples]
    assert statistics.stdev(logs) == pytest.approx(0.8, rel=0.04)


@pytest.mark.parametrize("distribution", ["fixed", "uniform", "exponential", "lognormal"])
def test_zero_latency_is_zero_in_every_distribution(distribution: str) -> None:
    assert set(_samples(distribution, latency=0.0)) == {0.0}


# --- streamed downloads --------------------------------------------------------------


@pytest.mark.parametrize(("value", "size"), [("1000003", 1_000_003), ("1MiB", MiB), ("0", 0)])
async def test_download_is_streamed(start: Start, value: str, size: int) -> None:
    server = await start()
    received = 0
    async with server.data.get("/", headers={"X-Sim-Response-Bytes": value}) as response:
        assert response.status == 200
        assert response.headers["X-Served-By"] == NAME
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.content_length == size
        async for chunk in response.content.iter_chunked(64 * 1024):
            assert chunk == b"x" * len(chunk)
            received += len(chunk)
    assert received == size


async def test_download_in_bounded_memory(start: Start) -> None:
    server = await start()
    size = 64 * MiB
    received = 0
    tracemalloc.start()
    try:
        async with server.data.get("/", headers={"X-Sim-Response-Bytes": str(size)}) as response:
            async for chunk in response.content.iter_chunked(256 * 1024):
                received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received == size
    assert peak < 16 * MiB, f"peak {peak} bytes for a {size}-byte download"


@pytest.mark.parametrize("value", ["abc", "-5", "1.5", "12 parsecs", ""])
async def test_malformed_download_size_is_400(start: Start, value: str) -> None:
    server = await start()
    async with server.data.get("/", headers={"X-Sim-Response-Bytes": value}) as response:
        assert response.status == 400
        assert response.headers["X-Served-By"] == NAME
        error = await response.json()
    assert "X-Sim-Response-Bytes" in error["error"]


# --- WebSocket echo ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws", "/ws/room/1"])
async def test_websocket_echoes_text_and_binary(start: Start, path: str) -> None:
    server = await start()
    async with server.data.ws_connect(path) as ws:
        for text in ["hello", "", "ünïcödé ✓", "x" * 100_000]:
            await ws.send_str(text)
            message = await ws.receive()
            assert (message.type, message.data) == (WSMsgType.TEXT, text)
        for data in [b"\x00\xffbinary", b""]:
            await ws.send_bytes(data)
            message = await ws.receive()
            assert (message.type, message.data) == (WSMsgType.BINARY, data)


@pytest.mark.parametrize("size", [MiB, 4 * MiB, WEBSOCKET_MAX_MESSAGE - 1])
async def test_websocket_echoes_large_binary(start: Start, size: int) -> None:
    server = await start()
    data = random.Random(size).randbytes(size)
    async with server.data.ws_connect("/ws", max_msg_size=0) as ws:  # 0: no limit
        await ws.send_bytes(data)
        message = await ws.receive()
    assert message.type == WSMsgType.BINARY
    assert message.data == data


async def test_websocket_message_over_the_limit_closes_with_1009(start: Start) -> None:
    server = await start()
    async with server.data.ws_connect("/ws") as ws:
        # The server refuses the frame on its header and closes while we still send.
        sending = asyncio.create_task(ws.send_bytes(b"x" * WEBSOCKET_MAX_MESSAGE))
        message = await ws.receive()
        with contextlib.suppress(ConnectionError):
            await sending
    assert (message.type, message.data) == (WSMsgType.CLOSE, 1009)


async def test_websocket_answers_pings(start: Start) -> None:
    server = await start()
    async with server.data.ws_connect("/ws", autoping=False) as ws:
        await ws.ping(b"are you there")
        message = await ws.receive()
        assert (message.type, message.data) == (WSMsgType.PONG, b"are you there")


async def test_websocket_closes_cleanly_and_counts_as_one_request(start: Start) -> None:
    server = await start()
    ws = await server.data.ws_connect("/ws")
    await ws.send_str("one")
    assert (await ws.receive()).data == "one"
    assert await server.reports("in_flight", 1)  # open: in flight, already counted
    assert await server.reports("requests", 1)
    assert await ws.close() is True
    assert ws.close_code == 1000
    await until(lambda: server.reports("in_flight", 0), "the session to end")
    status = await server.status()
    assert (status["requests"], status["received"]) == (1, {"GET": 1})
    async with server.admin.get("/metrics") as response:
        text = await response.text()
    samples = {
        (name, labels.get("code")): value
        for name, labels, value in parse(text)
        if labels.get("instance") == NAME
    }
    assert samples[("lbstack_requests_total", "101")] == 1
    assert samples[("lbstack_request_duration_seconds_count", None)] == 1


async def test_websocket_handshake_names_the_server(start: Start) -> None:
    server = await start()
    assert server.data.port is not None
    reader, writer = await asyncio.open_connection(server.data.host, server.data.port)
    writer.write(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    writer.close()
    await writer.wait_closed()
    status_line, *lines = head.strip().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert status_line.startswith("HTTP/1.1 101 ")
    assert headers["X-Server"] == NAME
    assert headers["X-Served-By"] == NAME
    # The example key of RFC 6455, section 1.3.
    assert headers["Sec-WebSocket-Accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_websocket_handshake_takes_the_simulated_error(start: Start) -> None:
    server = await start({"error_rate": 1.0, "error_status": 503})
    with pytest.raises(WSServerHandshakeError) as caught:
        await server.data.ws_connect("/ws")
    assert caught.value.status == 503
    assert caught.value.headers is not None
    assert caught.value.headers["X-Served-By"] == NAME
    assert await server.reports("received", {"GET": 1})


async def test_websocket_handshake_waits_out_a_hang(start: Start) -> None:
    server = await start()
    await server.fault({"hang": True})
    connecting = asyncio.create_task(server.data.ws_connect("/ws"))
    await until(lambda: server.reports("held", 1), "the handshake to be held")
    assert not connecting.done()
    await server.fault({"clear": True})
    ws = await asyncio.wait_for(connecting, 10)
    await ws.send_str("after the hang")
    assert (await ws.receive()).data == "after the hang"
    await ws.close()


async def test_websocket_without_upgrade_is_400(start: Start) -> None:
    server = await start()
    async with server.data.get("/ws") as response:
        assert response.status == 400
        assert response.headers["X-Served-By"] == NAME
        assert "UPGRADE" in await response.text()
    async with server.data.post("/ws/room", data=b"x") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
    status = await server.status()
    assert (status["requests"], status["received"]) == (2, {"GET": 1, "POST": 1})


@pytest.mark.parametrize("path", ["/wsx", "/ssex", "/a/ws", "/a/sse"])
async def test_paths_beside_the_routes_are_echoed(start: Start, path: str) -> None:
    server = await start()
    async with server.data.get(path) as response:
        assert response.status == 200
        assert (await response.json())["path"] == path


# --- server-sent events --------------------------------------------------------------


def _events(count: int) -> str:
    return "".join(
        f"id: {n}\ndata: {json.dumps({'server': NAME, 'n': n})}\n\n" for n in range(1, count + 1)
    )


@pytest.mark.parametrize(
    ("target", "count"),
    [("/sse?count=5&interval=0.001", 5), ("/sse/feed?interval=0", 10), ("/sse?count=0", 0)],
)
async def test_events_are_streamed(start: Start, target: str, count: int) -> None:
    server = await start()
    async with server.data.get(target) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["X-Served-By"] == NAME
        body = await response.text()
    assert body == _events(count)
    assert body.count("id: ") == count
    status = await server.status()
    assert (status["requests"], status["received"], status["in_flight"]) == (1, {"GET": 1}, 0)


async def test_events_arrive_one_by_one(start: Start) -> None:
    server = await start()
    async with server.data.get("/sse?count=3&interval=0.01") as response:
        events = [event async for event in response.content.iter_chunks()]
    assert [chunk.decode() for chunk, _ in events if chunk] == [
        _events(n)[len(_events(n - 1)) :] for n in (1, 2, 3)
    ]


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("count=abc", "'abc'"),
        ("count=-1", "'-1'"),
        ("count=10001", "'10001'"),
        ("count=1.5", "'1.5'"),
        ("count=", "''"),
        ("count=1&count=2", "found 2"),
        ("interval=fast", "'fast'"),
        ("interval=-0.1", "'-0.1'"),
        ("interval=11", "'11'"),
        ("interval=nan", "'nan'"),
    ],
)
async def test_bad_event_parameters_are_400(start: Start, query: str, found: str) -> None:
    server = await start()
    async with server.data.get(f"/sse?{query}") as response:
        assert response.status == 400
        assert response.headers["X-Served-By"] == NAME
        error = (await response.json())["error"]
    name = query.split("=", maxsplit=1)[0]
    assert error.startswith(f"{name}: expected ")
    assert "from 0 to 10" in error
    assert found in error


async def test_events_take_the_simulated_error_and_only_get(start: Start) -> None:
    server = await start({"error_rate": 1.0, "error_status": 502})
    async with server.data.get("/sse?count=1") as response:
        assert response.status == 502
    async with server.data.post("/sse") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"


# --- fault injection -----------------------------------------------------------------


async def test_fault_takes_every_field_as_a_string(start: Start) -> None:
    server = await start()
    status, state = await server.fault(
        {
            "latency": "0.05",
            "latency_distribution": "uniform",
            "latency_sigma": "0.7",
            "cpu": "2ms",
            "response_size": "1KiB",
            "error_rate": "0.3",
            "error_status": "503",
        }
    )
    assert status == 200
    assert state["simulation"] == {
        "latency": 0.05,
        "latency_distribution": "uniform",
        "latency_sigma": 0.7,
        "cpu": 0.002,
        "response_size": 1024,
        "error_rate": 0.3,
        "error_status": 503,
    }
    assert state["configured"] == Simulation().model_dump(mode="json")
    assert state["hanging"] is False


async def test_fault_changes_the_data_plane(start: Start) -> None:
    server = await start()
    status, state = await server.fault({"latency": "1ms", "error_rate": "1", "error_status": 502})
    assert status == 200
    assert state["simulation"]["latency"] == 0.001
    async with server.data.get("/") as response:
        assert response.status == 502
    async with server.admin.get("/fault") as response:
        assert (await response.json())["simulation"]["error_rate"] == 1.0


@pytest.mark.parametrize(
    ("body", "field", "expected"),
    [
        ({"error_rate": "1.5"}, "error_rate", "less than or equal to 1"),
        ({"latency": "fast"}, "latency", "duration"),
        ({"cpu": -1}, "cpu", "non-negative"),
        ({"latency_distribution": "gaussian"}, "latency_distribution", "'lognormal'"),
        ({"error_status": 200}, "error_status", "greater than or equal to 400"),
        ({"response_size": "lots"}, "response_size", "size"),
        ({"latency_sigma": "wide"}, "latency_sigma", "number"),
        ({"hang": "maybe"}, "hang", "boolean"),
        ({"latancy": "5ms"}, "latancy", "one of latency"),
    ],
)
async def test_invalid_fault_is_400_naming_the_field(
    start: Start, body: dict[str, Any], field: str, expected: str
) -> None:
    server = await start()
    status, error = await server.fault(body)
    assert status == 400
    [problem] = error["problems"]
    assert problem["field"] == field
    assert expected in problem["expected"]
    assert field in error["error"]
    if field in body:
        assert problem["found"] in (body[field], "an unknown key")


async def test_invalid_fault_changes_nothing(start: Start) -> None:
    server = await start()
    status, error = await server.fault({"latency": "10ms", "hang": True, "error_rate": 2})
    assert status == 400
    assert [problem["field"] for problem in error["problems"]] == ["error_rate"]
    async with server.admin.get("/fault") as response:
        state = await response.json()
    assert state["simulation"] == Simulation().model_dump(mode="json")
    assert state["hanging"] is False


@pytest.mark.parametrize("body", [b"[1, 2]", b"{", b"", b'"hang"'])
async def test_fault_body_must_be_a_json_object(start: Start, body: bytes) -> None:
    server = await start()
    async with server.admin.post("/fault", data=body) as response:
        assert response.status == 400
        error = await response.json()
    assert error["problems"][0]["field"] == "(body)"
    assert error["problems"][0]["expected"] == "a JSON object"


async def test_get_fault_shows_the_state(start: Start) -> None:
    server = await start({"latency": "1ms"})
    async with server.admin.get("/fault") as response:
        assert response.status == 200
        state = await response.json()
    configured = Simulation(latency=0.001).model_dump(mode="json")
    assert state == {
        "simulation": configured,
        "configured": configured,
        "hanging": False,
        "held": 0,
    }


async def test_clear_restores_the_configured_simulation(start: Start) -> None:
    server = await start({"latency": "1ms"})
    await server.fault({"latency": "2s", "error_rate": 0.5, "hang": True})
    status, state = await server.fault({"clear": True})
    assert status == 200
    assert state["simulation"] == Simulation(latency=0.001).model_dump(mode="json")
    assert state["hanging"] is False
    # clear comes first, so the other keys apply over the configured simulation
    _, state = await server.fault({"clear": "true", "error_rate": "0.1"})
    assert state["simulation"]["error_rate"] == 0.1
    assert state["simulation"]["latency"] == 0.001


async def test_hang_holds_every_request_until_cleared(start: Start) -> None:
    server = await start()
    chunks: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def body() -> AsyncIterator[bytes]:
        while (chunk := await chunks.get()) is not None:
            yield chunk

    async def post(data: Any) -> tuple[int, dict[str, Any]]:
        async with server.data.post("/", data=data) as response:
            return response.status, await response.json()

    # One request in flight, still sending its body, when the hang starts...
    chunks.put_nowait(b"a" * 1000)
    in_flight = asyncio.create_task(post(body()))
    await until(lambda: server.reports("in_flight", 1), "the upload to be in flight")
    status, state = await server.fault({"hang": True})
    assert (status, state["hanging"]) == (200, True)
    assert (await server.status())["state"] == "hanging"
    async with server.admin.get("/readyz") as response:
        assert response.status == 503
    chunks.put_nowait(None)
    # ...and one arriving during the hang: neither is answered.
    arriving = asyncio.create_task(post(b"b" * 10))
    await until(lambda: server.reports("held", 2), "both requests to be held")
    assert not in_flight.done()
    assert not arriving.done()

    status, state = await server.fault({"clear": True})
    assert (status, state["hanging"]) == (200, False)
    status, echo = await asyncio.wait_for(in_flight, 10)
    assert (status, echo["body_bytes"]) == (200, 1000)
    status, echo = await asyncio.wait_for(arriving, 10)
    assert (status, echo["body_bytes"]) == (200, 10)
    assert (await server.status())["state"] == "ready"


async def test_hang_false_lifts_the_hang(start: Start) -> None:
    server = await start()
    await server.fault({"hang": True})
    waiting = asyncio.create_task(server.data.get("/"))
    await until(lambda: server.reports("held", 1), "the request to be held")
    status, state = await server.fault({"hang": False})
    assert (status, state["hanging"]) == (200, False)
    response = await asyncio.wait_for(waiting, 10)
    assert response.status == 200
    response.release()


async def test_crash_answers_202_then_exits(start: Start) -> None:
    exited = asyncio.Event()
    statuses: list[int] = []
    harness: list[Harness] = []

    def fake_exit(status: int) -> None:
        statuses.append(status)
        # Like the process dying: every admin connection is cut at once. The client
        # can still read the 202 only if it was sent before this ran.
        runner = harness[0].admin.server.runner
        assert runner is not None
        assert runner.server is not None
        for connection in runner.server.connections:
            if connection.transport is not None:
                connection.transport.abort()
        exited.set()

    server = await start(exit_process=fake_exit)
    harness.append(server)
    async with server.admin.post("/fault", json={"crash": True}) as response:
        assert response.status == 202
        answer = await response.json()
    assert answer["crashing"] is True
    assert answer["exit_status"] == CRASH_EXIT_STATUS
    await asyncio.wait_for(exited.wait(), 10)
    assert statuses == [CRASH_EXIT_STATUS]


async def test_crash_false_does_nothing(start: Start) -> None:
    server = await start()  # exiting would fail the test
    status, state = await server.fault({"crash": False})
    assert status == 200
    assert "crashing" not in state


# --- admin: status and metrics -------------------------------------------------------


async def test_status_reports_state_and_simulation(start: Start) -> None:
    server = await start({"latency": "1ms", "cpu": "1ms"})
    for _ in range(3):
        async with server.data.get("/") as response:
            assert response.status == 200
    status = await server.status()
    assert status["name"] == NAME
    assert status["role"] == "server"
    assert status["state"] == "ready"
    assert status["in_flight"] == 0
    assert status["requests"] == 3
    assert status["simulation"]["latency"] == 0.001
    assert status["simulation"]["cpu"] == 0.001
    async with server.admin.get("/readyz") as response:
        assert response.status == 200


async def test_metrics_count_requests_by_code(start: Start) -> None:
    server = await start()
    for _ in range(3):
        async with server.data.get("/") as response:
            assert response.status == 200
    await server.fault({"error_rate": 1, "error_status": 503})
    async with server.data.get("/") as response:
        assert response.status == 503
    async with server.admin.get("/metrics") as response:
        text = await response.text()
    samples = {
        (name, labels.get("code")): value
        for name, labels, value in parse(text)
        if labels.get("instance") == NAME and labels.get("role") == "server"
    }
    assert samples[("lbstack_requests_total", "200")] == 3
    assert samples[("lbstack_requests_total", "503")] == 1
    assert samples[("lbstack_request_duration_seconds_count", None)] == 4
    assert samples[("lbstack_in_flight_requests", None)] == 0


# --- creation ------------------------------------------------------------------------


async def test_data_plane_uses_the_configured_keepalive() -> None:
    component = create(make_spec({"keepalive": "12s"}))
    server = component.data_server()
    assert isinstance(server, DataServer)
    assert server._kwargs["keepalive_timeout"] == 12.0


def test_refuses_a_server_that_is_not_simulated() -> None:
    with pytest.raises(StartupError, match="kind='command'"):
        create(make_spec({"kind": "command", "command": "app --bind {socket}"}))
    with pytest.raises(StartupError, match="group"):
        create(make_spec(group=None))
