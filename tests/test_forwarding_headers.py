"""Request and response heads as bytes: the pure functions of ``lbstack.forwarding.headers``."""

from __future__ import annotations

import pytest

from lbstack.forwarding.headers import (
    RequestHead,
    chunk,
    error_response,
    request_bytes,
    request_head,
    response_head,
    valid_host,
)


def head(
    raw: list[tuple[bytes, bytes]], *, proto: bytes = b"", http10: bool = False
) -> RequestHead:
    return request_head(
        raw,
        client=b"10.0.0.9",
        via=b"1.1 proxy-0",
        proto=proto,
        http10=http10,
        new_id=lambda: b"id-1",
    )


def lines(h: RequestHead) -> list[bytes]:
    return h.lines.split(b"\r\n")[:-1]


def test_headers_pass_byte_for_byte_and_the_stack_adds_its_own() -> None:
    h = head([(b"Host", b"x"), (b"X-Role", b"adm\xffin"), (b"accept", b"*/*")])
    assert lines(h) == [
        b"Host: x",
        b"X-Role: adm\xffin",
        b"accept: */*",
        b"X-Forwarded-For: 10.0.0.9",
        b"Via: 1.1 proxy-0",
        b"X-Request-Id: id-1",
    ]
    assert (h.request_id, h.has_host, h.problem) == (b"id-1", True, "")


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    h = head(
        [
            (b"Host", b"x"),
            (b"Connection", b"keep-alive, X-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"TE", b"trailers"),
            (b"Upgrade", b"h2c"),
            (b"Proxy-Authorization", b"Basic x"),
            (b"X-Secret", b"1"),
            (b"X-Kept", b"2"),
        ]
    )
    assert lines(h)[:2] == [b"Host: x", b"X-Kept: 2"]


def test_forwarding_headers_are_appended_and_the_request_id_kept() -> None:
    h = head(
        [
            (b"Host", b"x"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"x-forwarded-for", b"2.2.2.2"),
            (b"Via", b"1.1 balancer-0"),
            (b"X-Request-Id", b"abc"),
            (b"X-Request-Id", b"def"),
            (b"X-Forwarded-Proto", b"https"),
        ]
    )
    assert lines(h)[1:] == [
        b"X-Forwarded-For: 1.1.1.1, 2.2.2.2, 10.0.0.9",
        b"X-Forwarded-Proto: https",
        b"Via: 1.1 balancer-0, 1.1 proxy-0",
        b"X-Request-Id: abc",
    ]
    assert h.request_id == b"abc"


def test_the_edge_says_the_protocol_itself() -> None:
    h = head([(b"Host", b"x"), (b"X-Forwarded-Proto", b"https")], proto=b"http")
    assert b"X-Forwarded-Proto: http\r\n" in h.lines
    h = head([(b"Host", b"x")], proto=b"https")
    assert b"X-Forwarded-Proto: https\r\n" in h.lines


def test_expect_100_continue_is_answered_here_and_others_go_on() -> None:
    assert b"Expect" not in head([(b"Host", b"x"), (b"Expect", b"100-Continue")]).lines
    assert b"Expect: x-y\r\n" in head([(b"Host", b"x"), (b"Expect", b"x-y")]).lines


@pytest.mark.parametrize("value", [b"a b/c", b"x@y", b"[::1", b"a/b", b"x:80:90", b"a\tb", b"\xff"])
def test_an_invalid_host_is_a_problem(value: bytes) -> None:
    assert head([(b"Host", value)]).problem == "invalid Host header"
    assert not valid_host(value)


@pytest.mark.parametrize(
    "value", [b"example.com", b"example.com:8080", b"10.0.0.1:80", b"[::1]:8080", b"", b"a-b_c~"]
)
def test_a_valid_host_is_not(value: bytes) -> None:
    assert valid_host(value)
    assert head([(b"Host", value)]).problem == ""


def test_transfer_encoding_in_http10_is_a_problem() -> None:
    h = head([(b"Transfer-Encoding", b"chunked")], http10=True)
    assert h.problem == "Transfer-Encoding in an HTTP/1.0 request"


def test_a_request_without_host_gets_the_upstreams() -> None:
    h = head([(b"Accept", b"*/*")], http10=True)
    sent = request_bytes(b"GET", b"/p?q", h, b"localhost", close=False, chunked=True)
    assert sent.startswith(b"GET /p?q HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n")
    assert sent.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    closing = request_bytes(b"GET", b"/", head([(b"Host", b"x")]), b"h", close=True, chunked=False)
    assert closing.count(b"Host:") == 1 and closing.endswith(b"Connection: close\r\n\r\n")


def test_response_head_drops_hop_by_hop_and_sets_ours() -> None:
    raw = [
        (b"Content-Length", b"2"),
        (b"Connection", b"X-Private"),
        (b"X-Private", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"X-Request-Id", b"theirs"),
        (b"X-Served-By", b"someone"),
        (b"Set-Cookie", b"a=\xe9"),
    ]
    proxy = response_head(200, b"OK", raw, request_id=b"r1", served_by=b"server-0-1", extra=b"")
    assert proxy == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=\xe9\r\n"
        b"X-Request-Id: r1\r\nX-Served-By: server-0-1\r\n\r\n"
    )
    edge = response_head(200, b"OK", raw, request_id=b"r1", served_by=b"", extra=b"X: y\r\n")
    assert b"X-Served-By: someone\r\n" in edge and edge.endswith(b"X: y\r\n\r\n")


def test_error_response_is_one_complete_answer() -> None:
    answer = error_response(503, "no upstream", b"r1", close=True, retry_after=True)
    head_part, body = answer.split(b"\r\n\r\n", 1)
    assert head_part.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    for line in (b"Retry-After: 1", b"Connection: close", b"X-Request-Id: r1"):
        assert line in head_part.split(b"\r\n")
    assert body == b"503 Service Unavailable: no upstream\n"
    assert f"Content-Length: {len(body)}".encode() in head_part


def test_chunk() -> None:
    assert chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
