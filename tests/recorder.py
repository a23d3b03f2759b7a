"""A server that records exactly what reached it, for tests of the data plane.

Run as ``python tests/recorder.py SOCKET LOG`` (a ``server.kind = "command"`` server:
``command = "python tests/recorder.py {socket} /dir/{name}.log"``). It serves HTTP/1.1
on the unix socket ``SOCKET`` with a raw asyncio server, so it sees the bytes as they
were sent, not as a parser rebuilt them, and appends one JSON line to ``LOG`` per event:

* ``{"event": "head", "id": ..., "head": ...}`` as soon as a request's head (request
  line and header lines, up to and including the empty line) has arrived;
* ``{"event": "body", "id": ..., "body": ..., "complete": true|false}`` once its body
  has been read (``complete``) or the connection ended in the middle of it (not);
* ``{"event": "garbage", "id": ..., "head": ...}`` for bytes that are no request head
  (it answers 400 and closes).

Bytes are stored as latin-1 text, so every byte value survives. ``body`` is the decoded
body (chunked framing removed). Every request is answered ``200`` with its target as the
body, so a client can tell pipelined answers apart; the health path ``/healthz`` is
answered but not recorded. Keep-alive, ``Content-Length`` and chunked bodies work as
HTTP/1.1 says; the events are written before the answer, so a client that has the
answer can read the log.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from typing import Any

HEALTH = b"/healthz"
MAX_HEAD = 1 << 20


class _Garbage(Exception):
    """What arrived is not a request this server can frame."""


class Recorder:
    def __init__(self, log_path: str) -> None:
        self._log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._connections = itertools.count(1)

    def record(self, event: str, request_id: str, **fields: Any) -> None:
        line = {"event": event, "id": request_id}
        line.update(fields)
        os.write(self._log, (json.dumps(line) + "\n").encode())

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = f"{os.getpid()}:{next(self._connections)}"
        try:
            for number in itertools.count(1):
                if not await self._one(reader, writer, f"{connection}:{number}"):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request_id: str
    ) -> bool:
        """Read, record and answer one request; whether the connection stays open."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.record("garbage", request_id, head=exc.partial.decode("latin-1"))
            return False
        try:
            target, headers = _parse_head(head)
        except _Garbage:
            self.record("garbage", request_id, head=head.decode("latin-1"))
            writer.write(_answer(400, b"bad request\n", close=True))
            await writer.drain()
            return False
        recorded = not (target == HEALTH or target.startswith(HEALTH + b"?"))
        if recorded:
            self.record("head", request_id, head=head.decode("latin-1"))
        body = bytearray()
        try:
            await _read_body(reader, headers, body)
        except (asyncio.IncompleteReadError, ConnectionError, _Garbage):
            if recorded:
                self.record("body", request_id, body=body.decode("latin-1"), complete=False)
            return False
        if recorded:
            self.record("body", request_id, body=bytes(body).decode("latin-1"), complete=True)
        close = b"close" in {t.strip() for t in headers.get(b"connection", b"").split(b",")}
        writer.write(_answer(200, target, close=close))
        await writer.drain()
        return not close


def _parse_head(head: bytes) -> tuple[bytes, dict[bytes, bytes]]:
    """The request target and the headers (lower-case names; repeated ones joined)."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise _Garbage
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _Garbage
        key = name.lower()
        value = value.strip(b" \t")
        headers[key] = headers[key] + b", " + value if key in headers else value
    return parts[1], headers


async def _read_body(
    reader: asyncio.StreamReader, headers: dict[bytes, bytes], body: bytearray
) -> None:
    """Read the body ``headers`` frame into ``body`` (what arrived, even if it fails)."""
    coding = headers.get(b"transfer-encoding")
    if coding is not None:
        if coding.split(b",")[-1].strip().lower() != b"chunked":
            raise _Garbage
        while True:
            line = await reader.readuntil(b"\r\n")
            size = _number(line.split(b";")[0], 16)
            if size == 0:
                break
            while size:
                chunk = await reader.read(size)
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(body), None)
                body += chunk
                size -= len(chunk)
            if await reader.readexactly(2) != b"\r\n":
                raise _Garbage
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
            pass
        return
    length = _number(headers.get(b"content-length", b"0"), 10)
    while length:
        chunk = await reader.read(min(length, 65536))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(body), None)
        body += chunk
        length -= len(chunk)


def _number(text: bytes, base: int) -> int:
    try:
        return int(text.strip(), base)
    except ValueError:
        raise _Garbage from None


def _answer(status: int, body: bytes, *, close: bool) -> bytes:
    reason = b"OK" if status == 200 else b"Bad Request"
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: text/plain\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


async def main(socket_path: str, log_path: str) -> None:
    recorder = Recorder(log_path)
    server = await asyncio.start_unix_server(recorder.serve, path=socket_path, limit=MAX_HEAD)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
