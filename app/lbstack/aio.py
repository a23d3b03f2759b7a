"""Every use of aiohttp below its public API, in one place.

The data plane stays on aiohttp's pieces — its C HTTP parsers on both sides and its
connector pools (limits, keep-alive expiry) — but writes and reads bytes below them,
which halves a hop's CPU (see the design's measured breakdown). Each use is named
here and pinned by ``tests/test_aio.py``, which fails on an aiohttp that
changed it:

1. ``aiohttp._http_parser.HttpRequestParser``: the C request parser, fed by our own
   protocol. ``feed_data`` returns ``(messages, upgraded, tail)``; each message is a
   ``RawRequestMessage`` with ``raw_headers`` as received, its body a ``StreamReader``
   the parser feeds. ``max_msg_queue_size`` + ``message_consumed`` bound pipelining.
   Known flaw, pinned: bytes after a request carrying ``Connection: upgrade`` with an
   ``Upgrade`` aiohttp does not tunnel are dropped by ``feed_data`` (``front`` recovers
   them).
2. ``aiohttp.base_protocol.BaseProtocol``: write flow control (``writing_paused``,
   ``_drain_helper``), read flow control for the body ``StreamReader``
   (``pause_reading``/``resume_reading``) and the buffer hold
   (``_pause_reading_for_buffer``/``_resume_reading_for_buffer``).
3. ``BaseConnector.connect(req, traces, timeout)`` with one ``ClientRequest`` built
   per upstream, not per request: the connector reads only its connection key and
   address fields.
4. The pooled connection's ``ResponseHandler``: ``set_response_params`` (a C response
   parser, kept by a pooled connection as ``_parser`` with ``_skip_payload``, so it is
   made again only for a new connection or a change of HEAD-ness), ``read()`` for the
   next ``(RawResponseMessage, StreamReader)``, ``should_close``.
5. ``ResponseHandler.set_parser(reader, None)`` after a 101: the connection's bytes go
   to our reader as they come (``read_raw``), as aiohttp's WebSocket client does it.
6. Connector pool state, to drain and recycle a pool: ``_force_close`` (keep nothing
   alive), ``_conns`` (idle connections), ``_acquired`` and ``_waiters`` (busy).
7. For the simulated server's ``DataServer`` (aiohttp's own request handler): a
   request's ``_message.should_close`` and its protocol's ``_manager`` (its server,
   which may be draining), and a handler's ``_request_in_progress``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from ssl import SSLContext
from typing import Any, Final, Protocol

import aiohttp
from aiohttp import ClientTimeout, http_parser, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.http import HttpVersion11 as HTTP11
from aiohttp.http_parser import HttpRequestParser, RawRequestMessage, RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from yarl import URL

from lbstack.address import Address

__all__ = [
    "EMPTY_PAYLOAD",
    "HTTP11",
    "BaseProtocol",
    "Connection",
    "Pool",
    "RawRequestMessage",
    "RawResponseMessage",
    "RequestPayloadError",
    "StreamReader",
    "drain",
    "request_parser",
]

if getattr(http_parser, "HttpRequestParserC", None) is not HttpRequestParser:
    # The pure-Python parser has the history of smuggling bugs: never forward on it.
    raise ImportError("aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS?)")

# aiohttp's own defaults for the buffers and pipelining of a server connection.
READ_BUFSIZE: Final = 2**16
MAX_PIPELINED: Final = 16
_NO_TRACES: Final[list[Any]] = []


def request_parser(
    protocol: BaseProtocol,
    loop: asyncio.AbstractEventLoop,
    *,
    max_line_size: int,
    max_headers: int,
) -> HttpRequestParser:
    """aiohttp's C request parser for one client connection; bodies are not decoded."""
    return HttpRequestParser(
        protocol,
        loop,
        READ_BUFSIZE,
        max_line_size=max_line_size,
        max_field_size=max_line_size,
        max_headers=max_headers,
        payload_exception=RequestPayloadError,
        auto_decompress=False,
        max_msg_queue_size=MAX_PIPELINED,
    )


async def drain(protocol: BaseProtocol) -> None:
    """Wait until ``protocol``'s transport takes writes again (raises if it is gone)."""
    if protocol.writing_paused or protocol.transport is None:
        await protocol._drain_helper()


def hold_reading(protocol: BaseProtocol) -> None:
    """Stop reading the transport (requests queued, bytes held, a tunnel's far side full)."""
    if not protocol._buffer_paused:
        protocol._pause_reading_for_buffer()


def release_reading(protocol: BaseProtocol) -> None:
    """Read again, unless body flow control still holds the transport."""
    if protocol._buffer_paused:
        protocol._resume_reading_for_buffer()


def reading_held(protocol: BaseProtocol) -> bool:
    return bool(protocol._buffer_paused)


class Pool:
    """A keep-alive pool to one upstream: aiohttp's connector, and the request it keys on.

    ``acquire`` gives a ``Connection`` whose protocol is ready for one exchange; the
    caller ``release``s it (pooled unless it must close) or ``close``s it.
    """

    __slots__ = ("_connect_timeout", "_key", "connector", "host")

    def __init__(
        self,
        address: Address,
        loop: asyncio.AbstractEventLoop,
        *,
        connect_timeout: float,
        keepalive_timeout: float,
        limit: int,
        ssl: SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        """``ssl`` and ``server_hostname`` (default: the address's host) are for an
        ``https://`` address."""
        if address.is_unix:
            self.connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=address.path, keepalive_timeout=keepalive_timeout, limit=limit
            )
        else:  # an https address's URL makes aiohttp connect with TLS
            self.connector = aiohttp.TCPConnector(
                ssl=True if ssl is None else ssl, keepalive_timeout=keepalive_timeout, limit=limit
            )
        url = URL(address.http_base)
        self._key = ClientRequest("GET", url, loop=loop, server_hostname=server_hostname)
        self._connect_timeout = ClientTimeout(total=None, connect=connect_timeout)
        # What a request from a client that sent no Host (HTTP/1.0) says instead.
        self.host = (url.host_port_subcomponent or "localhost").encode()

    async def acquire(self, *, head: bool) -> Connection:
        """A connection, pooled or new, set up to read one response.

        Raises ``aiohttp.ClientConnectorError`` when the upstream can't be reached
        and ``aiohttp.ConnectionTimeoutError`` after the connect timeout.
        """
        try:
            conn = await self.connector.connect(self._key, _NO_TRACES, self._connect_timeout)
        except TimeoutError as exc:
            raise aiohttp.ConnectionTimeoutError(f"connect timeout to {self._key.url}") from exc
        protocol = conn.protocol
        assert protocol is not None
        # A pooled connection keeps its response parser: a new one per exchange is
        # needed only when none exists yet or HEAD-ness changed.
        if protocol._parser is None or protocol._skip_payload is not head:
            protocol.set_response_params(
                skip_payload=head,
                read_until_eof=True,
                auto_decompress=False,
                read_bufsize=READ_BUFSIZE,
            )
        return conn

    def stop_pooling(self) -> None:
        """Keep no connection alive: close the idle ones now, the others as their
        exchange ends. The upstream sees clean closes."""
        connector = self.connector
        connector._force_close = True
        idle = list(connector._conns.values())
        connector._conns.clear()
        for connections in idle:
            for protocol, _ in connections:
                protocol.close()

    def resume_pooling(self) -> None:
        self.connector._force_close = False

    @property
    def pooling(self) -> bool:
        return not self.connector._force_close

    def busy(self) -> bool:
        """Whether a connection of this pool is in use or awaited."""
        connector = self.connector
        return bool(connector._acquired or connector._waiters)

    async def close(self) -> None:
        await self.connector.close()


def next_response(
    protocol: ResponseHandler,
) -> Coroutine[Any, Any, tuple[RawResponseMessage, StreamReader]]:
    """The next response on ``protocol`` (awaited by the caller: one frame less per hop)."""
    return protocol.read()


def interim(message: RawResponseMessage) -> bool:
    """Whether ``message`` is an interim (1xx) response, to skip; 101 is final."""
    return 100 <= message.code <= 199 and message.code != 101


class RawReader(Protocol):
    """What takes an upgraded upstream connection's bytes (``read_raw``)."""

    def feed_data(self, data: bytes) -> tuple[bool, bytes]: ...

    def feed_eof(self) -> None: ...


def read_raw(protocol: ResponseHandler, reader: RawReader) -> None:
    """From now on, ``protocol``'s bytes go to ``reader`` as they come (after a 101).

    The way aiohttp's own WebSocket client takes over a connection: ``set_parser``,
    which first hands over what came after the 101's head.
    """
    protocol.set_parser(reader, None)


def asks_to_close(request: web.BaseRequest) -> bool:
    """Whether the client said ``Connection: close`` (or spoke HTTP/1.0 without keep-alive)."""
    return bool(request._message.should_close)


def server_of(request: web.BaseRequest) -> web.Server | None:
    """The ``web.Server`` whose connection ``request`` came on (None once it is gone)."""
    protocol = request._protocol
    return None if protocol is None else protocol._manager


def handling(handler: RequestHandler) -> bool:
    """Whether aiohttp's request handler is in the middle of a request."""
    return bool(handler._request_in_progress)


def protocol_of(conn: Connection) -> ResponseHandler:
    protocol = conn.protocol
    assert protocol is not None
    return protocol
