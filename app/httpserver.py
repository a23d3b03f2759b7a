"""The low-level HTTP server every data plane runs on.

Data planes use aiohttp's low-level ``web.Server`` (one handler, no router): the
balancer's and proxies' data sockets have no reserved paths, and skipping the router
saves work on every request. The request handler class maps aiohttp's parse errors to
the right status: an oversized header line or too many headers is 431, not 400, and a
client's bad request is logged briefly instead of with a traceback.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from app.log import get_logger

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]

log = get_logger("http")


def error_status(exc: BaseException | None, status: int) -> int:
    """The status a parse error deserves."""
    if isinstance(exc, LineTooLong):
        return 431
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc.message):
        return 431
    return status


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


class DataServer(web.Server):
    """``web.Server`` whose connections use our request handler."""

    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


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
