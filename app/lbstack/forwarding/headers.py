"""Request and response heads as bytes: pure functions over the parser's raw headers.

aiohttp's C parser hands each message over with its headers as the bytes that came
in (``raw_headers``). A hop rewrites them in one pass and writes the result as it is:
header names and values go on byte for byte (a value with bytes ≥ 0x80 arrives as it
was sent), only the hop-by-hop ones are removed (RFC 9110 §7.6.1, plus whatever
``Connection`` names) and the stack's own are added: ``X-Forwarded-For``,
``X-Forwarded-Proto`` (at the edge), ``Via`` and ``X-Request-Id`` on the way up;
``X-Request-Id`` and ``X-Served-By`` (at a proxy) on the way back.

Nothing here does I/O or knows aiohttp: every function takes bytes and returns bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Final

RawHeaders = Iterable[tuple[bytes, bytes]]

# RFC 9110 §7.6.1, plus the legacy Proxy-Connection.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

REASONS: Final = {
    400: b"Bad Request",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
CLOSE: Final = b"Connection: close\r\n"
KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"
LAST_CHUNK: Final = b"0\r\n\r\n"

# RFC 9110 §7.2 and RFC 3986 §3.2.2: uri-host [ ":" port ], where uri-host is an
# IP-literal, or a reg-name (which covers IPv4 too); empty is allowed (RFC 9112 §3.2).
_HOST: Final = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)(?::[0-9]*)?"
)

# How the request pass treats a (lower-case) name; names not in the table are copied.
_DROP, _CONNECTION, _TRANSFER_ENCODING, _XFF, _XFP, _VIA, _REQUEST_ID, _EXPECT, _HOST_NAME = range(
    9
)
_REQUEST_SPECIAL: Final = {
    **dict.fromkeys(HOP_BY_HOP, _DROP),
    b"connection": _CONNECTION,
    b"transfer-encoding": _TRANSFER_ENCODING,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFP,
    b"via": _VIA,
    b"x-request-id": _REQUEST_ID,
    b"expect": _EXPECT,
    b"host": _HOST_NAME,
}


# The header lines a hop adds to a request at most (X-Forwarded-For, X-Forwarded-Proto,
# Via, X-Request-Id): the tier behind it allows that many more than its limit.
ADDED_LINES: Final = 4


class RequestHead:
    """What the one pass over a request's headers gives.

    ``lines``: every header line to send upstream, CRLF-terminated, without the
    request line, without Host when the client sent none (each try adds the
    upstream's, see ``request_bytes``) and without the final empty line.
    ``problem``: why the request must be refused with ``status``, or "".
    """

    __slots__ = ("has_host", "lines", "problem", "request_id", "status", "upgrade")

    def __init__(
        self,
        lines: bytes,
        request_id: bytes,
        has_host: bool,
        problem: str,
        status: int = 400,
        upgrade: bytes = b"",
    ) -> None:
        self.upgrade = upgrade  # the protocol of a request that may become a tunnel
        self.lines = lines
        self.request_id = request_id
        self.has_host = has_host
        self.problem = problem
        self.status = status


# One pass over the header lines, a branch per header the hop rewrites: a function per
# kind would cost a call per header line of every request.
def request_head(  # noqa: PLR0912 - the one pass over a request's headers (see above)
    raw_headers: RawHeaders,
    *,
    client: bytes,
    via: bytes,
    proto: bytes,
    http10: bool,
    new_id: Callable[[], bytes],
    authority: bytes | None = None,
    upgrade: bytes = b"",
) -> RequestHead:
    """Rewrite a request's headers for the upstream, in one pass.

    ``authority``, from an absolute-form target, replaces the client's Host (RFC 9112
    §3.2.2). ``upgrade``, for a request that may become a tunnel, is the protocol it
    asks for: it goes on with ``Connection: upgrade``.
    ``client`` is appended to ``X-Forwarded-For``; ``via`` (``1.1 <name>``) to ``Via``.
    At the edge (the balancer) ``proto`` is the client connection's scheme, which
    replaces what the client said in ``X-Forwarded-Proto``; further in (``proto``
    empty) the header is kept. The first ``X-Request-Id`` is kept, else
    ``new_id()`` makes one. ``Expect: 100-continue`` is dropped: the hop answers it
    itself once it has an upstream.
    """
    lines: list[bytes] = []
    add = lines.append
    special = _REQUEST_SPECIAL
    host = b""
    has_host = False
    forwarded_for = forwarded_proto = via_in = request_id = connection = codings = b""
    problem = ""
    for name, value in raw_headers:
        kind = special.get(name.lower())
        if kind is None:
            add(b"%s: %s\r\n" % (name, value))
        elif kind == _HOST_NAME:
            if not _HOST.fullmatch(value):
                problem = "invalid Host header"
            host = b"%s: %s\r\n" % (name, value)
            has_host = True
        elif kind == _XFF:
            forwarded_for = b"%s, %s" % (forwarded_for, value) if forwarded_for else value
        elif kind == _VIA:
            via_in = b"%s, %s" % (via_in, value) if via_in else value
        elif kind == _REQUEST_ID:
            request_id = request_id or value
        elif kind == _XFP:
            forwarded_proto = value
        elif kind == _CONNECTION:
            connection = b"%s,%s" % (connection, value)
        elif kind == _TRANSFER_ENCODING:
            codings = b"%s,%s" % (codings, value)
        elif kind == _EXPECT and value.strip().lower() != b"100-continue":
            add(b"%s: %s\r\n" % (name, value))
    if connection:
        lines, has_host = _drop_named(lines, connection, host)
        if not has_host:
            host = b""
    if authority is not None:
        host, has_host = b"Host: %s\r\n" % authority, True
    status = 400
    if codings:
        if http10:
            # RFC 9112 §6.1: framing an HTTP/1.0 recipient can't trust.
            problem = "Transfer-Encoding in an HTTP/1.0 request"
        elif [c.strip().lower() for c in codings.split(b",")[1:]] != [b"chunked"]:
            # The parser took chunked as the final coding; another, we can't decode.
            problem, status = "unsupported transfer coding", 501
    if proto:
        forwarded_proto = proto
    request_id = request_id or new_id()
    tail = b"X-Forwarded-For: %s\r\n%sVia: %s\r\nX-Request-Id: %s\r\n%s" % (
        b"%s, %s" % (forwarded_for, client) if forwarded_for else client,
        b"X-Forwarded-Proto: %s\r\n" % forwarded_proto if forwarded_proto else b"",
        b"%s, %s" % (via_in, via) if via_in else via,
        request_id,
        upgrade_lines(upgrade) if upgrade else b"",
    )
    return RequestHead(
        host + b"".join(lines) + tail, request_id, has_host, problem, status, upgrade
    )


def upgrade_lines(protocol: bytes) -> bytes:
    """The hop-by-hop lines of an upgrade to ``protocol``, as this hop sends them."""
    return b"Connection: upgrade\r\nUpgrade: %s\r\n" % protocol


def _drop_named(lines: list[bytes], connection: bytes, host: bytes) -> tuple[list[bytes], bool]:
    """``lines`` less the headers ``Connection`` names; whether Host survives."""
    named = {t.strip().lower() for t in connection.split(b",")} - {b"", b"close", b"keep-alive"}
    if not named:
        return lines, bool(host)
    kept = [line for line in lines if line.split(b":", 1)[0].lower() not in named]
    return kept, bool(host) and b"host" not in named


def request_bytes(
    method: bytes, target: bytes, head: RequestHead, host: bytes, *, close: bool, chunked: bool
) -> bytes:
    """The request head one try sends: ``host`` is the upstream's, for a client without one."""
    return b"%s %s HTTP/1.1\r\n%s%s%s%s\r\n" % (
        method,
        target,
        b"" if head.has_host else b"Host: %s\r\n" % host,
        head.lines,
        CHUNKED if chunked else b"",
        CLOSE if close else b"",
    )


def valid_host(value: bytes) -> bool:
    """Whether ``value`` is a Host field value RFC 9112 §3.2 allows."""
    return _HOST.fullmatch(value) is not None


def response_head(
    status: int,
    reason: bytes,
    raw_headers: RawHeaders,
    *,
    request_id: bytes,
    served_by: bytes,
    extra: bytes,
) -> bytes:
    """The response head for the client, in one pass over the upstream's headers.

    Hop-by-hop headers (and those ``Connection`` names) go; ``X-Request-Id`` is ours;
    ``served_by``, when given (a proxy), replaces any ``X-Served-By``. ``extra`` is
    the framing and connection lines this hop decided on.
    """
    lines: list[bytes] = []
    add = lines.append
    connection = b""
    for name, value in raw_headers:
        lower = name.lower()
        if lower in HOP_BY_HOP:
            if lower == b"connection":
                connection = b"%s,%s" % (connection, value)
        elif lower != b"x-request-id" and not (served_by and lower == b"x-served-by"):
            add(b"%s: %s\r\n" % (name, value))
    if connection:
        lines, _ = _drop_named(lines, connection, b"")
    return b"HTTP/1.1 %d %s\r\n%sX-Request-Id: %s\r\n%s%s\r\n" % (
        status,
        reason,
        b"".join(lines),
        request_id,
        b"X-Served-By: %s\r\n" % served_by if served_by else b"",
        extra,
    )


def error_response(
    status: int,
    problem: str,
    request_id: bytes,
    *,
    close: bool,
    retry_after: bool = False,
) -> bytes:
    """A short plain-text error of the stack's own, as one complete response."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %s: %s\n" % (status, reason, problem.encode())
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n%s%s%s"
        b"Content-Length: %d\r\n\r\n%s"
    ) % (
        status,
        reason,
        b"X-Request-Id: %s\r\n" % request_id if request_id else b"",
        b"Retry-After: 1\r\n" if retry_after else b"",
        CLOSE if close else b"",
        len(body),
        body,
    )


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)
