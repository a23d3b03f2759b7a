"""The built-in simulated application server (role ``server``).

Data plane: any method and path (but ``/ws`` and ``/sse``, below) is answered ``200``
with a JSON echo of the request (``server``, ``method``, ``path``, ``raw_path``,
``version``, ``query_string``, ``query`` as a dict of lists, ``headers`` as received
with a repeated header's values in a list, ``body_bytes`` and ``body_sha256`` of the
body, which is read streaming and never held whole, and ``padding``), after the
simulated work the current ``Simulation`` asks for: latency, CPU time, padding, and a
share of requests answered ``error_status`` with a small JSON error instead. Every
answer carries ``X-Served-By: <name>``.

Two paths, and every path below them, have routes of their own:

``GET /ws``
    A WebSocket echo: each text or binary message (up to ``WEBSOCKET_MAX_MESSAGE``) is
    sent back unchanged, pings are answered, a close is returned; the server never
    speaks first. The ``101`` also carries ``X-Server: <name>``. Latency, CPU and a hang
    delay the handshake, and a simulated error answers it instead of the ``101``; a
    hang also holds the echo of each message. The session counts as one request of
    status ``101``: in flight until it closes, its duration the time to the ``101``.
``GET /sse``
    Server-sent events (``text/event-stream``, chunked): ``?count=N`` events
    (default 10, at most 10000), one every ``?interval=S`` seconds (default 0.1, at
    most 10), each ``id: <n>`` and ``data: {"server": "<name>", "n": <n>}`` with
    ``n`` from 1; then the stream ends. A bad parameter is answered ``400``. After
    the simulated work like any request; a hang holds the stream between events.

Other methods on these paths are answered ``405``. Everywhere else, one request
header changes the answer:

``X-Sim-Response-Bytes: N``
    Answer with ``N`` bytes (a byte count or a size like ``64KiB``, ``1GiB``) of
    ``application/octet-stream``, streamed in chunks with ``Content-Length: N``,
    instead of the echo. A malformed value is answered ``400``.

Admin plane: the shared routes, plus fault injection on ``/fault`` (never reachable
through the data socket): ``GET /fault`` shows the fault state, ``POST /fault`` with a
JSON object changes the simulation (any ``Simulation`` field, validated like the
config) and takes the actions ``hang``, ``crash`` and ``clear``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web
from multidict import CIMultiDict
from pydantic_core import PydanticCustomError

from lbstack.admin import create_admin_app
from lbstack.component import ChildSpec, Component
from lbstack.config import parse_size
from lbstack.errors import StartupError
from lbstack.httpserver import DataServer, server_options
from lbstack.log import get_logger
from lbstack.metrics import Metrics
from lbstack.simulation import FaultError, Simulator, Work, burn_cpu

SERVED_BY = "X-Served-By"
SERVER = "X-Server"  # names the server on a WebSocket's 101
RESPONSE_BYTES = "X-Sim-Response-Bytes"
CRASH_EXIT_STATUS = 70  # EX_SOFTWARE: the supervisor sees a crash, not a clean stop
CHUNK_SIZE = 64 * 1024
_CHUNK = memoryview(b"x" * CHUNK_SIZE)

WEBSOCKET_PATH = "/ws"
# Bytes; a larger message closes the session with 1009. aiohttp's own default (4 MiB)
# refuses a message of exactly 4 MiB: its bound is exclusive.
WEBSOCKET_MAX_MESSAGE = 16 * 1024 * 1024
EVENTS_PATH = "/sse"
EVENTS_COUNT = 10  # events by default
EVENTS_MAX_COUNT = 10_000
EVENTS_INTERVAL = 0.1  # seconds
EVENTS_MAX_INTERVAL = 10.0

ExitFn = Callable[[int], object]
Number = TypeVar("Number", int, float)

log = get_logger("server")


class SimulatedServer:
    """The built-in application: echoes each request after its simulated work."""

    def __init__(
        self,
        name: str,
        simulator: Simulator,
        metrics: Metrics,
        exit_process: ExitFn = os._exit,
    ) -> None:
        self.name = name
        self.simulator = simulator
        self.metrics = metrics
        self._exit_process = exit_process
        self.in_flight = 0
        self.served = 0
        self._sockets: set[web.WebSocketResponse] = set()  # open WebSocket sessions
        self.received: dict[str, int] = {}  # by method, counted on arrival
        # Read at scrape time, so the hot path never takes the gauge's lock.
        metrics.in_flight.set_function(lambda: self.in_flight)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """The data plane: any method, any path."""
        started = time.perf_counter()
        self.in_flight += 1
        self.received[request.method] = self.received.get(request.method, 0) + 1
        try:
            response = await self._respond(request, started)
        except ConnectionError:
            # The client went away mid-body or mid-download (a reset, or a plain
            # "Connection lost" from a pending drain): count it, no traceback.
            self.metrics.client_disconnects.inc()
            log.debug("client of %s %s went away", request.method, request.path)
            gone = web.Response(status=400)  # never delivered; aiohttp drops it quietly
            gone.force_close()
            return gone
        except asyncio.CancelledError:
            # With handler_cancellation, a client leaving cancels us; a cancellation
            # while the client is still connected is the server shutting down.
            if request.transport is None:
                self.metrics.client_disconnects.inc()
            raise
        finally:
            self.in_flight -= 1
        if not isinstance(response, web.WebSocketResponse):  # a session counted at its 101
            self._answered(response.status, started)
        return response

    def _answered(self, status: int, started: float) -> None:
        self.served += 1
        self.metrics.count(status)
        self.metrics.latency.observe(time.perf_counter() - started)

    async def _respond(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        if _under(request.path, WEBSOCKET_PATH):
            return await self._websocket(request, started)
        if _under(request.path, EVENTS_PATH):
            return await self._events(request)
        return await self._echo(request)

    async def _echo(self, request: web.BaseRequest) -> web.StreamResponse:
        download: int | None = None
        if RESPONSE_BYTES in request.headers:
            try:
                download = parse_size(request.headers[RESPONSE_BYTES])
            except PydanticCustomError as exc:
                return self._json(
                    {"server": self.name, "error": f"{RESPONSE_BYTES}: {exc.message()}"},
                    status=400,
                )
        body_bytes, body_sha256 = await _drain(request)
        work = self.simulator.draw()
        await self._work(work)
        if work.error_status is not None:
            return self._simulated_error(work.error_status)
        if download is not None:
            return await self._stream(request, download)
        return self._json(
            {
                "server": self.name,
                "method": request.method,
                "path": request.path,
                "raw_path": request.raw_path,
                "version": f"{request.version.major}.{request.version.minor}",
                "query_string": request.query_string,
                "query": {key: request.query.getall(key) for key in request.query},
                "headers": _headers(request),
                "body_bytes": body_bytes,
                "body_sha256": body_sha256,
                "padding": "x" * work.padding,
            }
        )

    async def _websocket(self, request: web.BaseRequest, started: float) -> web.StreamResponse:
        if request.method != "GET":  # before aiohttp, which asks for an upgrade first
            return self._http_error(web.HTTPMethodNotAllowed(request.method, ["GET"]))
        work = self.simulator.draw()
        await self._work(work)
        if work.error_status is not None:
            return self._simulated_error(work.error_status)
        ws = web.WebSocketResponse(max_msg_size=WEBSOCKET_MAX_MESSAGE)
        ws.headers[SERVED_BY] = self.name
        ws.headers[SERVER] = self.name
        try:
            await ws.prepare(request)
        except web.HTTPException as exc:  # not a WebSocket upgrade: aiohttp says why
            return self._http_error(exc)
        # Counted now: the session's length is no latency a router should weigh.
        self._answered(ws.status, started)
        self._sockets.add(ws)
        # autoping and autoclose: aiohttp answers pings and a close itself.
        try:
            async for message in ws:
                await self.simulator.gate()
                if message.type is WSMsgType.TEXT:
                    await ws.send_str(message.data)
                elif message.type is WSMsgType.BINARY:
                    await ws.send_bytes(message.data)
                elif message.type is WSMsgType.ERROR:  # aiohttp closes the session after it
                    log.debug("WebSocket of %s closed on an error: %s", request.path, message.data)
        finally:
            self._sockets.discard(ws)
        return ws

    async def close_sockets(self) -> None:
        """The server stops: tell every WebSocket client it is going away (1001)."""

        async def close(ws: web.WebSocketResponse) -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    ws.close(code=WSCloseCode.GOING_AWAY, message=b"server stopping"), 1.0
                )

        await asyncio.gather(*(close(ws) for ws in list(self._sockets)))

    async def _events(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method != "GET":
            return self._http_error(web.HTTPMethodNotAllowed(request.method, ["GET"]))
        try:
            count, interval = _event_stream(request)
        except ValueError as exc:
            return self._json({"server": self.name, "error": str(exc)}, status=400)
        work = self.simulator.draw()
        await self._work(work)
        if work.error_status is not None:
            return self._simulated_error(work.error_status)
        response = web.StreamResponse(
            headers={
                SERVED_BY: self.name,
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
            }
        )
        await response.prepare(request)  # no length: chunked, or close-delimited for 1.0
        for n in range(1, count + 1):
            if n > 1:
                await asyncio.sleep(interval)
            await self.simulator.gate()
            data = json.dumps({"server": self.name, "n": n})
            await response.write(f"id: {n}\ndata: {data}\n\n".encode())
        await response.write_eof()
        return response

    async def _work(self, work: Work) -> None:
        if work.latency > 0:
            await asyncio.sleep(work.latency)
        burn_cpu(work.cpu)
        await self.simulator.gate()

    async def _stream(self, request: web.BaseRequest, size: int) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={SERVED_BY: self.name, "Content-Type": "application/octet-stream"}
        )
        response.content_length = size
        await response.prepare(request)
        remaining = size
        while remaining > 0:
            await self.simulator.gate()  # a hang stops a download midway too
            chunk = _CHUNK[: min(remaining, CHUNK_SIZE)]
            await response.write(chunk)  # waits while the client is slower than us
            remaining -= len(chunk)
        await response.write_eof()
        return response

    def _json(self, data: dict[str, Any], status: int = 200) -> web.Response:
        return web.json_response(data, status=status, headers={SERVED_BY: self.name})

    def _simulated_error(self, status: int) -> web.Response:
        return self._json(
            {"server": self.name, "error": "simulated error", "status": status}, status=status
        )

    def _http_error(self, exc: web.HTTPException) -> web.Response:
        """aiohttp's answer for ``exc``, returned rather than raised, so it is counted."""
        headers = CIMultiDict(exc.headers)
        headers[SERVED_BY] = self.name
        return web.Response(status=exc.status, body=exc.body, headers=headers)

    def status(self) -> dict[str, Any]:
        """The server's part of ``GET /status``."""
        return {
            "state": "hanging" if self.simulator.hanging else "ready",
            "in_flight": self.in_flight,
            "requests": self.served,
            "received": self.received,
            "held": self.simulator.held,
            "simulation": self.simulator.current.model_dump(mode="json"),
        }

    def ready(self) -> bool:
        # A hanging server takes requests but answers none: not ready for traffic.
        return not self.simulator.hanging

    async def get_fault(self, request: web.Request) -> web.Response:
        """``GET /fault``: the current fault state."""
        return web.json_response(self.simulator.snapshot())

    async def post_fault(self, request: web.Request) -> web.StreamResponse:
        """``POST /fault``: change the simulation, hang, un-hang, clear or crash."""
        try:
            data = await request.json()
        except ValueError:  # not JSON, or not UTF-8
            return _refused(
                FaultError([{"field": "(body)", "expected": "a JSON object", "found": "not JSON"}])
            )
        try:
            fault = self.simulator.apply(data)
        except FaultError as exc:
            return _refused(exc)
        log.warning("fault injected: %s", json.dumps(data, sort_keys=True))
        if not fault.crash:
            return web.json_response(self.simulator.snapshot())
        response = web.json_response(
            {**self.simulator.snapshot(), "crashing": True, "exit_status": CRASH_EXIT_STATUS},
            status=202,
        )
        # Send the whole answer first, then die abruptly like a real crash: no cleanup,
        # no graceful drain, a non-zero exit status.
        await response.prepare(request)
        await response.write_eof()
        log.warning("crash fault: exiting with status %d", CRASH_EXIT_STATUS)
        asyncio.get_running_loop().call_soon(self._exit_process, CRASH_EXIT_STATUS)
        return response

    def admin_app(self) -> web.Application:
        """The shared admin app plus the ``/fault`` routes."""
        app = create_admin_app(self.metrics, status=self.status, ready=self.ready)
        app.router.add_get("/fault", self.get_fault)
        app.router.add_post("/fault", self.post_fault)
        return app


def create(
    spec: ChildSpec,
    *,
    rng: random.Random | None = None,
    exit_process: ExitFn = os._exit,
) -> Component:
    """The component of a built-in server; ``rng`` and ``exit_process`` are for tests."""
    if spec.group is None:
        raise StartupError(f"{spec.name}: a server needs the group it belongs to, found none")
    config = spec.config.group(spec.group).server
    if config.kind != "simulated":
        raise StartupError(
            f"{spec.name}: the built-in server runs kind='simulated', found kind={config.kind!r}"
        )
    server = SimulatedServer(
        spec.name,
        Simulator(config.simulation, rng),
        Metrics("server", spec.name),
        exit_process,
    )
    options = server_options(keepalive=config.keepalive)
    return Component(
        data_server=lambda: DataServer(server.handle, on_stop=server.close_sockets, **options),
        admin=server.admin_app(),
    )


def _under(path: str, route: str) -> bool:
    """Whether ``path`` is ``route`` or a path below it."""
    return path == route or path.startswith(route + "/")


def _event_stream(request: web.BaseRequest) -> tuple[int, float]:
    """``count`` and ``interval`` of ``GET /sse``; a ValueError says which one is bad."""
    count = _query_number(request, "count", int, EVENTS_COUNT, EVENTS_MAX_COUNT, "an integer")
    interval = _query_number(
        request, "interval", float, EVENTS_INTERVAL, EVENTS_MAX_INTERVAL, "a number of seconds"
    )
    return count, interval


def _query_number(
    request: web.BaseRequest,
    name: str,
    kind: Callable[[str], Number],
    default: Number,
    maximum: Number,
    what: str,
) -> Number:
    values = request.query.getall(name, [])
    if not values:
        return default
    expected = f"{what} from 0 to {maximum}"
    if len(values) > 1:
        raise ValueError(f"{name}: expected one value, {expected}, found {len(values)}")
    try:
        value = kind(values[0])
    except ValueError:
        raise ValueError(f"{name}: expected {expected}, found {values[0]!r}") from None
    if not 0 <= value <= maximum:  # NaN fails this too
        raise ValueError(f"{name}: expected {expected}, found {values[0]!r}")
    return value


async def _drain(request: web.BaseRequest) -> tuple[int, str]:
    """Read the body chunk by chunk: its length and sha256, never the whole of it."""
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()


def _headers(request: web.BaseRequest) -> dict[str, str | list[str]]:
    """Request headers as received; a repeated header's values become a list."""
    echoed: dict[str, str | list[str]] = {}
    spelling: dict[str, str] = {}  # lower-case name -> first spelling seen
    for name, value in request.headers.items():
        key = spelling.setdefault(name.lower(), name)
        previous = echoed.get(key)
        if previous is None:
            echoed[key] = value
        elif isinstance(previous, list):
            previous.append(value)
        else:
            echoed[key] = [previous, value]
    return echoed


def _refused(exc: FaultError) -> web.Response:
    return web.json_response({"error": str(exc), "problems": exc.problems}, status=400)
