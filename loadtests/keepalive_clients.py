"""Many concurrent keep-alive HTTP/1.1 client connections, held open on purpose.

``KeepAliveClients`` opens connections to a TCP listener (loopback) with plain asyncio
streams, sends one GET on each and keeps every connection open and idle; it can send
another GET on each held connection later, then close them all. At most
``concurrency`` connects or requests are under way at once, and each one is bounded by
``timeout``, so a stack that stops answering fails the step instead of hanging it.
Every failure is counted by kind (an exception's name, or ``status 503``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field


class ResponseError(Exception):
    """An answer that was not a complete keep-alive 200."""


@dataclass(frozen=True)
class Phase:
    """One pass over the connections: how many succeeded, failed, and how long it took."""

    ok: int
    failed: int
    seconds: float


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: int = 0


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> None:
    """Read (and drop) a response body framed by Content-Length or chunked encoding."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                return  # (no trailers from this stack)
    length = headers.get("content-length")
    if length is None:
        raise ResponseError("response without Content-Length or chunked encoding")
    await reader.readexactly(int(length))


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> int:
    """One keep-alive GET on an open connection; the status, the connection left reusable."""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: lbstack-bench\r\n\r\n".encode()
    )
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ResponseError(f"bad status line {status_line!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    await _read_body(reader, headers)
    if headers.get("connection", "").lower() == "close":
        raise ResponseError("the server closed the keep-alive connection")
    return int(parts[1])


async def get_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> None:
    """``exchange``, with any status but 200 raised as a ``ResponseError``."""
    status = await exchange(reader, writer, path)
    if status != 200:
        raise ResponseError(f"status {status}")


# What one connection's failure may raise: refused/reset, timeout, cut short, garbled.
FAILURES = (
    OSError,
    TimeoutError,
    asyncio.IncompleteReadError,
    asyncio.LimitOverrunError,
    ValueError,
    ResponseError,
)


@dataclass
class KeepAliveClients:
    """Keep-alive client connections to ``host:port``, opened, reused and closed in bulk."""

    host: str
    port: int
    concurrency: int = 100
    timeout: float = 10.0
    errors: Counter[str] = field(default_factory=Counter)
    _held: list[_Connection] = field(default_factory=list)

    @property
    def held(self) -> int:
        """Connections open now, each having answered every request sent on it."""
        return len(self._held)

    def _failed(self, exc: BaseException) -> None:
        self.errors[str(exc) if isinstance(exc, ResponseError) else type(exc).__name__] += 1

    async def _open_one(self, index: int, gate: asyncio.Semaphore) -> bool:
        async with gate:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self.timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
                    await get_ok(reader, writer, f"/hold?c={index}&n=1")
            except FAILURES as exc:
                self._failed(exc)
                _abort(writer)
                return False
            self._held.append(_Connection(reader, writer, 1))
            return True

    async def open(self, count: int) -> Phase:
        """Open ``count`` more connections, one GET on each; the failed ones are closed."""
        gate = asyncio.Semaphore(self.concurrency)
        began = time.monotonic()
        done = await asyncio.gather(*(self._open_one(n, gate) for n in range(count)))
        ok = sum(done)
        return Phase(ok, count - ok, time.monotonic() - began)

    async def _again_one(self, connection: _Connection, gate: asyncio.Semaphore) -> bool:
        async with gate:
            connection.requests += 1
            path = f"/hold?n={connection.requests}"
            try:
                async with asyncio.timeout(self.timeout):
                    await get_ok(connection.reader, connection.writer, path)
            except FAILURES as exc:
                self._failed(exc)
                _abort(connection.writer)
                return False
            return True

    async def request_again(self) -> Phase:
        """One more GET on every held connection; the ones that fail are dropped."""
        gate = asyncio.Semaphore(self.concurrency)
        began = time.monotonic()
        connections = list(self._held)
        done = await asyncio.gather(*(self._again_one(c, gate) for c in connections))
        self._held = [c for c, ok in zip(connections, done, strict=True) if ok]
        ok = sum(done)
        return Phase(ok, len(connections) - ok, time.monotonic() - began)

    async def close(self, timeout: float = 10.0) -> None:
        """Close every held connection (waiting at most ``timeout`` s for the closes)."""
        held, self._held = self._held, []
        for connection in held:
            connection.writer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(
                    *(c.writer.wait_closed() for c in held), return_exceptions=True
                )
        for connection in held:
            _abort(connection.writer)


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Drop a connection at once (no-op on one already closed)."""
    if writer is not None and not writer.transport.is_closing():
        writer.transport.abort()
