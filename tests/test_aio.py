"""Contract tests: each use of aiohttp below its public API that ``lbstack.aio`` makes.

Each test pins one behaviour the data plane relies on, so that an aiohttp that changed
it fails here, by name, instead of somewhere in the middle of a forwarded request.
"""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path

import aiohttp
from aiohttp import http_parser, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.client_proto import ResponseHandler

from lbstack import aio
from lbstack.address import Address
from tests.conftest import UnixServers

REQUEST = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Role: adm\xffin\r\n\r\n"
UPGRADE = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"


def parser() -> tuple[aio.BaseProtocol, object]:
    loop = asyncio.get_running_loop()
    protocol = BaseProtocol(loop)
    return protocol, aio.request_parser(protocol, loop, max_line_size=8190, max_headers=128)


async def test_the_c_request_parser_gives_raw_headers_and_messages() -> None:
    _, p = parser()
    assert type(p).__module__ == "aiohttp._http_parser"
    assert http_parser.HttpRequestParserC is http_parser.HttpRequestParser
    messages, upgraded, tail = p.feed_data(REQUEST + REQUEST)  # type: ignore[attr-defined]
    assert (len(messages), upgraded, tail) == (2, False, b"")
    message, payload = messages[0]
    assert payload is aio.EMPTY_PAYLOAD
    assert message.raw_headers == ((b"Host", b"x"), (b"X-Role", b"adm\xffin"))
    assert (message.method, message.path, message.version) == ("GET", "/a", (1, 1))
    for name in ("should_close", "upgrade", "chunked", "url"):
        assert hasattr(message, name)
    assert callable(p.message_consumed)  # type: ignore[attr-defined]
    assert "max_msg_queue_size" in inspect.signature(http_parser.HttpRequestParserPy).parameters


async def test_the_parser_drops_what_follows_an_upgrade_it_does_not_tunnel() -> None:
    # front._after_heads recovers these bytes; when aiohttp stops dropping them this
    # fails, and the recovery must go (or it would see the next request twice).
    _, p = parser()
    messages, upgraded, tail = p.feed_data(UPGRADE + REQUEST)  # type: ignore[attr-defined]
    assert len(messages) == 1 and messages[0][0].upgrade
    assert (upgraded, tail) == (False, b"")
    again, _, _ = p.feed_data(REQUEST)  # type: ignore[attr-defined]
    assert len(again) == 1  # and the parser goes on with the next read


async def test_a_websocket_upgrade_is_reported_upgraded_with_its_tail() -> None:
    _, p = parser()
    ws = UPGRADE.replace(b"h2c", b"websocket")
    messages, upgraded, tail = p.feed_data(ws + REQUEST)  # type: ignore[attr-defined]
    assert (len(messages), upgraded, tail) == (1, True, REQUEST)
    p.set_upgraded(False)  # type: ignore[attr-defined]
    assert len(p.feed_data(tail)[0]) == 1  # type: ignore[attr-defined]


async def test_base_protocol_flow_control_hooks() -> None:
    protocol, _ = parser()
    for name in ("_drain_helper", "_pause_reading_for_buffer", "_resume_reading_for_buffer"):
        assert callable(getattr(protocol, name))
    assert protocol.writing_paused is False
    assert aio.reading_held(protocol) is False
    aio.hold_reading(protocol)
    assert aio.reading_held(protocol) is True
    aio.release_reading(protocol)
    assert aio.reading_held(protocol) is False


async def echo(request: web.BaseRequest) -> web.StreamResponse:
    return web.Response(text=f"{request.method} {request.path}")


async def test_pool_connects_reads_and_pools(unix_servers: UnixServers) -> None:
    address = await unix_servers.serve(echo, "up")
    loop = asyncio.get_running_loop()
    pool = aio.Pool(address, loop, connect_timeout=1.0, keepalive_timeout=5.0, limit=0)
    try:
        parsers = []
        for _ in range(2):
            conn = await pool.acquire(head=False)
            protocol = aio.protocol_of(conn)
            parsers.append(protocol._parser)
            assert isinstance(protocol, ResponseHandler)
            assert pool.busy()  # connector._acquired
            assert protocol.transport is not None
            protocol.transport.write(b"GET /x HTTP/1.1\r\nHost: up\r\n\r\n")
            message, payload = await aio.next_response(protocol)
            assert not aio.interim(message)
            assert message.code == 200
            assert await payload.read() == b"GET /x"
            assert not protocol.should_close
            conn.release()
            assert not pool.busy()
        assert sum(len(c) for c in pool.connector._conns.values()) == 1  # pooled, reused
        assert parsers[0] is parsers[1] is not None  # the pooled connection kept its parser
        conn = await pool.acquire(head=True)  # HEAD: a parser that expects no body
        assert aio.protocol_of(conn)._parser is not parsers[0]
        assert aio.protocol_of(conn)._skip_payload is True
        conn.close()
        pool.stop_pooling()  # connector._force_close, _conns
        assert not pool.pooling and not pool.connector._conns
        pool.resume_pooling()
        assert pool.pooling
    finally:
        await pool.close()


async def test_pool_raises_aiohttp_connect_errors(sockdir: Path) -> None:
    loop = asyncio.get_running_loop()
    address = Address.unix(str(sockdir / "nobody.sock"))
    pool = aio.Pool(address, loop, connect_timeout=1.0, keepalive_timeout=5.0, limit=0)
    try:
        try:
            await pool.acquire(head=False)
        except aiohttp.ClientConnectorError:
            pass
        else:
            raise AssertionError("connected to nothing")
        assert pool.host == b"localhost"
    finally:
        await pool.close()


async def test_read_raw_takes_an_upgraded_connections_bytes(unix_servers: UnixServers) -> None:
    async def ws_hello(request: web.BaseRequest) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hi")
        await ws.close()
        return ws

    address = await unix_servers.serve(ws_hello, "ws")
    loop = asyncio.get_running_loop()
    pool = aio.Pool(address, loop, connect_timeout=1.0, keepalive_timeout=5.0, limit=0)
    got: list[bytes] = []
    framed = loop.create_future()

    class Reader:
        def feed_data(self, data: bytes) -> tuple[bool, bytes]:
            got.append(data)
            if b"hi" in b"".join(got) and not framed.done():
                framed.set_result(None)
            return False, b""

        def feed_eof(self) -> None:
            pass

    try:
        conn = await pool.acquire(head=False)
        protocol = aio.protocol_of(conn)
        assert protocol.transport is not None
        protocol.transport.write(
            b"GET /ws HTTP/1.1\r\nHost: ws\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        )
        message, _ = await aio.next_response(protocol)
        assert message.code == 101
        aio.read_raw(protocol, Reader())
        await asyncio.wait_for(framed, 5.0)
        assert b"".join(got).startswith(b"\x81\x02hi")  # the text frame, as sent
        conn.close()
    finally:
        await pool.close()


async def test_what_the_data_server_reads_of_aiohttps_request_handler(
    unix_servers: UnixServers,
) -> None:
    seen: dict[str, object] = {}
    server: list[web.Server] = []

    async def look(request: web.BaseRequest) -> web.StreamResponse:
        seen["close"] = aio.asks_to_close(request)
        seen["server"] = aio.server_of(request)
        seen["busy"] = [aio.handling(c) for c in server[0].connections]
        return web.Response(text="ok")

    low = web.Server(look)
    server.append(low)
    address = await unix_servers.serve_server(low, "look")
    connector = aiohttp.UnixConnector(path=address.path)
    async with (
        aiohttp.ClientSession(connector=connector) as client,
        client.get("http://x/", headers={"Connection": "close"}) as response,
    ):
        assert response.status == 200
    assert seen == {"close": True, "server": low, "busy": [True]}
