"""The client side of a hop: our own protocol on aiohttp's C request parser.

``FrontServer`` is the protocol factory a ``web.ServerRunner`` serves (so ``SockSite``,
graceful shutdown and gunicorn's aiohttp worker work as for any aiohttp server); each
client connection is a ``FrontConnection``. It parses requests as they come, queues
pipelined ones (at most ``aio.MAX_PIPELINED``, then stops reading) and serves them in
order, one at a time, in one task per connection: ``handler(conn, message, payload)``
writes the whole response to ``conn`` and says whether the connection may be reused.

A request the parser refuses gets its status here (400, 414, 431, 505), after the
responses to the requests before it, and the connection closes: after a framing
error nothing that follows on it can be trusted.

Timeouts are swept, not timed per request: every ``sweep_interval`` one pass over the
connections closes those idle past ``keepalive`` (which also bounds how long a client
may take to send its request head) and expires each exchange past its ``deadline``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from lbstack import aio
from lbstack.forwarding.headers import error_response
from lbstack.httpserver import DataPlane, error_status
from lbstack.log import get_logger

log = get_logger("http")

# How long a tunnel closed at shutdown has to send its close frames.
_TUNNEL_CLOSE: Final = 1.0
_METHOD_SP: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-_ ")
_REQUEST_LINE: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [^ \r\n]+ HTTP/(\d\.\d)\r?\n")


class Expiring(Protocol):
    """What the sweep expires: an exchange with a deadline (loop time)."""

    deadline: float

    def expire(self) -> None: ...


class Tunnelling(Protocol):
    """Where a connection's bytes go once it is a tunnel (``tunnel.Tunnel``)."""

    def up(self, data: bytes) -> None: ...

    def client_writable(self) -> None: ...

    def finish(self, why: str) -> None: ...

    def close(self, why: str) -> None: ...


Handler = Callable[["FrontConnection", aio.RawRequestMessage, aio.StreamReader], Awaitable[bool]]


def parse_error_status(exc: HttpProcessingError, data: bytes) -> int:
    """The status a request the parser refused deserves: ``error_status``'s 431s, and
    414 for a request line, 505 for a version we don't speak."""
    if isinstance(exc, LineTooLong) and _in_request_line(exc, data):
        return 414
    status = error_status(exc, 400)
    if status == 400 and _unsupported_version(data):
        return 505
    return status


def _in_request_line(exc: LineTooLong, data: bytes) -> bool:
    """Whether the line too long is a request target, not a header (414, not 431)."""
    line = exc.args[0]
    token = (line.encode("latin-1", "replace") if isinstance(line, str) else line)[:32]
    at = data.find(token) if token else -1
    if at < 0:  # the target began in an earlier read
        return token.startswith((b"/", b"http:", b"https:", b"*"))
    start = data.rfind(b"\n", 0, at) + 1
    return at > start and set(data[start:at]) <= _METHOD_SP and data[at - 1 : at] == b" "


def _unsupported_version(data: bytes) -> bool:
    """Whether the request line is well formed but for an HTTP version we don't speak."""
    match = _REQUEST_LINE.match(data)
    return match is not None and match[1] not in (b"1.0", b"1.1")


class FrontServer(DataPlane):
    """Serves a hop's data sockets with ``FrontConnection``s."""

    def __init__(
        self,
        handler: Handler,
        *,
        tunnels: Callable[[aio.RawRequestMessage], bool],
        keepalive: float,
        max_line_size: int,
        max_headers: int,
        sweep_interval: float,
    ) -> None:
        super().__init__(_unused_handler)
        self.handler = handler
        self.tunnels = tunnels  # whether an upgrade request may become a tunnel
        self.keepalive = keepalive
        self.max_line_size = max_line_size
        self.max_headers = max_headers
        self.sweep_interval = sweep_interval
        self._front: dict[FrontConnection, None] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def __call__(self) -> FrontConnection:  # type: ignore[override]
        if self._sweeper is None:
            self._sweeper = self._loop.create_task(self._sweep(), name="front sweep")
        return FrontConnection(self)

    @property
    def connections(self) -> list[Any]:
        return list(self._front)

    @property
    def busy(self) -> int:
        """Connections with a request in progress."""
        return sum(1 for c in self._front if c.exchange is not None or c.queued)

    def attach(self, conn: FrontConnection) -> None:
        self._front[conn] = None

    def detach(self, conn: FrontConnection) -> None:
        self._front.pop(conn, None)

    def pre_shutdown(self) -> None:
        for conn in list(self._front):
            conn.close_when_done()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let requests and tunnels in progress finish within ``timeout``; then close
        tunnels (a WebSocket close frame each way, between frames) and cut the rest."""
        conns = list(self._front)
        if conns:
            # Tunnels still open then get their close frames within the timeout.
            await _wait_done(conns, None if timeout is None else max(0.0, timeout - _TUNNEL_CLOSE))
            tunnels = [c for c in conns if c.tunnel is not None]
            for conn in tunnels:
                assert conn.tunnel is not None
                conn.tunnel.close("the process is stopping")
            await _wait_done(tunnels, _TUNNEL_CLOSE)
            for conn in conns:
                conn.abort()
        self._front.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep(self) -> None:
        loop = self._loop
        while True:
            await asyncio.sleep(self.sweep_interval)
            now = loop.time()
            idle_limit = now - self.keepalive
            for conn in list(self._front):
                exchange = conn.exchange
                if exchange is not None:
                    if exchange.deadline <= now:
                        exchange.expire()
                elif not conn.queued and conn.idle_since <= idle_limit:
                    conn.idle_timeout()


async def _wait_done(conns: list[FrontConnection], timeout: float | None) -> None:
    waits = [asyncio.shield(c.done) for c in conns]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await asyncio.gather(*waits, return_exceptions=True)


async def _unused_handler(request: web.BaseRequest) -> web.StreamResponse:
    raise AssertionError("FrontServer serves FrontConnections")  # pragma: no cover


class FrontConnection(aio.BaseProtocol):
    """One client connection: parse, queue, serve in order, write straight to the socket."""

    def __init__(self, server: FrontServer) -> None:
        loop = server._loop
        parser = aio.request_parser(
            self, loop, max_line_size=server.max_line_size, max_headers=server.max_headers
        )
        super().__init__(loop, parser)
        self.server = server
        self.parser = parser
        self.queue: collections.deque[tuple[aio.RawRequestMessage, aio.StreamReader] | int] = (
            collections.deque()
        )
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self.exchange: Expiring | None = None
        self.idle_since = loop.time()
        self.client = b"unix"
        self.scheme = b"http"  # https when the listener terminates TLS
        self._closing = False  # after the current response
        self._refused = False  # a parse error: nothing more is read
        self._payloads: list[aio.StreamReader] = []
        self._held: bytearray | None = None  # after an upgrade request
        self._tunnel: Tunnelling | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    @property
    def queued(self) -> int:
        return len(self.queue)

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None
        return self._task

    # -- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.client = str(peer[0]).encode()
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = b"https"
        self.server.attach(self)
        self._task = self._loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.up(data)
            return
        if self._held is not None:  # after an upgrade request, until it is answered
            self._held += data
            if len(self._held) >= aio.READ_BUFSIZE:
                aio.hold_reading(self)
            return
        if self._refused:
            return
        try:
            messages, upgraded, tail = self.parser.feed_data(data)
        except HttpProcessingError as exc:
            self._refuse(parse_error_status(exc, data), exc)
            return
        if messages:
            queue = self.queue
            for message, payload in messages:
                queue.append((message, payload))
                if payload is not aio.EMPTY_PAYLOAD:
                    self._payloads.append(payload)
            last = messages[-1][0]
            if last.upgrade:
                # aiohttp's parser hands over what follows only for the protocols it
                # knows (WebSocket); for others it drops it, and it is found here.
                self._after_upgrade(last, tail if upgraded else _after_heads(data, messages))
            self._wake()
            if len(queue) >= aio.MAX_PIPELINED:
                aio.hold_reading(self)

    def _after_upgrade(self, request: aio.RawRequestMessage, rest: bytes | None) -> None:
        """What follows an upgrade request may be the new protocol's: held until the
        upgrade is answered if it may become a tunnel, else parsed as HTTP."""
        if rest is None:
            self.queue.append(400)
            self._refused = True
        elif self.server.tunnels(request):
            self._held = bytearray(rest)
        elif rest:
            self.parser.set_upgraded(False)
            self.data_received(rest)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.detach(self)
        if self._tunnel is not None:
            self._tunnel.finish("the client went away")
        for payload in self._payloads:
            if not payload.is_eof():
                payload.set_exception(ConnectionResetError("client went away"))
        self._payloads.clear()
        self.queue.clear()
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._wake()

    # -- serving ---------------------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _serve(self) -> None:
        queue = self.queue
        try:
            while self.transport is not None:
                if not queue:
                    if self._closing:
                        break
                    waiter = self._waiter = self._loop.create_future()
                    await waiter
                    self._waiter = None
                    continue
                item = queue.popleft()
                self.parser.message_consumed()
                if aio.reading_held(self) and len(queue) <= aio.MAX_PIPELINED // 2:
                    self.data_received(b"")
                    aio.release_reading(self)
                if isinstance(item, int):
                    self.write(error_response(item, "malformed request", b"", close=True))
                    break
                message, payload = item
                keep = await self.server.handler(self, message, payload)
                if self._held is not None:  # the upgrade was not tunnelled
                    self.resume_parsing()
                if payload is not aio.EMPTY_PAYLOAD:
                    with contextlib.suppress(ValueError):
                        self._payloads.remove(payload)
                    keep = keep and payload.is_eof()
                if not keep or self.server.draining:
                    break
                self.idle_since = self._loop.time()
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("connection failed")
        finally:
            self._done_serving()

    def _done_serving(self) -> None:
        """The connection's task is over: close it, and say so to ``done``'s waiters."""
        self.exchange = None
        transport = self.transport
        if transport is not None:
            transport.close()
        if not self.done.done():
            self.done.set_result(None)

    def _refuse(self, status: int, exc: HttpProcessingError) -> None:
        """Answer ``status`` after what is queued, then close; read nothing more."""
        log.info("rejected a malformed request (%d): %s", status, exc.message)
        self._refused = True
        for payload in self._payloads:
            if not payload.is_eof():
                payload.set_exception(exc)
        self.queue.append(status)
        self._wake()

    # -- what the handler uses -------------------------------------------------------

    def resume_parsing(self) -> None:
        """An upgrade that was not tunnelled: what followed it is HTTP after all."""
        held, self._held = self._held, None
        self.parser.set_upgraded(False)
        if len(self.queue) < aio.MAX_PIPELINED:
            aio.release_reading(self)
        if held:
            self.data_received(bytes(held))

    def start_tunnel(self, tunnel: Tunnelling) -> bytes:
        """From now on every byte goes to ``tunnel``; returns what came before."""
        self._tunnel = tunnel
        held, self._held = self._held or b"", None
        aio.release_reading(self)
        return bytes(held)

    def end_tunnel(self) -> None:
        """The tunnel is over: so is this connection."""
        self._tunnel = None
        self._closing = True
        transport = self.transport
        if transport is not None:
            transport.close()

    @property
    def tunnel(self) -> Tunnelling | None:
        return self._tunnel

    def pause_reading_for_tunnel(self) -> None:
        aio.hold_reading(self)

    def resume_reading_for_tunnel(self) -> None:
        aio.release_reading(self)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._tunnel is not None:
            self._tunnel.client_writable()

    @property
    def closing(self) -> bool:
        """Whether this connection ends after the current response."""
        return self._closing or self.server.draining

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None:
            transport.write(data)

    async def drain(self) -> None:
        await aio.drain(self)

    def close_when_done(self) -> None:
        """End after the response in progress (at once when idle)."""
        self._closing = True
        if self.exchange is None and not self.queue:
            self._wake()

    def idle_timeout(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.close()

    def abort(self) -> None:
        """Cut the connection now: the client sees an incomplete response."""
        transport = self.transport
        if transport is not None:
            transport.abort()


def _after_heads(data: bytes, messages: Any) -> bytes | None:
    """What follows the last of ``messages``' heads in ``data``; None if unsure.

    For the bytes aiohttp's parser drops after a non-tunnelled Upgrade: when no
    request of this read had a body, each ends at its head's empty line.
    """
    if any(payload is not aio.EMPTY_PAYLOAD for _, payload in messages):
        return None
    at = 0
    for _ in messages:
        end = data.find(b"\r\n\r\n", at)
        if end < 0:
            return None
        at = end + 4
    return data[at:]
