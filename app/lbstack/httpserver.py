"""The servers of the data sockets, and what every one of them offers (``DataPlane``).

A router's data plane is ``lbstack.forwarding.front.FrontServer``. A simulated server runs
aiohttp's low-level ``web.Server`` (one handler, no router) through ``DataServer``,
whose request handler maps aiohttp's parse errors to the right status: an oversized
header line or too many headers is 431, not 400, and a client's bad request is logged
briefly instead of with a traceback.

Draining (a stopping process): every response from then on says ``Connection: close``
and its connection closes after it, so the pools of the routers in front of us never
reuse a connection we are about to close. aiohttp decides keep-alive once per
response, from ``request.keep_alive``; our requests answer it at that moment.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from lbstack import aio
from lbstack.log import get_logger

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


log = get_logger("http")

# What a stopping DataServer keeps of its graceful timeout for ``on_stop`` and aiohttp's
# own shutdown; how often it looks whether its requests are over meanwhile.
_STOP_GRACE = 1.0
_STOP_POLL = 0.05


def error_status(exc: BaseException | None, status: int) -> int:
    """The status a parse error deserves."""
    if isinstance(exc, LineTooLong):
        return 431
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return 431
    return status


class DataPlane(web.Server):
    """Base of the data sockets' servers: what the child's drain and /readyz need."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.draining = False

    def drain(self) -> None:
        """From now on, close each connection after its current or next response.

        Idle connections stay open meanwhile: closing one races a client that is
        reusing it; the runner's shutdown closes those still idle after the window.
        """
        self.draining = True

    @property
    def busy(self) -> int:
        """Connections with a request in progress."""
        raise NotImplementedError


class _RequestHandler(RequestHandler):
    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status != 400 or not isinstance(exc, BadHttpMessage):
            return super().handle_error(request, status, exc, message)
        status = error_status(exc, status)
        log.info("rejected a malformed request (%d): %s", status, exc.message)
        reason = "Request Header Fields Too Large" if status == 431 else "Bad Request"
        response = web.Response(
            status=status, text=f"{status} {reason}\n", content_type="text/plain"
        )
        response.force_close()
        return response


class _Request(web.BaseRequest):
    """A request whose keep-alive also ends when its server starts draining."""

    @property
    def keep_alive(self) -> bool:
        if aio.asks_to_close(self):
            return False
        server = aio.server_of(self)
        return not (isinstance(server, DataServer) and server.draining)


class DataServer(DataPlane):
    """``web.Server`` whose connections use our request handler and requests.

    ``on_stop`` ends long-lived sessions (WebSockets) cleanly when the server stops:
    it runs a second before the graceful timeout is over, if requests are still in
    progress, and aiohttp's own shutdown then gets that last second. (aiohttp would
    wait the whole timeout twice, then close the sockets under the sessions.)
    """

    def __init__(
        self,
        handler: Handler,
        *,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, request_factory=self._request, **kwargs)
        self._on_stop = on_stop

    async def shutdown(self, timeout: float | None = None) -> None:
        if self._on_stop is None or timeout is None:
            await super().shutdown(timeout)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout - _STOP_GRACE)
        # Polled: aiohttp signals no event when its last request ends.
        while self.busy and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(_STOP_POLL)
        if self.busy:
            await self._on_stop()
        await super().shutdown(_STOP_GRACE / 2)

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)

    def _request(
        self, message: Any, payload: Any, protocol: Any, writer: Any, task: Any
    ) -> _Request:
        return _Request(message, payload, protocol, writer, task, self._loop)

    @property
    def busy(self) -> int:
        """Connections with a request in progress."""
        return sum(1 for c in self.connections if aio.handling(c))


def server_options(
    *,
    keepalive: float,
    max_header_size: int = 8190,
    max_headers: int = 128,
) -> dict[str, Any]:
    """DataServer keyword arguments for our limits and timeouts.

    ``handler_cancellation``: a client that goes away cancels its handler, so the
    cancellation travels up the chain and no upstream keeps working for nobody.
    """
    return {
        "handler_cancellation": True,
        "keepalive_timeout": keepalive,
        "max_line_size": max_header_size,
        "max_field_size": max_header_size,
        "max_headers": max_headers,
        "access_log": None,
    }
