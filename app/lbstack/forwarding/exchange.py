"""One request's way through a hop: a retry loop over single tries, each an ``Outcome``.

``Exchanger.forward`` picks an upstream, makes one try (``_try``: connect, write the
request head and body, read the response head) and decides on its outcome: relay the
answer, or try again elsewhere when that is safe and allowed. ``relay`` moves the
bodies; ``state`` holds what the tries, the relay and the timeout sweep share.

When a retry is allowed (RFC 9110 §9.2.2 and the design's no-fan-out rule):

* the request never reached the upstream (connect refused or timed out; or an answer
  from the next tier saying, with ``X-Lbstack-Unreached``, that none of its own
  upstreams got it): tried on the next one, up to ``retries.attempts`` tries in all,
  free of the retry budget;
* it may have reached it (an answer in ``retries.statuses``, a connection lost before
  the answer, a per-try timeout) and it can be sent again (idempotent or bodiless, no
  byte of the client's body consumed): at most ``retries.reached_attempts`` such tries,
  each retry drawn on the retry budget. The balancer's ``statuses`` are empty by
  default, so a response-level retry happens at the proxies only and one client
  request reaches at most two servers.

Timeouts are the sweep's (``front``): ``Exchange.deadline`` moves with each phase, and
an expired exchange cancels the connection's task, which ``absorb`` turns back into
the phase's status (504 waiting on the upstream, 408 on the client).
"""

from __future__ import annotations

import asyncio
from enum import Enum
from time import perf_counter
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from lbstack import aio
from lbstack.forwarding.headers import request_bytes, response_head, upgrade_lines
from lbstack.forwarding.relay import Relay
from lbstack.forwarding.state import CLIENT_GONE, WAIT_HEADERS, BodyFailed, Exchange
from lbstack.forwarding.tunnel import Tunnel
from lbstack.log import get_logger
from lbstack.routing import Upstream

if TYPE_CHECKING:
    from lbstack.forwarding.hop import Hop
    from lbstack.forwarding.upstreams import Link

log = get_logger("forwarding")

IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# An answer of the next tier's own that says no upstream of its got the request.
UNREACHED_HEADER: Final = "X-Lbstack-Unreached"


class Result(Enum):
    """How one try ended."""

    ANSWERED = "answered"  # response headers in: relay, or retry on a retryable status
    UNREACHED = "unreached"  # the request never reached the upstream
    LOST = "lost"  # the connection broke before an answer; it may have reached it
    TIMED_OUT = "timed out"  # no answer within the per-try timeout
    INVALID = "invalid"  # the upstream answered something that isn't HTTP
    CLIENT = "client"  # the client's side failed (its body): answer ``status``
    EXPIRED = "expired"  # the sweep cut the try short: answer ``status`` (its phase's)


class Outcome:
    """One try's result; an answer carries its connection, response and body."""

    __slots__ = ("conn", "error", "latency", "payload", "problem", "response", "result", "status")

    def __init__(
        self,
        result: Result,
        status: int = 0,
        problem: str = "",
        error: str = "",
        *,
        conn: aio.Connection | None = None,
        response: aio.RawResponseMessage | None = None,
        payload: aio.StreamReader | None = None,
        latency: float = 0.0,
    ) -> None:
        self.result = result
        self.status = status
        self.problem = problem
        self.error = error  # the lbstack_upstream_errors_total kind, if any
        self.conn = conn
        self.response = response
        self.payload = payload
        self.latency = latency


class Exchanger:
    """Runs exchanges for one ``Forwarder``: its tries, retries and relays."""

    def __init__(self, forwarder: Hop) -> None:
        tier = forwarder.tier
        self.fw = forwarder
        self._first_byte = tier.timeouts.first_byte
        self._idle = tier.timeouts.idle
        self._per_try = tier.timeouts.per_try
        retries = tier.retries
        self._attempts = retries.attempts
        self._reached_attempts = retries.reached_attempts
        self._retry_statuses = frozenset(retries.statuses)
        self._relay = Relay(forwarder)

    async def forward(self, ex: Exchange) -> tuple[int, bool]:
        """Send ``ex`` upstream until an answer can be relayed; relay it.

        A retry loop over single tries: each try's ``Outcome`` is relayed, or answered
        with the stack's own error, or leads to another try (``_retry_answered``,
        ``_retry_failed``).
        """
        fw = self.fw
        admission = fw.admission
        has_body = ex.payload is not aio.EMPTY_PAYLOAD
        idempotent = ex.message.method in IDEMPOTENT_METHODS
        ex.replayable = idempotent or not has_body
        per_try = self._per_try if idempotent and not has_body else 0.0
        ex.expect_continue = has_body and not ex.http10 and _expects_continue(ex.message)
        fw.budget.deposit()
        picked = admission.pick(())
        if not isinstance(picked, Upstream):  # none available, or all at their limit
            picked = await admission.acquire(fw.loop, ())
        if isinstance(picked, str):
            return fw.refuse(ex, 503, picked, retry_after=True, unreached=True)
        upstream = picked
        while True:
            link = fw.members.links.get(upstream)
            if link is None:  # removed while we waited
                return fw.refuse(ex, 503, "no upstream available", retry_after=True)
            ex.link = link
            upstream.in_flight += 1
            upstream.requests += 1
            ex.attempts += 1
            try:
                out = await self._try(ex, link, per_try)
            except asyncio.CancelledError:
                admission.release(upstream)
                failure = ex.absorb()
                if not failure:
                    fw.client_gone(ex, "waiting for the upstream")
                    raise
                out = self._interrupted(ex, link, failure, per_try)
            else:
                if out.result is Result.ANSWERED:
                    nxt = self._retry_answered(ex, link, out)
                    if nxt is None:
                        conn, response, payload = out.conn, out.response, out.payload
                        assert conn is not None and response is not None and payload is not None
                        if ex.head.upgrade or response.code == 101:
                            return await self._upgrade(ex, link, out)
                        return await self._relay.relay(ex, link, conn, response, payload)
                    link.stats.retries += 1
                    upstream = nxt
                    continue
                admission.release(upstream)
            retry = self._retry_failed(ex, link, out)
            if not isinstance(retry, Upstream):
                return retry
            link.stats.retries += 1
            upstream = retry

    def _interrupted(self, ex: Exchange, link: Link, failure: int, per_try: float) -> Outcome:
        """The outcome of a try the sweep cut short with ``failure`` (its phase's status)."""
        if failure == 504 and per_try and ex.phase == WAIT_HEADERS:
            log.info("%s: no answer within the per-try timeout", link.upstream.name)
            return Outcome(Result.TIMED_OUT, 504, "upstream timed out", "timeout")
        return Outcome(Result.EXPIRED, failure)

    def _retry_answered(self, ex: Exchange, link: Link, out: Outcome) -> Upstream | None:
        """After an answer: None to relay it, else the upstream to try instead."""
        may_retry = ex.replayable and ex.reached + 1 < self._reached_attempts
        cost = self._answered(ex, link, out, may_retry)
        if cost is None:
            return None
        upstream = link.upstream
        tried = (*ex.tried, upstream)
        nxt = self._next(upstream, tried, charged=bool(cost))
        if nxt is None:
            return None
        assert out.conn is not None
        out.conn.close()
        self.fw.admission.release(upstream)
        ex.reached += cost
        ex.tried = tried
        return nxt

    def _retry_failed(self, ex: Exchange, link: Link, out: Outcome) -> Upstream | tuple[int, bool]:
        """After a try with no answer to relay: the upstream to try next, if that is safe
        and allowed; else the answer (a status, and whether to keep the client)."""
        fw = self.fw
        if out.result is Result.EXPIRED:
            return self._failed_try(ex, link, out.status)
        if out.error:
            self._penalise(link, out.error)
        if out.result is Result.CLIENT:
            if out.status == CLIENT_GONE:
                fw.client_gone(ex, "sending its body")
                return CLIENT_GONE, False
            return fw.refuse(ex, out.status, out.problem, close=True)
        if out.result is Result.INVALID:
            return fw.refuse(ex, 502, out.problem)
        upstream = link.upstream
        charged = out.result is not Result.UNREACHED
        if out.result is Result.LOST:
            if not ex.replayable or ex.body_started:
                return fw.refuse(ex, out.status, out.problem)
            if not ex.raced and ex.message.method not in IDEMPOTENT_METHODS:
                # Most often the keep-alive race: the upstream closed a pooled
                # connection as we reused it. Once more, on a new connection.
                ex.raced = True
                return upstream
        ex.tried = (*ex.tried, upstream)
        if charged:
            ex.reached += 1
            if not ex.replayable or ex.reached >= self._reached_attempts:
                return fw.refuse(ex, out.status, out.problem)
        nxt = self._next(upstream, ex.tried, charged=charged)
        if nxt is None:
            unreached = not charged and not ex.reached
            return fw.refuse(ex, out.status, out.problem, unreached=unreached)
        return nxt

    async def _upgrade(self, ex: Exchange, link: Link, out: Outcome) -> tuple[int, bool]:
        """An answer to an upgrade request: a 101 opens the tunnel; others are relayed."""
        conn, response, payload = out.conn, out.response, out.payload
        assert conn is not None and response is not None and payload is not None
        if response.code != 101:
            self.fw.stats.tunnels["rejected"] += 1
            return await self._relay.relay(ex, link, conn, response, payload)
        if not ex.head.upgrade:  # switching protocols nobody asked for
            conn.close()
            self.fw.admission.release(link.upstream)
            self._penalise(link, "protocol")
            return self.fw.refuse(ex, 502, "invalid upstream response")
        protocol: str = response.headers.get("Upgrade", "")
        ex.conn.write(
            response_head(
                101,
                response.reason.encode("utf-8", "surrogateescape"),
                response.raw_headers,
                request_id=ex.head.request_id,
                served_by=b"" if self.fw.edge else link.name,
                extra=upgrade_lines(protocol.encode("utf-8", "surrogateescape")),
            )
        )
        tunnel = Tunnel(self.fw, ex, link, conn, websocket=ex.head.upgrade == b"websocket")
        try:
            await tunnel.run()
        finally:
            self.fw.admission.release(link.upstream)
        return 101, False

    def _answered(self, ex: Exchange, link: Link, out: Outcome, may_retry: bool) -> int | None:
        """Account for an answer: None to relay it; to retry, the reached tries it cost."""
        fw = self.fw
        response = out.response
        assert response is not None
        code = response.code
        upstream = link.upstream
        fw.policy.observe(upstream, out.latency, fw.loop.time())
        link.stats.latency.observe(out.latency)
        link.stats.count(code)
        if code < 500:
            fw.health.success(upstream)
            return None
        fw.health.failure(upstream)
        if ex.body_started:
            return None
        out.status, out.problem = code, f"upstream answered {code}"
        if UNREACHED_HEADER in response.headers:
            return 0  # nothing behind it got the request: like a connect failure
        if code in self._retry_statuses and may_retry:
            log.info("%s answered %d; retrying elsewhere", upstream.name, code)
            return 1
        return None

    def _failed_try(self, ex: Exchange, link: Link, failure: int) -> tuple[int, bool]:
        """The answer for a try cut short by a timeout."""
        fw = self.fw
        if failure == 504:
            self._penalise(link, "timeout")
            waited = "headers" if ex.phase == WAIT_HEADERS else "it to read the body"
            log.info("%s: timed out waiting for %s", link.upstream.name, waited)
            return fw.refuse(ex, 504, "upstream timed out")
        return fw.refuse(ex, failure, "request body too slow", close=True)

    def _penalise(self, link: Link, kind: str) -> None:
        """A try failed: count it, penalise the upstream, tell the health monitor."""
        fw = self.fw
        link.stats.error(kind)
        link.upstream.errors += 1
        fw.policy.observe_failure(link.upstream, fw.loop.time())
        fw.health.failure(link.upstream)

    def _next(
        self, failed: Upstream, tried: tuple[Upstream, ...], *, charged: bool
    ) -> Upstream | None:
        """Where a retry goes, or None: out of tries, of upstreams, or of budget."""
        fw = self.fw
        if len(tried) >= self._attempts:
            return None
        nxt = fw.admission.pick(tried)
        if not isinstance(nxt, Upstream):  # none left, or all at their limit
            return None
        if charged and not fw.budget.try_withdraw():
            fw.stats.budget_exhausted += 1
            log.info("retry budget exhausted; not retrying after %s", failed.name)
            return None
        return nxt

    async def _try(self, ex: Exchange, link: Link, per_try: float) -> Outcome:
        """One try through ``link``: request out, response head in."""
        pool = link.pool
        if pool is None:
            return Outcome(Result.UNREACHED, 503, "upstream closed")
        loop = self.fw.loop
        first_byte = min(self._first_byte, per_try) if per_try else self._first_byte
        has_body = ex.payload is not aio.EMPTY_PAYLOAD
        message = ex.message
        ex.phase = WAIT_HEADERS
        ex.deadline = loop.time() + (self._idle if has_body else first_byte)
        try:
            conn = await pool.acquire(head=message.method == "HEAD")
        except aiohttp.ConnectionTimeoutError:
            return Outcome(Result.UNREACHED, 504, "upstream connect timeout", "timeout")
        except aiohttp.ClientSSLError as exc:  # a certificate, name or protocol refused
            log.warning("%s: TLS handshake failed (%s)", link.upstream.name, exc)
            return Outcome(Result.UNREACHED, 502, "TLS to the upstream failed", "connect")
        except aiohttp.ClientConnectorError as exc:
            log.info("%s: cannot connect (%s)", link.upstream.name, exc)
            return Outcome(Result.UNREACHED, 502, "upstream refused the connection", "connect")
        protocol = aio.protocol_of(conn)
        sent = perf_counter()
        try:
            transport = _transport(protocol)
            chunked = message.chunked
            transport.write(
                request_bytes(
                    message.method.encode(),
                    ex.target,
                    ex.head,
                    link.host,
                    close=not pool.pooling,
                    chunked=chunked,
                )
            )
            if has_body:
                await self._relay.send_body(ex, protocol, transport, chunked)
                ex.phase = WAIT_HEADERS
                ex.deadline = loop.time() + first_byte
            response, payload = await aio.next_response(protocol)
            while aio.interim(response):
                response, payload = await aio.next_response(protocol)
        except BodyFailed as exc:
            conn.close()
            return Outcome(Result.CLIENT, exc.status, exc.problem)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, ConnectionError) as exc:
            conn.close()
            log.info("%s: connection lost before the response (%r)", link.upstream.name, exc)
            return Outcome(Result.LOST, 502, "upstream closed the connection", "reset")
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            conn.close()
            log.info("%s: bad response (%r)", link.upstream.name, exc)
            return Outcome(Result.INVALID, 502, "invalid upstream response", "protocol")
        except BaseException:
            conn.close()
            raise
        return Outcome(
            Result.ANSWERED,
            conn=conn,
            response=response,
            payload=payload,
            latency=perf_counter() - sent,
        )


def _transport(protocol: aio.BaseProtocol) -> asyncio.Transport:
    transport = protocol.transport
    if transport is None:
        raise aiohttp.ServerDisconnectedError()
    return transport


def _expects_continue(message: aio.RawRequestMessage) -> bool:
    value = message.headers.get("Expect")
    return value is not None and value.strip().lower() == "100-continue"
