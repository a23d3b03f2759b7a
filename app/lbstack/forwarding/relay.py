"""Bodies both ways: the client's request body up, the upstream's answer down.

Bytes go from one transport to the other as they come, within flow control on both
sides, so memory stays bounded whatever the size. An answer whose body came whole with
its head (most small ones) goes to the client in one write. A body with no length
the client can read (close-delimited, or chunked for an HTTP/1.0 client) is re-framed:
chunked to an HTTP/1.1 client, close-delimited to an HTTP/1.0 one.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from lbstack import aio
from lbstack.forwarding.headers import (
    CHUNKED,
    CLOSE,
    CONTINUE,
    KEEP_ALIVE,
    LAST_CHUNK,
    chunk,
    response_head,
)
from lbstack.forwarding.state import (
    CLIENT_GONE,
    READ_CLIENT,
    READ_UPSTREAM,
    UPSTREAM_PHASES,
    WRITE_CLIENT,
    WRITE_UPSTREAM,
    BodyFailed,
    Exchange,
)
from lbstack.log import get_logger

if TYPE_CHECKING:
    from lbstack.forwarding.hop import Hop
    from lbstack.forwarding.upstreams import Link

log = get_logger("forwarding")

_NO_BODY_STATUSES: Final = frozenset({204, 304})


class Relay:
    """Moves one forwarder's bodies: ``send_body`` up, ``relay`` down."""

    def __init__(self, forwarder: Hop) -> None:
        self.fw = forwarder
        self._idle = forwarder.tier.timeouts.idle
        self._max_body = forwarder.tier.limits.max_body_size

    async def send_body(
        self,
        ex: Exchange,
        protocol: aio.BaseProtocol,
        transport: asyncio.Transport,
        chunked: bool,
    ) -> None:
        """The client's body to the upstream as it arrives, within the limits.

        Raises ``BodyFailed`` when the client's side fails: gone, malformed, too slow
        (the sweep), over ``limits.max_body_size``.
        """
        time = self.fw.loop.time
        idle = self._idle
        limit = self._max_body
        payload = ex.payload
        received = 0
        ex.body_started = True  # from here the request can't be replayed
        if ex.expect_continue:
            ex.expect_continue = False
            ex.conn.write(CONTINUE)
        while True:
            ex.phase = READ_CLIENT
            ex.deadline = time() + idle
            try:
                data = await payload.readany()
            except ConnectionError as exc:
                raise BodyFailed(CLIENT_GONE, "client went away") from exc
            except (HttpProcessingError, aio.RequestPayloadError) as exc:
                log.info("malformed request body: %s", exc)
                raise BodyFailed(400, "malformed request body") from exc
            if not data:
                break
            received += len(data)
            if limit and received > limit:
                raise BodyFailed(413, "request body over the limit")
            ex.phase = WRITE_UPSTREAM
            ex.deadline = time() + idle
            transport.write(chunk(data) if chunked else data)
            await aio.drain(protocol)
        if chunked:
            transport.write(LAST_CHUNK)

    async def relay(
        self,
        ex: Exchange,
        link: Link,
        conn: aio.Connection,
        response: aio.RawResponseMessage,
        payload: aio.StreamReader,
    ) -> tuple[int, bool]:
        """The upstream's answer to the client: its status, and whether to keep the client."""
        client = ex.conn
        status = response.code
        keep = not ex.message.should_close and not client.closing
        rechunk = False
        if (
            payload is aio.EMPTY_PAYLOAD
            or status in _NO_BODY_STATUSES
            or "Content-Length" in response.headers
        ):
            framing = b""
        elif ex.http10:
            framing, keep = b"", False  # close-delimited: an HTTP/1.0 client has no chunks
        else:
            framing, rechunk = CHUNKED, True
        if not keep:
            framing += CLOSE
        elif ex.http10:
            framing += KEEP_ALIVE
        head = response_head(
            status,
            response.reason.encode("utf-8", "surrogateescape"),
            response.raw_headers,
            request_id=ex.head.request_id,
            served_by=b"" if self.fw.edge else link.name,
            extra=framing,
        )
        if payload is aio.EMPTY_PAYLOAD or payload.is_eof():
            # Headers and the whole body together, as small answers come: one write.
            body = b"" if payload is aio.EMPTY_PAYLOAD else payload.read_nowait(-1)
            conn.release()
            self.fw.admission.release(link.upstream)
            if rechunk:
                body = chunk(body) + LAST_CHUNK if body else LAST_CHUNK
            client.write(head + body)
            return status, keep
        client.write(head)
        keep = await self._stream(ex, link, conn, payload, rechunk) and keep
        return status, keep

    async def _stream(
        self,
        ex: Exchange,
        link: Link,
        conn: aio.Connection,
        payload: aio.StreamReader,
        rechunk: bool,
    ) -> bool:
        """The body, chunk by chunk; False when it broke off (the client is cut)."""
        fw = self.fw
        time = fw.loop.time
        idle = self._idle
        client = ex.conn
        upstream = link.upstream
        try:
            while True:
                ex.phase = READ_UPSTREAM
                ex.deadline = time() + idle
                data = await payload.readany()
                if not data:
                    break
                ex.phase = WRITE_CLIENT
                ex.deadline = time() + idle
                client.write(chunk(data) if rechunk else data)
                await client.drain()
            if rechunk:
                client.write(LAST_CHUNK)
            conn.release()
            return True
        except asyncio.CancelledError:
            conn.close()
            failure = ex.absorb()
            if not failure:
                fw.client_gone(ex, "receiving the response")
                raise
            if ex.phase in UPSTREAM_PHASES:
                link.stats.error("timeout")
                log.info("%s: response stalled; aborted", upstream.name)
            else:
                log.info("aborted mid-response: the client stopped reading (%d)", failure)
        except Exception as exc:
            conn.close()
            if ex.phase == WRITE_CLIENT and isinstance(exc, ConnectionError):
                fw.client_gone(ex, "receiving the response")
            else:
                kind = "protocol" if isinstance(exc, aiohttp.ClientPayloadError) else "reset"
                link.stats.error(kind)
                log.info("%s: response broken off (%r)", upstream.name, exc)
        finally:
            fw.admission.release(upstream)
        client.abort()
        return False
