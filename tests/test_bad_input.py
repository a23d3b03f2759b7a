"""Bad input, sent the way an attacker sends it, to a real stack.

One stack for the whole module: a balancer, one proxy, one server, the server being
``tests/recorder.py``, which logs the raw bytes of every request that reaches it. Each
case writes raw bytes to the balancer's socket and checks (a) the status line of the
answer, (b) whether the connection was closed after it (read to EOF, with a deadline),
(c) what reached the server: a rejected request not at all, a request whose body turns
out bad never with a complete body, a smuggled second request never, an accepted one
once and byte for byte; and (d) that the stack still answers a plain GET.

Expectations are RFC 9110/9112's, decided where the RFC leaves a choice:

* Every error answer from the stack's own parser closes the connection (nginx and
  HAProxy do too): after bad framing nothing that follows can be trusted.
* A bare LF as a line ending is rejected, though RFC 9112 2.2 says a recipient MAY
  accept it: a proxy lenient where the next hop is strict is a smuggling vector.
* NUL, a bare CR or an obs-fold in a field is rejected (400), the first of the two
  choices RFC 9110 5.5 and RFC 9112 5.2 give (the other: replace them with SP).
* ``HTTP/1.2``: RFC 9112 2.3 says a higher minor version is processed as the highest
  one implemented, so it is forwarded as HTTP/1.1. A major version other than 1 is 505.
* ``Transfer-Encoding:<TAB>chunked`` is valid (TAB is OWS) and must be forwarded; the
  obfuscated variants are a vertical tab, an obs-fold, a space before the colon, a
  whitespace-led line.
* An unknown coding before chunked (``foo, chunked``) may get 501 (RFC 9112 6.1 SHOULD;
  nginx answers 501) or 400; an unknown coding last (``xchunked``, ``chunked,
  identity``) leaves the body length unknown: 400 and close (RFC 9112 6.3, a MUST).
* Absolute form: the target's authority is the Host (RFC 9112 3.2.2, MUST ignore the
  received Host); the request goes upstream in origin form.
* Host must be a valid ``uri-host [":" port]`` (RFC 9112 3.2: 400 for an invalid one).
* A 413 closes the connection at once (within ``EOF_TIMEOUT``) even when the client
  announced, or is still sending, more body: no draining it for seconds first.
* A body whose framing turns bad after the stack started forwarding it is a 400 (not
  a 408 once the idle timeout strikes), and the server's request is cut.
* A request within the balancer's limits is not refused further in for what the stack
  itself adds: ``headers-127`` (128 fields, exactly ``max_headers``) must get through
  the proxy too, though the balancer adds four fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_asyncio

from lbstack.testing import RunningStack, running_stack
from tests.harness import short_tmpdir, until

pytestmark = pytest.mark.asyncio(loop_scope="module")

RECORDER = Path(__file__).resolve().parent / "recorder.py"
MAX_BODY = 65536
KEEPALIVE = 2.5  # the balancer's client_keepalive: also its bound on the request head
IDLE = 1.0  # every tier's idle timeout: the longest pause within a body
ANSWER_TIMEOUT = 5.0  # the stack's answer to a request, once it has all of it
EOF_TIMEOUT = 1.0  # a connection that is to be closed is closed within this
SLACK = 1.5  # what a timeout may overrun on a busy machine
REACH_TIMEOUT = 5.0  # a request cut mid-body ends at the server within this
ARRIVAL_TIMEOUT = 1.0  # a streaming stack forwards a head within this

CONFIG = f"""
proxies = 1
servers_per_proxy = 1
[balancer.timeouts]
client_keepalive = {KEEPALIVE}
idle = {IDLE}
[balancer.limits]
max_body_size = {MAX_BODY}
[proxy.timeouts]
idle = {IDLE}
[proxy.limits]
max_body_size = {MAX_BODY}
[server]
kind = "command"
"""

# Markers checked once more at the end of the module, in case something got there late.
NEVER: list[bytes] = []  # must never reach a server at all
NEVER_COMPLETE: list[bytes] = []  # may reach it, but never with a complete body


# -- the stack and what reached its server -----------------------------------------------


@dataclass
class Bed:
    stack: RunningStack
    logs: Path

    @property
    def socket(self) -> str:
        return self.stack.socket

    def records(self) -> list[dict[str, Any]]:
        """Every event the recorder logged (complete lines only)."""
        events = []
        for path in sorted(self.logs.glob("*.log")):
            for line in path.read_text().split("\n")[:-1]:
                events.append(json.loads(line))
        return events

    def heads(self, marker: bytes) -> list[dict[str, Any]]:
        """The events (heads and garbage) whose bytes carry ``marker``."""
        return [
            e
            for e in self.records()
            if e["event"] in ("head", "garbage") and marker in e["head"].encode("latin-1")
        ]

    def bodies(self, head: dict[str, Any]) -> list[dict[str, Any]]:
        return [e for e in self.records() if e["event"] == "body" and e["id"] == head["id"]]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bed() -> AsyncIterator[Bed]:
    logs = short_tmpdir()
    command = f"{sys.executable} {RECORDER} {{socket}} {logs}/{{name}}.log"
    try:
        async with running_stack(config=CONFIG + f"command = {json.dumps(command)}\n") as stack:
            yield Bed(stack, logs)
    finally:
        shutil.rmtree(logs, ignore_errors=True)


# -- a raw client -------------------------------------------------------------------------


@dataclass
class Answer:
    """One response as it came (``status`` None: none came; ``why`` says what did)."""

    status: int | None
    head: bytes = b""
    body: bytes = b""
    why: str = ""

    def __str__(self) -> str:
        return f"{self.status}" if self.status is not None else f"no answer ({self.why})"


class Conn:
    """A raw connection to the balancer's socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: str) -> Conn:
        reader, writer = await asyncio.open_unix_connection(path, limit=1 << 20)
        return cls(reader, writer)

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False if the stack closed the connection (or stopped reading)."""
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), ANSWER_TIMEOUT)
        except (ConnectionError, TimeoutError):
            return False
        return True

    async def answer(self, timeout: float = ANSWER_TIMEOUT) -> Answer:
        """Read one response (skipping 1xx), within ``timeout``."""
        try:
            return await asyncio.wait_for(self._answer(), timeout)
        except TimeoutError:
            return Answer(None, why=f"nothing within {timeout:g}s")
        except asyncio.IncompleteReadError as exc:
            return Answer(None, why=f"closed after {exc.partial[:60]!r}")
        except ConnectionError as exc:
            return Answer(None, why=repr(exc))

    async def _answer(self) -> Answer:
        while True:
            head = await self.reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split(b" ", 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                return Answer(None, head, why=f"not a status line: {head[:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200 and status != 101:
                continue
            break
        headers = {}
        for line in head[:-4].split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if b"chunked" in headers.get(b"transfer-encoding", b""):
            body = bytearray()
            while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                body += await self.reader.readexactly(size + 2)
                del body[-2:]
            while await self.reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return Answer(status, head, bytes(body))
        length = int(headers.get(b"content-length", b"0"))
        return Answer(status, head, await self.reader.readexactly(length))

    async def ending(self, timeout: float = EOF_TIMEOUT) -> tuple[bool, bytes]:
        """Read to EOF within ``timeout``: whether it came, and any bytes before it."""
        extra = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while chunk := await asyncio.wait_for(
                self.reader.read(65536), max(0.0, deadline - loop.time())
            ):
                extra += chunk
        except TimeoutError:
            return False, bytes(extra)
        except ConnectionError:
            pass
        return True, bytes(extra)

    def close(self) -> None:
        self.writer.close()


def marker(case_id: str) -> bytes:
    """The target each case's request carries: what to look for at the server."""
    return f"/c/{case_id}/x".encode()


def smuggled(case_id: str) -> bytes:
    return f"/smuggled/{case_id}/x".encode()


def fill(template: bytes, case_id: str) -> bytes:
    return template.replace(b"@M@", marker(case_id)).replace(b"@S@", smuggled(case_id))


async def serves(bed: Bed, what: str) -> list[str]:
    """A plain GET still gets its 200 (on a new connection)."""
    conn = await Conn.open(bed.socket)
    try:
        await conn.send(f"GET /alive/{what} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        answer = await conn.answer()
    finally:
        conn.close()
    return [] if answer.status == 200 else [f"then a plain GET got {answer}"]


async def arrival(bed: Bed, case_id: str) -> None:
    """Wait (a bounded while) for the head of ``case_id`` to reach the server: a stack
    that streams sends it on before the body is in; one that buffers never does."""

    async def arrived() -> bool:
        return bool(bed.heads(marker(case_id)))

    with contextlib.suppress(AssertionError):
        await until(arrived, "the head to reach the server", ARRIVAL_TIMEOUT)


async def reached(bed: Bed, case_id: str, reach: Reach) -> list[str]:
    """What is wrong with what reached the server for ``case_id``."""
    problems = []
    mark = marker(case_id)
    heads = bed.heads(mark)
    if bed.heads(smuggled(case_id)):
        problems.append("the smuggled request reached the server")
    if reach == "never":
        if heads:
            problems.append(f"reached the server: {heads[0]['head'][:200]!r}")
        return problems
    if reach == "incomplete":
        # Whatever part got there, the server's request must end, and not complete.
        for head in heads:

            async def ended(head: dict[str, Any] = head) -> bool:
                return bool(bed.bodies(head))

            try:
                await until(ended, "the server's request to end", REACH_TIMEOUT)
            except AssertionError:
                problems.append(f"the server still waits for the rest of {head['id']}")
            if any(b["complete"] for b in bed.bodies(head)):
                problems.append("the server got a complete request body")
        return problems
    if len(heads) != 1:
        problems.append(f"reached the server {len(heads)} times")
    return problems


Reach = Literal["never", "incomplete", "forwarded"]


@dataclass(frozen=True)
class Case:
    """A request and what must come of it.

    ``reach``: never (no byte of it at the server), incomplete (the head may get there
    — the stack streams — but never a complete body), forwarded (once, complete).
    ``head_has`` / ``head_lacks``: bytes the server's view of the head must (not)
    contain; ``request_line``: how it must start; ``body``: the body it must get.
    ``then``: bytes sent once the head has reached the server (or after
    ``ARRIVAL_TIMEOUT`` if it never does): bad body framing that arrives after the
    stack has started forwarding, the path a streaming data plane takes.
    """

    id: str
    payload: bytes
    status: frozenset[int]
    close: bool = True
    reach: Reach = "never"
    head_has: tuple[bytes, ...] = ()
    head_lacks: tuple[bytes, ...] = ()
    request_line: bytes | None = None
    body: bytes | None = None
    then: bytes = b""
    why: str = field(default="", compare=False)


def case(
    case_id: str,
    payload: bytes,
    status: int | tuple[int, ...] = 400,
    **expected: Any,
) -> Any:
    statuses = frozenset((status,) if isinstance(status, int) else status)
    if status == 200:
        expected.setdefault("close", False)
        expected.setdefault("reach", "forwarded")
    return pytest.param(Case(case_id, payload, statuses, **expected), id=case_id)


async def check(bed: Bed, c: Case) -> None:
    payload = fill(c.payload, c.id)
    if c.reach == "never":
        NEVER.append(marker(c.id))
    elif c.reach == "incomplete":
        NEVER_COMPLETE.append(marker(c.id))
    NEVER.append(smuggled(c.id))
    conn = await Conn.open(bed.socket)
    problems = []
    try:
        await conn.send(payload)
        if c.then:
            await arrival(bed, c.id)
            await conn.send(fill(c.then, c.id))
        answer = await conn.answer()
        if answer.status not in c.status:
            problems.append(f"answered {answer}, expected {'/'.join(map(str, sorted(c.status)))}")
        if c.close:
            closed, extra = await conn.ending()
            if not closed:
                problems.append(f"connection still open {EOF_TIMEOUT:g}s after the answer")
            if extra:
                problems.append(f"more after the answer: {extra[:120]!r}")
        elif answer.status is not None:
            # Kept alive: the same connection takes the next request.
            await conn.send(f"GET /c/{c.id}/again HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            again = await conn.answer()
            if again.status != 200:
                problems.append(f"the next request on the connection got {again}")
    finally:
        conn.close()
    problems += await reached(bed, c.id, c.reach)
    if c.reach == "forwarded":
        problems += forwarded_as_expected(bed, c)
    problems += await serves(bed, c.id)
    assert not problems, f"{c.id}: " + "; ".join(problems)


def forwarded_as_expected(bed: Bed, c: Case) -> list[str]:
    problems = []
    for head in bed.heads(marker(c.id)):
        raw = head["head"].encode("latin-1")
        if c.request_line is not None and not raw.startswith(fill(c.request_line, c.id)):
            line = raw.split(b"\r\n")[0]
            problems.append(f"the server got the request line {line!r}")
        for wanted in c.head_has:
            if fill(wanted, c.id) not in raw:
                problems.append(f"the server's head lacks {fill(wanted, c.id)!r}: {raw!r}")
        for unwanted in c.head_lacks:
            if unwanted.lower() in raw.lower():
                problems.append(f"the server's head has {unwanted!r}: {raw!r}")
        bodies = bed.bodies(head)
        if not bodies or not bodies[0]["complete"]:
            problems.append("the server did not get the complete body")
        elif c.body is not None and bodies[0]["body"].encode("latin-1") != c.body:
            problems.append(f"the server got the body {bodies[0]['body'][:60]!r}")
    return problems


def post(te: bytes, body: bytes = b"5\r\nhello\r\n0\r\n\r\n", cl: bytes = b"") -> bytes:
    """A POST with the given Transfer-Encoding (and Content-Length) header lines."""
    return b"POST @M@ HTTP/1.1\r\nHost: t\r\n" + te + cl + b"\r\n" + body


def chunked(body: bytes) -> bytes:
    """A chunked POST whose body is ``body``, verbatim."""
    return b"POST @M@ HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + body


def smuggle_te_cl() -> bytes:
    """TE.CL: a front end on Content-Length: 4 would leave the rest as a request."""
    inner = b"GET /smuggled/smuggle-te-cl/x HTTP/1.1\r\nHost: t\r\n\r\n"
    return (
        b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n"
    )


def smuggle_cl_te(case_id: str, te: bytes) -> bytes:
    """CL.TE: a Content-Length covering a last chunk and a second request, which a back
    end going by Transfer-Encoding would take as a request of its own."""
    tail = fill(b"0\r\n\r\nGET @S@ HTTP/1.1\r\nHost: t\r\n\r\n", case_id)
    head = b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n" % len(tail)
    return fill(head + te + b"\r\n" + tail, case_id)


# -- 1. framing ---------------------------------------------------------------------------

FRAMING = [
    case("cl-and-te", post(b"Transfer-Encoding: chunked\r\n", cl=b"Content-Length: 5\r\n")),
    case("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n")),
    case("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n")),
    case("te-chunked-identity", post(b"Transfer-Encoding: chunked, identity\r\n")),
    case("te-two-lines", post(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n")),
    case("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n")),
    case("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n")),
    case(
        "te-whitespace-led-line",
        b"POST @M@ HTTP/1.1\r\n Transfer-Encoding: chunked\r\nHost: t\r\n\r\n0\r\n\r\n",
    ),
    case(
        "te-in-http10",
        b"POST @M@ HTTP/1.0\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
    ),
    case(
        "te-unknown-coding-then-chunked",
        post(b"Transfer-Encoding: foo, chunked\r\n"),
        (400, 501),
        why="RFC 9112 6.1: 501 for a coding not understood (nginx's answer)",
    ),
    case(
        "te-tab-is-ows-and-valid",
        post(b"Transfer-Encoding:\tchunked\r\n"),
        200,
        body=b"hello",
    ),
    case(
        "cl-two-values",
        b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    case("cl-list-of-two", b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: 5, 6\r\n\r\nhello!"),
    case("cl-plus", b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: +5\r\n\r\nhello"),
    case("cl-minus", b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: -1\r\n\r\nhello"),
    case("cl-hex", b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: 0x5\r\n\r\nhello"),
    case("chunk-size-not-hex", chunked(b"zz\r\nhello\r\n0\r\n\r\n"), reach="incomplete"),
    case(
        "chunk-size-overflow",
        chunked(b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        reach="incomplete",
    ),
    case("chunk-data-without-crlf", chunked(b"5\r\nhelloXX0\r\n\r\n"), reach="incomplete"),
    case("chunk-ext-ctl-char", chunked(b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), reach="incomplete"),
    case("chunk-size-bare-lf", chunked(b"5\nhello\r\n0\r\n\r\n"), reach="incomplete"),
    case("chunk-data-bare-lf", chunked(b"5\r\nhello\n0\r\n\r\n"), reach="incomplete"),
    case("chunk-all-bare-lf", chunked(b"5\nhello\n0\n\n"), reach="incomplete"),
    # The same, once the stack has started forwarding the body.
    case(
        "chunk-size-not-hex-streamed",
        chunked(b"5\r\nhello\r\n"),
        then=b"zz\r\nhello\r\n0\r\n\r\n",
        reach="incomplete",
    ),
    case(
        "chunk-size-overflow-streamed",
        chunked(b"5\r\nhello\r\n"),
        then=b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        reach="incomplete",
    ),
    case(
        "chunk-data-without-crlf-streamed",
        chunked(b"5\r\nhello"),
        then=b"XX0\r\n\r\n",
        reach="incomplete",
    ),
    case(
        "chunk-bare-lf-streamed",
        chunked(b"5\r\nhello\r\n"),
        then=b"5\nhello\r\n0\r\n\r\n",
        reach="incomplete",
    ),
    case("bare-lf-request-line", b"GET @M@ HTTP/1.1\nHost: t\r\n\r\n"),
    case("bare-lf-header", b"GET @M@ HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n"),
    case("bare-lf-everywhere", b"GET @M@ HTTP/1.1\nHost: t\nX-A: b\n\n"),
    case("bare-lf-end-of-head", b"GET @M@ HTTP/1.1\r\nHost: t\r\n\n"),
    case("smuggle-cl-te", smuggle_cl_te("smuggle-cl-te", b"Transfer-Encoding: chunked\r\n")),
    case("smuggle-te-cl", smuggle_te_cl()),
    case(
        "smuggle-te-space-before-colon",
        smuggle_cl_te("smuggle-te-space-before-colon", b"Transfer-Encoding : chunked\r\n"),
    ),
    case(
        "smuggle-te-te",
        smuggle_cl_te("smuggle-te-te", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n"),
    ),
    case(
        "smuggle-te-http10",
        smuggle_cl_te("smuggle-te-http10", b"Transfer-Encoding: chunked\r\n").replace(
            b" HTTP/1.1\r\nHost: t\r\nContent-Length", b" HTTP/1.0\r\nHost: t\r\nContent-Length"
        ),
    ),
]


@pytest.mark.parametrize("c", FRAMING)
async def test_framing(bed: Bed, c: Case) -> None:
    await check(bed, c)


# -- 2. request line ----------------------------------------------------------------------

LONG = b"a" * 9000

REQUEST_LINE = [
    case("http-2.0", b"GET @M@ HTTP/2.0\r\nHost: t\r\n\r\n", 505),
    case("http-3.0", b"GET @M@ HTTP/3.0\r\nHost: t\r\n\r\n", 505),
    case(
        "http-1.2",
        b"GET @M@ HTTP/1.2\r\nHost: t\r\n\r\n",
        505,
        why="RFC 9112 2.3 lets a recipient process 1.2 as 1.1; aiohttp's strict parser "
        "refuses it, and a well-formed version we don't speak is 505",
    ),
    case("http-0.9", b"GET @M@\r\n\r\n"),
    case("http-version-garbage", b"GET @M@ HTTP/1.x\r\nHost: t\r\n\r\n"),
    case("request-line-too-long", b"GET @M@?" + LONG + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    case("method-bad-char", b"G(T @M@ HTTP/1.1\r\nHost: t\r\n\r\n"),
    case("method-with-space", b"GE T @M@ HTTP/1.1\r\nHost: t\r\n\r\n"),
    case("method-nul", b"GE\x00T @M@ HTTP/1.1\r\nHost: t\r\n\r\n"),
    case("target-with-space", b"GET @M@ x HTTP/1.1\r\nHost: t\r\n\r\n"),
    case("authority-form-get", b"GET t:80 HTTP/1.1\r\nHost: t:80\r\nX-Case: @M@\r\n\r\n"),
    case("asterisk-form-get", b"GET * HTTP/1.1\r\nHost: t\r\nX-Case: @M@\r\n\r\n"),
    case(
        "connect",
        b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\nX-Case: @M@\r\n\r\n",
        (400, 405, 501),
    ),
    case(
        "absolute-form",
        b"GET http://t@M@?q=1 HTTP/1.1\r\nHost: t\r\n\r\n",
        200,
        request_line=b"GET @M@?q=1 HTTP/1.1\r\n",
        head_has=(b"\r\nHost: t\r\n",),
    ),
    case(
        "absolute-form-host-from-target",
        b"GET http://a.example@M@ HTTP/1.1\r\nHost: b.example\r\n\r\n",
        200,
        request_line=b"GET @M@ HTTP/1.1\r\n",
        head_has=(b"\r\nHost: a.example\r\n",),
        head_lacks=(b"b.example",),
        why="RFC 9112 3.2.2: the target's authority wins over Host",
    ),
]


@pytest.mark.parametrize("c", REQUEST_LINE)
async def test_request_line(bed: Bed, c: Case) -> None:
    await check(bed, c)


# -- 3. header bytes ----------------------------------------------------------------------

HEADER_BYTES = [
    case(
        "value-obs-text",
        b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-Role: adm\xffin\r\n\r\n",
        200,
        head_has=(b"\r\nX-Role: adm\xffin\r\n",),
    ),
    case(
        "value-utf8",
        b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-Name: J\xc3\xbcrgen \xe2\x82\xac\r\n\r\n",
        200,
        head_has=(b"\r\nX-Name: J\xc3\xbcrgen \xe2\x82\xac\r\n",),
    ),
    case("value-nul", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A: a\x00b\r\n\r\n"),
    case("value-bare-cr", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A: a\rb\r\n\r\n"),
    case(
        "value-bare-cr-smuggle", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A: a\rGET @S@ HTTP/1.1\r\n\r\n"
    ),
    case("obs-fold", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n"),
    case("space-before-colon", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A : b\r\n\r\n"),
    case("name-paren", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX(A): b\r\n\r\n"),
    case("name-with-space", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX A: b\r\n\r\n"),
    case("name-empty", b"GET @M@ HTTP/1.1\r\nHost: t\r\n: b\r\n\r\n"),
    case("name-high-byte", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-\xffA: b\r\n\r\n"),
    case("line-without-colon", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-A b\r\n\r\n"),
]


@pytest.mark.parametrize("c", HEADER_BYTES)
async def test_header_bytes(bed: Bed, c: Case) -> None:
    await check(bed, c)


# -- 4. Host ------------------------------------------------------------------------------

HOST = [
    case("host-missing", b"GET @M@ HTTP/1.1\r\nX-A: b\r\n\r\n"),
    case("host-twice", b"GET @M@ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    case("host-twice-same", b"GET @M@ HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
    case("host-space-slash", b"GET @M@ HTTP/1.1\r\nHost: a b/c\r\n\r\n"),
    case("host-userinfo", b"GET @M@ HTTP/1.1\r\nHost: x@y\r\n\r\n"),
    case("host-open-bracket", b"GET @M@ HTTP/1.1\r\nHost: [::1\r\n\r\n"),
    case("host-slash", b"GET @M@ HTTP/1.1\r\nHost: a/b\r\n\r\n"),
    case("host-bad-port", b"GET @M@ HTTP/1.1\r\nHost: a:b\r\n\r\n"),
    case(
        "host-with-port",
        b"GET @M@ HTTP/1.1\r\nHost: example.com:8080\r\n\r\n",
        200,
        head_has=(b"\r\nHost: example.com:8080\r\n",),
    ),
    case(
        "host-ipv6",
        b"GET @M@ HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
        200,
        head_has=(b"\r\nHost: [::1]:8080\r\n",),
    ),
    case(
        "host-missing-http10-is-fine",
        b"GET @M@ HTTP/1.0\r\n\r\n",
        200,
        close=True,  # HTTP/1.0 without keep-alive
        reach="forwarded",
    ),
]


@pytest.mark.parametrize("c", HOST)
async def test_host(bed: Bed, c: Case) -> None:
    await check(bed, c)


# -- 5. limits ----------------------------------------------------------------------------


def many_headers(count: int) -> bytes:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    return b"GET @M@ HTTP/1.1\r\nHost: t\r\n" + lines + b"\r\n"


def sized(length: int, announced: int | None = None) -> bytes:
    announced = length if announced is None else announced
    return b"POST @M@ HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % announced + (
        b"b" * length
    )


def chunk_data(count: int, size: int = 16384) -> bytes:
    """``count`` chunks of ``size`` bytes each (no last chunk)."""
    return b"".join(b"%x\r\n" % size + b"c" * size + b"\r\n" for _ in range(count))


def chunks(count: int) -> bytes:
    """A chunked POST with ``count`` chunks of 16 KiB (and no last chunk)."""
    return chunked(chunk_data(count))


LIMITS = [
    case("headers-127", many_headers(127), 200),
    case("headers-140", many_headers(140), 431),
    case("header-9000-bytes", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX-Big: " + LONG + b"\r\n\r\n", 431),
    case(
        "header-name-9000-bytes", b"GET @M@ HTTP/1.1\r\nHost: t\r\nX" + LONG + b": v\r\n\r\n", 431
    ),
    case("body-at-limit", sized(MAX_BODY), 200, body=b"b" * MAX_BODY),
    case("body-over-limit-announced", sized(MAX_BODY + 1), 413),
    case("body-huge-announced", sized(0, 1 << 40), 413),
    case("body-at-limit-chunked", chunks(4) + b"0\r\n\r\n", 200, body=b"c" * MAX_BODY),
    case("body-over-limit-chunked", chunks(6) + b"0\r\n\r\n", 413, reach="incomplete"),
    # Over the limit with more to come, sent once the stack forwards; the client stops
    # there (no last chunk): 413, and the connection closed, not drained.
    case(
        "body-over-limit-chunked-streamed",
        chunks(1),
        413,
        then=chunk_data(5),
        reach="incomplete",
    ),
]


@pytest.mark.parametrize("c", LIMITS)
async def test_limits(bed: Bed, c: Case) -> None:
    await check(bed, c)


# -- 6. slowloris ---------------------------------------------------------------------------


@pytest.mark.parametrize("trickle", [True, False], ids=["byte-by-byte", "stalled"])
async def test_a_head_never_finished_is_cut_within_the_header_timeout(
    bed: Bed, trickle: bool
) -> None:
    """A head sent a byte every 0.1 s (or half sent, then nothing) and never finished:
    the connection is closed (408 or just closed) within the header timeout, which today
    is ``client_keepalive``. The pause between bytes is a read that times out."""
    case_id = f"slow-head-{'trickle' if trickle else 'stall'}"
    NEVER.append(marker(case_id))
    head = fill(b"GET @M@ HTTP/1.1\r\nHost: t\r\n", case_id)
    data = head + b"X-Pad: " + b"p" * 10_000 if trickle else b""  # never an empty line
    loop = asyncio.get_running_loop()
    conn = await Conn.open(bed.socket)
    started = loop.time()
    deadline = started + KEEPALIVE + SLACK
    answer = b""
    closed = False
    try:
        if not trickle:
            await conn.send(head[: len(head) // 2])
        for byte in data:
            if not await conn.send(bytes([byte])):
                closed = True
                break
            try:
                chunk = await asyncio.wait_for(conn.reader.read(65536), 0.1)
            except TimeoutError:
                if loop.time() > deadline:
                    break
                continue
            except ConnectionError:
                closed = True
                break
            closed = not chunk
            answer += chunk
            break
        if not closed:
            closed, more = await conn.ending(max(0.0, deadline - loop.time()))
            answer += more
        elapsed = loop.time() - started
    finally:
        conn.close()
    problems = []
    if not closed:
        problems.append(f"connection still open after {elapsed:.1f}s (header timeout {KEEPALIVE}s)")
    if answer and not answer.startswith(b"HTTP/1.1 408 "):
        problems.append(f"answered {answer[:40]!r} instead of 408 or a close")
    problems += await reached(bed, case_id, "never")
    problems += await serves(bed, case_id)
    assert not problems, f"{case_id}: " + "; ".join(problems)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_stops_midway_gets_408_within_idle(bed: Bed, framing: str) -> None:
    case_id = f"stalled-body-{framing}"
    NEVER_COMPLETE.append(marker(case_id))
    if framing == "chunked":
        payload = fill(chunked(b"a\r\n0123456789\r\n5\r\n01"), case_id)
    else:
        payload = fill(sized(50, 100), case_id)
    loop = asyncio.get_running_loop()
    conn = await Conn.open(bed.socket)
    try:
        await conn.send(payload)
        started = loop.time()
        answer = await conn.answer(IDLE + SLACK + SLACK)
        elapsed = loop.time() - started
        closed, extra = await conn.ending()
    finally:
        conn.close()
    problems = []
    if answer.status != 408:
        problems.append(f"answered {answer} after {elapsed:.1f}s, expected 408")
    elif elapsed > IDLE + SLACK:
        problems.append(f"408 only after {elapsed:.1f}s (idle {IDLE}s)")
    if not closed or extra:
        problems.append(f"connection not closed after it (closed={closed}, extra={extra[:60]!r})")
    problems += await reached(bed, case_id, "incomplete")
    problems += await serves(bed, case_id)
    assert not problems, f"{case_id}: " + "; ".join(problems)


# -- 7. client gone mid-body ----------------------------------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_client_gone_mid_body_leaves_no_complete_request(bed: Bed, framing: str) -> None:
    case_id = f"gone-mid-body-{framing}"
    NEVER_COMPLETE.append(marker(case_id))
    if framing == "chunked":
        payload = fill(chunked(b"400\r\n" + b"g" * 1024 + b"\r\n200\r\n" + b"g" * 100), case_id)
    else:
        payload = fill(sized(500, 1000), case_id)
    conn = await Conn.open(bed.socket)
    await conn.send(payload)
    # Gone once the request is on its way to the server (if the stack streams): the
    # server's request must end, and incomplete.
    await arrival(bed, case_id)
    conn.close()
    await conn.writer.wait_closed()
    problems = await reached(bed, case_id, "incomplete")
    problems += await serves(bed, case_id)
    assert not problems, f"{case_id}: " + "; ".join(problems)


# -- 8. pipelining --------------------------------------------------------------------------

H2C = (
    b"GET /c/pipe-after-h2c/x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
)


@pytest.mark.parametrize(
    ("case_id", "payload", "targets"),
    [
        pytest.param(
            "pipe-two-gets",
            b"GET /c/pipe-two-gets/x HTTP/1.1\r\nHost: t\r\n\r\n"
            b"GET /c/pipe-two-gets/y HTTP/1.1\r\nHost: t\r\n\r\n",
            [b"/c/pipe-two-gets/x", b"/c/pipe-two-gets/y"],
            id="two-gets",
        ),
        pytest.param(
            "pipe-post-then-get",
            b"POST /c/pipe-post-then-get/x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\n"
            b"helloGET /c/pipe-post-then-get/y HTTP/1.1\r\nHost: t\r\n\r\n",
            [b"/c/pipe-post-then-get/x", b"/c/pipe-post-then-get/y"],
            id="post-then-get",
        ),
        pytest.param(
            "pipe-after-h2c",
            H2C + b"GET /c/pipe-after-h2c/y HTTP/1.1\r\nHost: t\r\n\r\n",
            [b"/c/pipe-after-h2c/x", b"/c/pipe-after-h2c/y"],
            id="after-upgrade-h2c",
        ),
    ],
)
async def test_pipelined_requests_are_answered_in_order(
    bed: Bed, case_id: str, payload: bytes, targets: list[bytes]
) -> None:
    conn = await Conn.open(bed.socket)
    answers = []
    try:
        await conn.send(payload)
        for _ in targets:
            answers.append(await conn.answer())
            if answers[-1].status is None:
                break
    finally:
        conn.close()
    problems = []
    got = [(a.status, a.body) for a in answers]
    if got != [(200, t) for t in targets]:
        problems.append(f"answers {[(str(a), a.body) for a in answers]}, expected {targets}")
    for target in targets:
        heads = bed.heads(target)
        if len(heads) != 1:
            problems.append(f"{target!r} reached the server {len(heads)} times")
        for head in heads:
            raw = head["head"].encode("latin-1").lower()
            if b"\r\nupgrade:" in raw or b"\r\nhttp2-settings:" in raw:
                problems.append(f"hop-by-hop Upgrade/HTTP2-Settings forwarded: {raw!r}")
    problems += await serves(bed, case_id)
    assert not problems, f"{case_id}: " + "; ".join(problems)


# -- at the end ---------------------------------------------------------------------------


async def test_nothing_forbidden_reached_the_server_late(bed: Bed) -> None:
    """Once more, now that every case is done: nothing that must never reach the server
    did (however late), no cut request completed, and the server never got bytes it
    could not read as a request."""
    problems = [f"{m!r} reached the server" for m in NEVER if bed.heads(m)]
    for m in NEVER_COMPLETE:
        for head in bed.heads(m):
            if any(b["complete"] for b in bed.bodies(head)):
                problems.append(f"{m!r} reached the server complete")
    garbage = [e["head"][:100] for e in bed.records() if e["event"] == "garbage"]
    if garbage:
        problems.append(f"the server got bytes that are no request: {garbage}")
    assert not problems, "; ".join(problems)
