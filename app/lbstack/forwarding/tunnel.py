"""Upgraded connections: after ``101 Switching Protocols``, bytes both ways as they come.

A request upgrading to a protocol the tier tunnels (``tunnels.protocols``, WebSocket
by default) is forwarded with its ``Connection: upgrade`` and ``Upgrade``; if the
upstream answers 101, the client connection and the upstream connection become one
byte tunnel until either side closes, the tunnel idles past ``tunnels.idle_timeout``,
or the process stops. The upstream connection never goes back to the pool, and the
tunnel holds its upstream's in-flight slot for its whole life, so routing spreads long
connections as it spreads requests.

Each direction's writes are flow-controlled: when one side can't take more, reading
from the other stops. For WebSocket, frame boundaries are tracked both ways, so that a
tunnel closed by this hop (idle, or shut down after ``graceful_timeout``) gets a close
frame (1001, going away) on each side when it is between frames, instead of a cut.
"""

from __future__ import annotations

import asyncio
import os
import struct
from typing import TYPE_CHECKING, Final

from lbstack import aio
from lbstack.forwarding.state import TUNNEL, Exchange
from lbstack.log import get_logger

if TYPE_CHECKING:
    from lbstack.forwarding.hop import Hop
    from lbstack.forwarding.upstreams import Link

log = get_logger("forwarding")

_GOING_AWAY: Final = struct.pack("!H", 1001)
# A close frame from the server side is unmasked; from the client side, masked.
CLOSE_TO_CLIENT: Final = b"\x88\x02" + _GOING_AWAY


def close_to_server() -> bytes:
    """A masked WebSocket close frame (1001), as a client must send it."""
    mask = os.urandom(4)
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(_GOING_AWAY))


class Frames:
    """Where the WebSocket frames of one direction begin (RFC 6455 §5.2)."""

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._left = 0  # payload bytes of the current frame still to come
        self._head = b""  # a frame header split across reads

    @property
    def between(self) -> bool:
        return not self._left and not self._head

    def feed(self, data: bytes) -> None:
        at, end = 0, len(data)
        while at < end:
            if self._left:
                take = min(self._left, end - at)
                self._left -= take
                at += take
                continue
            head = self._head + data[at : at + 14]
            size = _frame_size(head)
            if size is None:  # the header goes on in the next read
                self._head = head
                return
            header, payload = size
            at += header - len(self._head)
            self._head = b""
            self._left = payload


def _frame_size(head: bytes) -> tuple[int, int] | None:
    """(header length, payload length) of the frame ``head`` starts, or None if partial."""
    if len(head) < 2:
        return None
    length = head[1] & 0x7F
    extra = 2 if length == 126 else 8 if length == 127 else 0
    header = 2 + extra + (4 if head[1] & 0x80 else 0)
    if len(head) < header:
        return None
    if extra:
        length = int.from_bytes(head[2 : 2 + extra], "big")
    return header, length


class _Reader:
    """What aiohttp's ``ResponseHandler`` feeds the upstream's bytes to after a 101."""

    __slots__ = ("_tunnel",)

    def __init__(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._tunnel.down(data)
        return False, b""

    def feed_eof(self) -> None:
        self._tunnel.finish("the upstream closed")


class Tunnel:
    """One client connection and one upstream connection, joined after a 101."""

    def __init__(
        self, fw: Hop, ex: Exchange, link: Link, conn: aio.Connection, websocket: bool
    ) -> None:
        self.fw = fw
        self.ex = ex
        self.link = link
        self._conn = conn
        self._upstream = aio.protocol_of(conn)
        self._idle = fw.tier.tunnels.idle_timeout
        self._time = fw.loop.time
        self._frames = (Frames(), Frames()) if websocket else None
        self._wake: asyncio.Future[None] = fw.loop.create_future()
        self._ended = ""
        self._bytes = fw.stats.tunnel_bytes

    async def run(self) -> None:
        """Carry bytes until either side closes (or the exchange is expired)."""
        ex = self.ex
        ex.phase = TUNNEL
        ex.deadline = self._time() + self._idle
        held = ex.conn.start_tunnel(self)
        if held:
            self.up(held)
        aio.read_raw(self._upstream, _Reader(self))
        stats = self.fw.stats
        stats.tunnels_open += 1
        stats.tunnels["opened"] += 1
        try:
            while not self._ended:
                await self._wake
                self._wake = self.fw.loop.create_future()
                if self._ended:
                    break
                # Poked because the upstream could take no more: read the client again
                # once it can (it may have already, between the poke and now).
                if self._upstream.writing_paused:
                    await aio.drain(self._upstream)
                ex.conn.resume_reading_for_tunnel()
        except asyncio.CancelledError:
            if not ex.absorb():
                self.finish("the client went away")
                raise
            self.close("idle for longer than tunnels.idle_timeout")
        except ConnectionError:
            self.finish("the upstream went away")
        finally:
            stats.tunnels_open -= 1
            self._conn.close()
            ex.conn.end_tunnel()
        log.debug("tunnel to %s closed: %s", self.link.upstream.name, self._ended)

    # -- the two directions --------------------------------------------------------

    def up(self, data: bytes) -> None:
        """Client bytes, to the upstream."""
        transport = self._upstream.transport
        if transport is None:
            self.finish("the upstream went away")
            return
        self._bytes["up"] += len(data)
        self.ex.deadline = self._time() + self._idle
        if self._frames is not None:
            self._frames[0].feed(data)
        transport.write(data)
        if self._upstream.writing_paused:
            self.ex.conn.pause_reading_for_tunnel()
            self._poke()

    def down(self, data: bytes) -> None:
        """Upstream bytes, to the client."""
        client = self.ex.conn
        self._bytes["down"] += len(data)
        self.ex.deadline = self._time() + self._idle
        if self._frames is not None:
            self._frames[1].feed(data)
        client.write(data)
        if client.writing_paused:
            self._upstream.pause_reading()

    def client_writable(self) -> None:
        """The client's socket takes writes again: read from the upstream again."""
        if self._upstream.transport is not None:
            self._upstream.resume_reading()

    # -- ending ----------------------------------------------------------------------

    def _poke(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)

    def finish(self, why: str) -> None:
        """One side closed: so does the other (the connection task ends the tunnel)."""
        if not self._ended:
            self._ended = why
            self._poke()

    def close(self, why: str) -> None:
        """This hop ends the tunnel: a WebSocket close to each side between frames."""
        frames = self._frames
        if frames is not None and frames[0].between and frames[1].between:
            self.ex.conn.write(CLOSE_TO_CLIENT)
            transport = self._upstream.transport
            if transport is not None:
                transport.write(close_to_server())
        self.finish(why)
