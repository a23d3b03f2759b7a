"""The forwarding core: a Forwarder on a unix socket in front of fake upstream servers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from lbstack.address import Address
from lbstack.component import ChildSpec, UpstreamSpec
from lbstack.config import Config, Limits, TierConfig, Timeouts
from lbstack.forwarding import FORWARDER, Forwarder
from lbstack.forwarding.front import FrontServer
from lbstack.metrics import ComponentMetrics
from lbstack.tiers import balancer, proxy
from lbstack.tiers.router import create_forwarder
from tests.conftest import UnixServers

MiB = 1024 * 1024
WAIT = 10.0  # the longest any single step of a test may take


@dataclass
class Front:
    """A forwarder serving on a unix socket, and a client session to it."""

    forwarder: Forwarder
    metrics: ComponentMetrics
    address: Address
    client: aiohttp.ClientSession

    def url(self, target: str) -> URL:
        return URL(f"http://localhost{target}", encoded=True)

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(
            name, {"role": self.metrics.role, "instance": self.metrics.instance, **labels}
        )
        return 0.0 if value is None else value


class MakeFront(Protocol):
    async def __call__(
        self,
        upstreams: Sequence[UpstreamSpec],
        *,
        edge: bool = False,
        policy: str = "round_robin",
        timeouts: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        access_log: str = "",
    ) -> Front: ...


@pytest.fixture
def make_front(unix_servers: UnixServers) -> MakeFront:
    async def make(
        upstreams: Sequence[UpstreamSpec],
        *,
        edge: bool = False,
        policy: str = "round_robin",
        timeouts: dict[str, Any] | None = None,
        limits: dict[str, Any] | None = None,
        access_log: str = "",
    ) -> Front:
        tier = TierConfig.model_validate(
            {
                "policy": policy,
                "timeouts": timeouts or {},
                "limits": limits or {},
                "access_log": access_log,
            }
        )
        name = "balancer-0" if edge else "proxy-0"
        forwarder, metrics = create_forwarder(
            name, "balancer" if edge else "proxy", tier, upstreams, edge=edge, rng=Random(7)
        )
        await forwarder.start()
        unix_servers.stack.push_async_callback(forwarder.close)
        address = await unix_servers.serve_server(forwarder.data_server(), name)
        client = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=address.path))
        unix_servers.stack.push_async_callback(client.close)
        return Front(forwarder, metrics, address, client)

    return make


Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


async def serve_upstream(servers: UnixServers, name: str, handler: Handler) -> UpstreamSpec:
    """An upstream server; like the stack's, a client that goes away cancels its handler."""
    address = await servers.serve(handler, name, handler_cancellation=True)
    return UpstreamSpec(name=name, address=address)


def refusing_upstream(directory: Path, name: str) -> UpstreamSpec:
    """An upstream whose socket exists but refuses connections (bound, never listening)."""
    path = str(directory / f"{name}.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.close()  # the file stays; connecting to it is refused
    return UpstreamSpec(name=name, address=Address.unix(path))


async def echo(request: web.BaseRequest) -> web.StreamResponse:
    """What the upstream received, as JSON."""
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "target": request.raw_path,
            "headers": list(request.headers.items()),
            "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest(),
        }
    )


def header(seen: dict[str, Any], name: str) -> list[str]:
    """Every value of header ``name`` in an echo, in order."""
    return [value for key, value in seen["headers"] if key.lower() == name.lower()]


async def raw_exchange(address: Address, data: bytes) -> tuple[int, CIMultiDict[str], bytes]:
    """Send raw bytes on a new connection and read one response."""
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(address.path)
        try:
            writer.write(data)
            await writer.drain()
            return await read_response(reader)
        finally:
            writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, CIMultiDict[str], bytes]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
    if "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read()
    return int(status_line.split()[1]), headers, body


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), WAIT)


# Forwarding intact ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_method_target_headers_and_body_go_upstream_intact(
    unix_servers: UnixServers, make_front: MakeFront, method: str
) -> None:
    front = await make_front([await serve_upstream(unix_servers, "server-0-0", echo)])
    target = "/a/../b//c;p=1/%7e%2F?x=%2F&y=1+2&z&x=3"
    body = bytes(range(256)) * 10 if method in ("POST", "PUT", "PATCH") else b""
    async with front.client.request(
        method,
        front.url(target),
        data=body or None,
        headers={"X-Custom": "one", "Cookie": "a=1; b=2", "Host": "example.test"},
    ) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["method"] == method
    assert seen["target"] == target
    assert seen["length"] == len(body)
    assert seen["sha256"] == hashlib.sha256(body).hexdigest()
    assert header(seen, "X-Custom") == ["one"]
    assert header(seen, "Cookie") == ["a=1; b=2"]
    assert header(seen, "Host") == ["example.test"]


async def test_nothing_is_added_but_the_forwarding_headers(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    front = await make_front([await serve_upstream(unix_servers, "server-0-0", echo)])
    status, _, body = await raw_exchange(
        front.address, b"GET /x HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    seen = json.loads(body)
    assert sorted(name.lower() for name, _ in seen["headers"]) == [
        "host",
        "via",
        "x-forwarded-for",
        "x-request-id",
    ]


async def test_absolute_form_target_goes_upstream_in_origin_form(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    front = await make_front([await serve_upstream(unix_servers, "server-0-0", echo)])
    status, _, body = await raw_exchange(
        front.address,
        b"GET http://h/abs/p?q=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    )
    assert status == 200
    assert json.loads(body)["target"] == "/abs/p?q=1"


async def test_hop_by_hop_headers_are_removed_both_ways(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = await echo(request)
        response.headers["Connection"] = "X-Resp-Secret"
        response.headers["X-Resp-Secret"] = "1"
        response.headers["Keep-Alive"] = "timeout=5"
        response.headers["Proxy-Authenticate"] = "Basic"
        response.headers["Trailer"] = "X-Checksum"
        response.headers["X-Resp-Kept"] = "yes"
        return response

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    request = (
        b"GET /h HTTP/1.1\r\n"
        b"Host: h\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: websocket\r\n"
        b"Proxy-Authorization: Basic YTpi\r\n"
        b"X-Kept: yes\r\n"
        b"\r\n"
    )
    status, headers, body = await raw_exchange(front.address, request)
    assert status == 200
    seen = {name.lower() for name, _ in json.loads(body)["headers"]}
    assert "x-kept" in seen
    hop = {"connection", "x-secret", "keep-alive", "proxy-connection", "te", "trailer"}
    assert not seen & (hop | {"upgrade", "proxy-authorization"})
    assert headers["X-Resp-Kept"] == "yes"
    for name in ("X-Resp-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert name not in headers
    assert headers.get("Connection", "keep-alive").lower() in ("keep-alive", "close")


async def test_edge_sets_forwarded_headers_and_a_request_id(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = await echo(request)
        response.headers["X-Served-By"] = "server-1-2"  # a proxy's answer, passed through
        return response

    front = await make_front([await serve_upstream(unix_servers, "proxy-1", handler)], edge=True)
    ids = []
    for _ in range(2):
        async with front.client.get(
            front.url("/"),
            headers={
                "X-Forwarded-For": "203.0.113.9",
                "X-Forwarded-Proto": "https",
                "Via": "1.0 cdn",
            },
        ) as response:
            seen = await response.json()
            assert response.headers["X-Served-By"] == "server-1-2"
            request_id = response.headers["X-Request-Id"]
        assert header(seen, "X-Forwarded-For") == ["203.0.113.9, unix"]
        assert header(seen, "X-Forwarded-Proto") == ["http"]
        assert header(seen, "Via") == ["1.0 cdn, 1.1 balancer-0"]
        assert header(seen, "X-Request-Id") == [request_id]
        ids.append(request_id)
    assert ids[0] and ids[0] != ids[1]


async def test_proxy_keeps_proto_and_request_id_and_says_who_served(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = await echo(request)
        response.headers["X-Served-By"] = "someone-else"
        return response

    front = await make_front([await serve_upstream(unix_servers, "server-0-1", handler)])
    async with front.client.get(
        front.url("/"), headers={"X-Forwarded-Proto": "https", "X-Request-Id": "req-42"}
    ) as response:
        seen = await response.json()
        assert response.headers["X-Request-Id"] == "req-42"
        assert response.headers.getall("X-Served-By") == ["server-0-1"]
    assert header(seen, "X-Forwarded-Proto") == ["https"]
    assert header(seen, "X-Request-Id") == ["req-42"]
    assert header(seen, "Via") == ["1.1 proxy-0"]
    async with front.client.get(front.url("/")) as response:
        seen = await response.json()
    assert header(seen, "X-Forwarded-Proto") == []


async def test_expect_100_continue_is_answered_here(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    front = await make_front([await serve_upstream(unix_servers, "server-0-0", echo)])
    async with front.client.post(front.url("/"), data=b"payload", expect100=True) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["length"] == len(b"payload")
    assert header(seen, "Expect") == []


# Streaming -----------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_upload_streams_through(
    unix_servers: UnixServers, make_front: MakeFront, framing: str
) -> None:
    """The upstream sees the first chunk while the client still holds back the rest."""
    chunk, count = bytes(range(256)) * 4096, 32  # 32 MiB
    first_seen = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        digest, length = hashlib.sha256(), 0
        async for data in request.content.iter_any():
            digest.update(data)
            length += len(data)
            first_seen.set()
        return web.json_response(
            {
                "length": length,
                "sha256": digest.hexdigest(),
                "content_length": request.headers.get("Content-Length"),
                "transfer_encoding": request.headers.get("Transfer-Encoding"),
            }
        )

    async def body() -> AsyncIterator[bytes]:
        yield chunk
        await wait(first_seen)
        for _ in range(count - 1):
            yield chunk

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    total = len(chunk) * count
    headers = {"Content-Length": str(total)} if framing == "content-length" else {}
    async with front.client.post(front.url("/up"), data=body(), headers=headers) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["length"] == total
    assert seen["sha256"] == hashlib.sha256(chunk * count).hexdigest()
    if framing == "content-length":
        assert (seen["content_length"], seen["transfer_encoding"]) == (str(total), None)
    else:
        assert (seen["content_length"], seen["transfer_encoding"]) == (None, "chunked")


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_download_streams_through(
    unix_servers: UnixServers, make_front: MakeFront, framing: str
) -> None:
    """The client gets the first chunk while the upstream still holds back the rest."""
    chunk, count = bytes(range(256)) * 4096, 32  # 32 MiB
    first_received = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        if framing == "content-length":
            response.content_length = len(chunk) * count
        await response.prepare(request)
        await response.write(chunk)
        await wait(first_received)
        for _ in range(count - 1):
            await response.write(chunk)
        await response.write_eof()
        return response

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    digest, length = hashlib.sha256(), 0
    async with front.client.get(front.url("/down")) as response:
        assert response.status == 200
        if framing == "content-length":
            assert response.headers["Content-Length"] == str(len(chunk) * count)
        else:
            assert response.headers["Transfer-Encoding"] == "chunked"
        async for data in response.content.iter_any():
            digest.update(data)
            length += len(data)
            if length >= len(chunk):
                first_received.set()
    assert length == len(chunk) * count
    assert digest.hexdigest() == hashlib.sha256(chunk * count).hexdigest()


# The stack's own errors ----------------------------------------------------------------


async def test_http10_chunked_request_is_400(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    calls = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await echo(request)

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    status, headers, body = await raw_exchange(
        front.address,
        b"POST /x HTTP/1.0\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    assert status == 400
    assert headers["X-Request-Id"]
    assert headers["Content-Type"].startswith("text/plain")
    assert body.startswith(b"400 Bad Request")
    assert calls == 0


async def test_idle_client_body_is_408_and_the_connection_closed(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", echo)], timeouts={"idle": 0.3}
    )
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(front.address.path)
        writer.write(b"POST /slow HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        status, headers, body = await read_response(reader)
        # Hung up at once, not after aiohttp's 10 s lingering for the rest of the body.
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        writer.close()
    assert status == 408
    assert headers["X-Request-Id"]
    assert body.startswith(b"408 Request Timeout")


async def test_content_length_over_the_limit_is_413_before_any_upstream(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    calls = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        return await echo(request)

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)],
        limits={"max_body_size": 1000},
    )
    status, headers, _ = await raw_exchange(
        front.address, b"PUT /big HTTP/1.1\r\nHost: h\r\nContent-Length: 2000\r\n\r\n"
    )
    assert status == 413
    assert headers["X-Request-Id"]
    async with front.client.put(front.url("/small"), data=b"x" * 1000) as response:
        assert response.status == 200
    assert calls == 1


async def test_chunked_body_over_the_limit_is_413_and_never_completes_upstream(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    """The first chunk is already upstream when the second one crosses the limit."""
    got_first, finished = asyncio.Event(), asyncio.Event()
    completed: list[int] = []

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        try:
            first = await request.content.readany()
            got_first.set()
            completed.append(len(first + await request.read()))
            return web.Response(text="whole body")
        finally:
            finished.set()

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)],
        limits={"max_body_size": 1000},
    )
    chunk = b"258\r\n" + b"y" * 600 + b"\r\n"
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(front.address.path)
        writer.write(b"POST /big HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk)
        await got_first.wait()
        writer.write(chunk)
        status, headers, body = await read_response(reader)
        writer.close()
        await finished.wait()
    assert status == 413
    assert headers["X-Request-Id"]
    assert body.startswith(b"413 Content Too Large")
    assert completed == []


async def test_oversized_header_is_431(unix_servers: UnixServers, make_front: MakeFront) -> None:
    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", echo)],
        limits={"max_header_size": 1024},
    )
    status, _, _ = await raw_exchange(
        front.address, b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n"
    )
    assert status == 431


async def test_refused_upstream_is_502(sockdir: Path, make_front: MakeFront) -> None:
    front = await make_front([refusing_upstream(sockdir, "server-0-0")])
    async with front.client.get(front.url("/")) as response:
        assert response.status == 502
        assert response.headers["X-Request-Id"]
        assert (await response.text()).startswith("502 Bad Gateway")
    view = front.forwarder.status()["upstreams"][0]
    assert (view["requests"], view["errors"], view["in_flight"]) == (1, 1, 0)
    labels = {"upstream": "server-0-0", "kind": "connect"}
    assert front.sample("lbstack_upstream_errors_total", **labels) == 1


async def test_upstream_reset_is_502(unix_servers: UnixServers, make_front: MakeFront) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    async with front.client.get(front.url("/")) as response:
        assert response.status == 502
        assert response.headers["X-Request-Id"]
    assert front.sample("lbstack_upstream_errors_total", upstream="server-0-0", kind="reset") == 1


async def test_no_upstream_available_is_503(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    front = await make_front([await serve_upstream(unix_servers, "server-0-0", echo)])
    front.forwarder.upstreams[0].available = False
    async with front.client.get(front.url("/")) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
        assert response.headers["X-Request-Id"]
    front.forwarder.upstreams[0].available = True
    async with front.client.get(front.url("/")) as response:
        assert response.status == 200


async def test_max_concurrent_is_503(unix_servers: UnixServers, make_front: MakeFront) -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        entered.set()
        await wait(release)
        return web.Response(text="done")

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)],
        limits={"max_concurrent": 1},
    )

    async def first() -> int:
        async with front.client.get(front.url("/1")) as response:
            await response.read()
            return response.status

    task = asyncio.create_task(first())
    await wait(entered)
    async with front.client.get(front.url("/2")) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "1"
    release.set()
    assert await asyncio.wait_for(task, WAIT) == 200


async def test_first_byte_timeout_is_504_and_cancels_upstream(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    cancelled = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)],
        timeouts={"first_byte": 0.3},
    )
    async with front.client.get(front.url("/")) as response:
        assert response.status == 504
        assert response.headers["X-Request-Id"]
    await wait(cancelled)
    assert front.sample("lbstack_upstream_errors_total", upstream="server-0-0", kind="timeout") == 1


async def test_stalled_response_body_is_aborted(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b"x" * 100)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)], timeouts={"idle": 0.3}
    )
    async with front.client.get(front.url("/")) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    assert front.sample("lbstack_upstream_errors_total", upstream="server-0-0", kind="timeout") == 1


async def test_upstream_not_reading_the_body_is_504(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    release = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await wait(release)  # never reads the body
        return web.Response()

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)], timeouts={"idle": 0.3}
    )
    size = 16 * MiB
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(front.address.path)

        async def send_body() -> None:
            writer.write(f"PUT /x HTTP/1.1\r\nHost: h\r\nContent-Length: {size}\r\n\r\n".encode())
            with contextlib.suppress(ConnectionError):
                for _ in range(size // MiB):
                    writer.write(b"x" * MiB)
                    await writer.drain()

        sending = asyncio.create_task(send_body())
        status, headers, _ = await read_response(reader)
        await sending
        writer.close()
    release.set()
    assert status == 504
    assert headers["X-Request-Id"]


async def test_client_that_stops_reading_is_cut_off(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    stopped = asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        try:
            for _ in range(256):
                await response.write(b"z" * MiB)
        except (ConnectionError, asyncio.CancelledError):
            stopped.set()
            raise
        return response

    front = await make_front(
        [await serve_upstream(unix_servers, "server-0-0", handler)], timeouts={"idle": 0.3}
    )
    _, writer = await asyncio.open_unix_connection(front.address.path)
    writer.write(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")  # and never read
    await wait(stopped)
    writer.close()
    deadline = asyncio.get_running_loop().time() + WAIT
    while front.forwarder.status()["upstreams"][0]["in_flight"]:
        assert asyncio.get_running_loop().time() < deadline, "the upstream slot is never freed"
        await asyncio.sleep(0.01)  # wait-ok: polling with a deadline


async def test_head_and_the_next_request_on_one_connection(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b"0123456789")

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_unix_connection(front.address.path)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: h\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: 10\r\n" in head
        writer.write(b"GET /g HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        status, _, body = await read_response(reader)
        writer.close()
    assert (status, body) == (200, b"0123456789")


# Retries -------------------------------------------------------------------------------


async def test_connect_failure_goes_to_the_next_upstream(
    sockdir: Path, unix_servers: UnixServers, make_front: MakeFront
) -> None:
    good = await serve_upstream(unix_servers, "server-0-1", echo)
    front = await make_front([refusing_upstream(sockdir, "server-0-0"), good])
    for method in ("GET", "POST", "GET", "POST"):
        async with front.client.request(method, front.url("/r"), data=b"body") as response:
            assert response.status == 200
            assert response.headers["X-Served-By"] == "server-0-1"
            assert (await response.json())["length"] == 4
    refused, served = front.forwarder.status()["upstreams"]
    assert (served["requests"], served["errors"]) == (4, 0)
    assert refused["errors"] >= 1
    retried = front.sample("lbstack_upstream_retries_total", upstream="server-0-0")
    assert retried == refused["errors"]


async def test_post_with_a_body_is_never_replayed(
    unix_servers: UnixServers, make_front: MakeFront
) -> None:
    calls = {"server-0-0": 0, "server-0-1": 0}

    def resetting(name: str) -> Handler:
        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            calls[name] += 1
            await request.read()
            assert request.transport is not None
            request.transport.abort()
            return web.Response()

        return handler

    front = await make_front(
        [
            await serve_upstream(unix_servers, "server-0-0", resetting("server-0-0")),
            await serve_upstream(unix_servers, "server-0-1", resetting("server-0-1")),
        ]
    )
    async with front.client.post(front.url("/pay"), data=b"once only") as response:
        assert response.status == 502
    assert calls == {"server-0-0": 1, "server-0-1": 0}


@pytest.mark.parametrize(("body", "status", "calls"), [(b"", 200, 3), (b"data", 502, 2)])
async def test_keepalive_race_is_replayed_only_without_a_body(
    unix_servers: UnixServers, make_front: MakeFront, body: bytes, status: int, calls: int
) -> None:
    """The upstream drops a pooled connection as it is reused, before answering."""
    per_connection: dict[object, int] = {}
    count = 0

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        nonlocal count
        count += 1
        seen = per_connection[request.protocol] = per_connection.get(request.protocol, 0) + 1
        if seen == 2:
            assert request.transport is not None
            request.transport.abort()
        return web.Response(text="ok")

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    async with front.client.post(front.url("/1"), data=body) as response:
        assert response.status == 200
    async with front.client.post(front.url("/2"), data=body) as response:
        assert response.status == status
    assert count == calls


# Clients that go away ------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /wait HTTP/1.1\r\nHost: h\r\n\r\n",
        b"POST /wait HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"x" * 10,
    ],
    ids=["waiting-for-response", "mid-body"],
)
async def test_client_disconnect_cancels_the_upstream_request(
    unix_servers: UnixServers,
    make_front: MakeFront,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
) -> None:
    entered, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        entered.set()
        try:
            await request.read()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    front = await make_front([await serve_upstream(unix_servers, "server-0-0", handler)])
    caplog.set_level(logging.DEBUG)
    _, writer = await asyncio.open_unix_connection(front.address.path)
    writer.write(request_bytes)
    await writer.drain()
    await wait(entered)
    writer.close()
    await writer.wait_closed()
    await wait(cancelled)
    # Counted as the forwarder closed the upstream connection, so before the upstream saw it.
    assert front.sample("lbstack_client_disconnects_total") == 1
    assert front.forwarder.status()["in_flight"] == 0
    assert [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING] == []


# Status, metrics and the components ----------------------------------------------------


async def test_status_and_metrics(unix_servers: UnixServers, make_front: MakeFront) -> None:
    front = await make_front(
        [
            await serve_upstream(unix_servers, "server-0-0", echo),
            await serve_upstream(unix_servers, "server-0-1", echo),
        ],
        policy="least_outstanding",
    )
    for _ in range(4):
        async with front.client.get(front.url("/")) as response:
            assert response.status == 200
    status = front.forwarder.status()
    assert (status["state"], status["in_flight"], status["policy"]) == (
        "ready",
        0,
        "least_outstanding",
    )
    assert [
        (u["name"], u["in_flight"], u["requests"], u["errors"], u["available"])
        for u in status["upstreams"]
    ] == [("server-0-0", 0, 2, 0, True), ("server-0-1", 0, 2, 0, True)]
    assert status["upstreams"][0]["address"].startswith("unix:/")
    json.dumps(status)
    assert front.sample("lbstack_requests_total", code="200") == 4
    assert front.sample("lbstack_request_duration_seconds_count") == 4
    assert front.sample("lbstack_in_flight_requests") == 0
    assert front.sample("lbstack_upstream_requests_total", upstream="server-0-1", code="200") == 2
    assert front.sample("lbstack_upstream_healthy", upstream="server-0-0") == 1
    front.forwarder.upstreams[0].healthy = False  # failed its active checks
    assert front.sample("lbstack_upstream_healthy", upstream="server-0-0") == 0


@pytest.mark.parametrize(("role", "edge"), [("balancer", True), ("proxy", False)])
async def test_component_factories(
    aiohttp_client: Any, sockdir: Path, role: str, edge: bool
) -> None:
    config = Config.model_validate(
        {
            role: {
                "timeouts": {"client_keepalive": 5},
                "limits": {"max_header_size": 4096, "max_headers": 50},
            }
        }
    )
    spec = ChildSpec(
        name=f"{role}-0",
        role="balancer" if edge else "proxy",
        listen_fds=(),
        admin_fd=-1,
        upstreams=(UpstreamSpec(name="up-0", address=Address.unix(str(sockdir / "up.sock"))),),
        config=config,
    )
    component = (balancer.create if edge else proxy.create)(spec)
    server = component.data_server()
    assert isinstance(server, FrontServer)
    # Behind the balancer, a proxy leaves room for the lines the balancer added.
    room = (0, 0) if edge else (256, 4)
    assert (server.keepalive, server.max_line_size, server.max_headers) == (
        5,
        4096 + room[0],
        50 + room[1],
    )
    forwarder = component.admin[FORWARDER]
    assert forwarder.edge is edge
    assert forwarder.tier == (config.balancer if edge else config.proxy)
    admin = await aiohttp_client(component.admin)
    response = await admin.get("/readyz")
    assert response.status == 200
    response = await admin.get("/status")
    status = await response.json()
    assert (status["name"], status["role"], status["state"]) == (f"{role}-0", role, "ready")
    assert [u["name"] for u in status["upstreams"]] == ["up-0"]
    await admin.close()
    assert forwarder.state == "stopped"


def test_limits_and_timeouts_defaults_are_sane() -> None:
    # The forwarder's tests lean on these defaults: a pooled connection idles out
    # before a server's keep-alive would close it under us.
    assert Timeouts().pool_idle < Config().server.keepalive
    assert Limits().max_body_size == 0


async def test_the_access_log_has_one_json_line_per_request(
    sockdir: Path, unix_servers: UnixServers, make_front: MakeFront
) -> None:
    good = await serve_upstream(unix_servers, "server-0-1", echo)
    log_path = sockdir / "{name}.jsonl"
    front = await make_front(
        [refusing_upstream(sockdir, "server-0-0"), good],
        access_log=str(log_path),
        limits={"max_body_size": 10},
    )
    async with front.client.get(front.url("/a?b=1"), headers={"X-Request-Id": "r-1"}) as response:
        assert response.status == 200
    async with front.client.post(front.url("/big"), data=b"x" * 100) as response:
        assert response.status == 413
    await front.forwarder.close()  # flushes
    lines = [json.loads(line) for line in (sockdir / "proxy-0.jsonl").read_text().splitlines()]
    assert [(e["method"], e["path"], e["status"]) for e in lines] == [
        ("GET", "/a?b=1", 200),
        ("POST", "/big", 413),
    ]
    first = lines[0]
    assert (first["request_id"], first["instance"], first["upstream"]) == (
        "r-1",
        "proxy-0",
        "server-0-1",
    )
    assert first["attempts"] in (1, 2)  # round robin may try the refusing one first
    assert first["duration"] >= 0 and lines[1]["upstream"] == ""
