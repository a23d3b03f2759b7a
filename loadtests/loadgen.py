"""The aiohttp load generator: open loop, closed loop, held connections, WebSocket echoes.

``open_loop`` sends requests at exponentially spaced times (a seeded Poisson process at
``rate`` per second), each its own task, whether or not earlier ones have answered; every
latency counts from the request's *scheduled* start, so time spent waiting for the
generator or for a connection counts (no coordinated omission), and how late each
request started is recorded too (``lateness``). ``closed_loop`` runs users, each sending
its next request once the last has answered, their number changing step by step, with
what each second answered kept apart (``Result.seconds``). ``HeldConnections`` opens
keep-alive connections, holds them idle and uses each again: one session per
connection, since a shared pool would reuse a few connections instead of holding many.
``echoes`` times WebSocket round trips.

Everything is bounded in requests and time (requests still under way at the hard
deadline are cancelled and counted ``unfinished``) and goes to loopback or a unix socket
only. Run it in a process of its own when nothing else may share its event loop::

    .venv/bin/python -m loadtests.loadgen '{"url": "http://127.0.0.1:8080/", "rate": 900,
        "duration": 10}'

Timers have millisecond resolution and shorter sleeps only spin the CPU the stack needs,
so the open loop never sleeps less than ``min_sleep`` (1 ms): requests start up to ~1 ms
behind schedule, which is part of every latency; ``"min_sleep": 0`` busy-waits instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvloop
from yarl import URL

UNFINISHED = "unfinished"  # the error kind of a request cancelled at the hard deadline
DEFAULT_CONNECTIONS = 256
DEFAULT_TIMEOUT = 10.0  # per request
DEFAULT_GRACE = 11.0  # after the run: room for the last requests' own timeout
DEFAULT_MIN_SLEEP = 0.001
BURST = 64  # dispatches in a row before the scheduler yields, when it runs behind
ERROR_PAUSE = 0.05  # a closed-loop user's pause after an error: no busy loop on a refusal
LOOPBACK = ("127.0.0.1", "localhost", "::1")
# Histogram buckets: exact below 256 µs, above it 128 buckets per power of two, so a
# bucket's midpoint is within 0.4 % of any value in it.
_EXACT_US = 256
_SUB_BITS = 8


def _bucket(us: int) -> int:
    """The lower bound of the bucket that holds ``us`` microseconds."""
    if us < _EXACT_US:
        return us
    shift = us.bit_length() - _SUB_BITS
    return (us >> shift) << shift


def _width(lower: int) -> int:
    return 1 if lower < _EXACT_US else 1 << (lower.bit_length() - _SUB_BITS)


@dataclass
class Histogram:
    """Durations in log-spaced microsecond buckets: a few hundred numbers for any run."""

    counts: dict[int, int] = field(default_factory=dict)  # bucket lower bound (µs) -> count
    count: int = 0
    total_us: int = 0
    max_us: int = 0

    def record(self, duration_s: float) -> None:
        us = max(0, int(duration_s * 1e6))
        lower = _bucket(us)
        self.counts[lower] = self.counts.get(lower, 0) + 1
        self.count += 1
        self.total_us += us
        self.max_us = max(self.max_us, us)

    def merge(self, other: Histogram) -> Histogram:
        for lower, n in other.counts.items():
            self.counts[lower] = self.counts.get(lower, 0) + n
        self.count += other.count
        self.total_us += other.total_us
        self.max_us = max(self.max_us, other.max_us)
        return self

    def ms(self, p: float) -> float | None:
        """The ``p``-th percentile in ms (a bucket's midpoint); None if empty."""
        if self.count == 0:
            return None
        rank, seen = max(1, math.ceil(self.count * p / 100)), 0
        for lower in sorted(self.counts):
            seen += self.counts[lower]
            if seen >= rank:
                return min(lower + (_width(lower) - 1) / 2, self.max_us) / 1000
        return self.max_us / 1000

    def figures(self, prefix: str = "") -> dict[str, float | None]:
        """p50, p90, p99, p99.9, mean and max in ms."""
        out = {f"{prefix}p{p:g}_ms".replace(".", ""): self.ms(p) for p in (50, 90, 99, 99.9)}
        out[f"{prefix}mean_ms"] = self.total_us / self.count / 1000 if self.count else None
        out[f"{prefix}max_ms"] = self.max_us / 1000 if self.count else None
        return {k: None if v is None else round(v, 3) for k, v in out.items()}


@dataclass
class Result:
    """What one run measured.

    ``sent`` = ``completed`` (2xx answers) + every error; ``errors`` by kind: ``status
    503``, an exception's name, ``timeout`` (the per-request timeout) or ``unfinished``.
    ``latency`` covers completed requests from their scheduled start; ``lateness`` (open
    loop) how late each started; ``seconds`` (closed loop) what each second answered.
    """

    sent: int = 0
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    lateness: Histogram = field(default_factory=Histogram)
    seconds: list[tuple[int, int, Histogram]] = field(default_factory=list)  # ok, failed
    window_s: float = 0.0  # the window in which requests were started
    cpu_s: float = 0.0  # the generator's own CPU time
    origin: float | None = None  # perf_counter time of second 0, to fill ``seconds``

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def note(self, outcome: int | str, scheduled: float) -> None:
        """One request's end: its status (or error kind) and latency since ``scheduled``."""
        end = time.perf_counter()
        ok = isinstance(outcome, int) and 200 <= outcome < 300
        if ok:
            self.completed += 1
            self.latency.record(end - scheduled)
        else:
            self.errors[f"status {outcome}" if isinstance(outcome, int) else outcome] += 1
        if self.origin is not None:
            second = int(end - self.origin)
            while len(self.seconds) <= second:
                self.seconds.append((0, 0, Histogram()))
            done, failed, latency = self.seconds[second]
            if ok:
                latency.record(end - scheduled)
            self.seconds[second] = (done + ok, failed + (not ok), latency)

    def figures(self) -> dict[str, Any]:
        """The row a report prints: counts, rate, latency and the generator's lateness."""
        rate = self.completed / self.window_s if self.window_s else None
        late = {"late_p99_ms": self.lateness.ms(99)} if self.lateness.count else {}
        return {
            "sent": self.sent,
            "completed": self.completed,
            "errors": self.error_count,
            "req_per_s": rate,
            **self.latency.figures(),
            **late,
            "generator_cpu": self.cpu_s / self.window_s if self.window_s else None,
        }


def session(
    url: str,
    *,
    unix_path: str | None = None,
    limit: int = 0,
    timeout: float = DEFAULT_TIMEOUT,
    keepalive: float = 15.0,
    trace: aiohttp.TraceConfig | None = None,
) -> aiohttp.ClientSession:
    """A keep-alive session to loopback or a unix socket; nothing a generator doesn't need.

    ``limit``: most connections at once (0: no limit); ``keepalive``: how long an idle
    one is kept."""
    if unix_path is None and URL(url).host not in LOOPBACK:
        raise ValueError(f"expected a loopback URL or a unix socket, found {url!r}")
    connector: aiohttp.BaseConnector
    if unix_path is not None:
        connector = aiohttp.UnixConnector(path=unix_path, limit=limit, keepalive_timeout=keepalive)
    else:
        connector = aiohttp.TCPConnector(
            limit=limit, limit_per_host=0, keepalive_timeout=keepalive, ssl=False
        )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trace_configs=[trace] if trace else None,
    )


async def request(
    client: aiohttp.ClientSession,
    url: str | URL,
    result: Result,
    scheduled: float,
    body: bytes | None = None,
) -> int | str:
    """One GET (a POST with ``body``), its answer read; the outcome noted in ``result``."""
    outcome: int | str
    try:
        async with client.request("GET" if body is None else "POST", url, data=body) as answer:
            await answer.read()
            outcome = answer.status
    except TimeoutError:
        outcome = "timeout"
    except (aiohttp.ClientError, OSError) as exc:
        outcome = type(exc).__name__
    result.note(outcome, scheduled)
    return outcome


async def _settle(tasks: set[asyncio.Task[Any]], deadline: float, result: Result) -> None:
    """Wait for ``tasks`` until ``deadline`` (perf_counter), then cancel the rest."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()))
    left = [task for task in tasks if not task.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left)
        result.errors[UNFINISHED] += len(left)


async def open_loop(
    url: str,
    rate: float,
    duration: float,
    *,
    unix_path: str | None = None,
    connections: int = DEFAULT_CONNECTIONS,
    seed: int = 1,
    warmup: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    min_sleep: float = DEFAULT_MIN_SLEEP,
) -> Result:
    """Poisson arrivals at ``rate``/s for ``duration`` s, after ``warmup`` s unmeasured
    (to ``url``, through the unix socket ``unix_path`` if given)."""
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, found {rate} and {duration}")
    rng, target, tasks = random.Random(seed), URL(url), set[asyncio.Task[Any]]()
    result = Result()

    async def arrivals(into: Result, at: float, end: float) -> None:
        """Start requests at Poisson times in [at, end), at most 3× the expected count."""
        burst, limit = 0, int(rate * (end - at) * 3) + 100
        while into.sent < limit:
            at += rng.expovariate(rate)
            if at >= end:
                return
            delay = at - time.perf_counter()
            if delay > 0:
                burst = 0
                while delay > 0:
                    await asyncio.sleep(max(delay, min_sleep))
                    delay = at - time.perf_counter()
            else:
                burst += 1
                if burst >= BURST:  # far behind: let the requests under way run too
                    burst = 0
                    await asyncio.sleep(0)
            into.lateness.record(time.perf_counter() - at)
            task = asyncio.create_task(request(client, target, into, at))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            into.sent += 1

    async with session(url, unix_path=unix_path, limit=connections, timeout=timeout) as client:
        began = time.perf_counter()
        start, end = began + warmup, began + warmup + duration
        if warmup > 0:  # the same flow, unmeasured: pools and routers' estimates warm up
            await arrivals(Result(), began, start)
        cpu = time.process_time()
        await arrivals(result, start, end)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        result.window_s = time.perf_counter() - start
        await _settle(tasks, end + grace, result)
        result.cpu_s = time.process_time() - cpu
    return result


async def closed_loop(
    url: str,
    steps: Sequence[tuple[int, float]],
    *,
    unix_path: str | None = None,
    post_bytes: int = 0,
    stop: asyncio.Event | None = None,
    max_requests: int = 1_000_000,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    result: Result | None = None,
) -> Result:
    """Users, each sending its next request once the last has answered: ``steps`` are
    (users, seconds) one after the other; users beyond a step's count stop after their
    request. Ends after the last step, once ``stop`` is set or after ``max_requests``;
    with ``post_bytes``, every other request is a POST with a body that long. ``result``:
    where the figures go, to watch them while it runs (second 0 at its ``origin``)."""
    body = b"x" * post_bytes if post_bytes else None
    result = Result(origin=time.perf_counter()) if result is None else result
    users, running = 0, dict[int, asyncio.Task[None]]()

    async def user(index: int) -> None:
        for n in range(max_requests):
            if index >= users or result.sent >= max_requests or (stop and stop.is_set()):
                return
            result.sent += 1
            sent = body if n % 2 else None
            if isinstance(await request(client, url, result, time.perf_counter(), sent), str):
                await asyncio.sleep(ERROR_PAUSE)

    async with session(url, unix_path=unix_path, timeout=timeout) as client:
        cpu, begin = time.process_time(), time.perf_counter()
        for count, seconds in steps:
            users = count
            for index in range(count):
                if index not in running or running[index].done():
                    running[index] = asyncio.create_task(user(index))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((stop or asyncio.Event()).wait(), seconds)
            if stop is not None and stop.is_set():
                break
        users = 0
        result.window_s = time.perf_counter() - begin
        await _settle(set(running.values()), time.perf_counter() + grace, result)
        result.cpu_s = time.process_time() - cpu
    return result


@dataclass(frozen=True)
class Phase:
    """One pass over held connections: how many succeeded, failed, and how long it took."""

    ok: int
    failed: int
    seconds: float


class HeldConnections:
    """Keep-alive connections to ``url``, each in a session of its own, held between uses.

    At most ``at_once`` connects or requests are under way; a connection that had to be
    opened again for its second request (the server closed the held one) counts as an
    error ``reconnected``.
    """

    def __init__(self, url: str, *, at_once: int = 100, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.url, self.at_once, self.timeout = url, at_once, timeout
        self.result = Result()
        self.held: list[aiohttp.ClientSession] = []
        self._opened: Counter[int] = Counter()  # connections opened, by id(session)
        self._trace = aiohttp.TraceConfig()
        self._trace.on_connection_create_end.append(self._connected)

    async def _connected(self, client: aiohttp.ClientSession, *_: Any) -> None:
        self._opened[id(client)] += 1

    async def _use(
        self, clients: list[aiohttp.ClientSession]
    ) -> tuple[Phase, list[aiohttp.ClientSession]]:
        """A GET on each client's connection; the phase, and the clients that succeeded."""
        gate, began = asyncio.Semaphore(self.at_once), time.monotonic()

        async def one(client: aiohttp.ClientSession) -> bool:
            async with gate:
                opened = self._opened[id(client)]
                if await request(client, self.url, self.result, time.perf_counter()) != 200:
                    return False
                if opened and self._opened[id(client)] > opened:
                    self.result.errors["reconnected"] += 1
                    return False
                return True

        done = await asyncio.gather(*(one(c) for c in clients))
        await asyncio.gather(*(c.close() for c, ok in zip(clients, done, strict=True) if not ok))
        phase = Phase(sum(done), len(done) - sum(done), time.monotonic() - began)
        return phase, [c for c, ok in zip(clients, done, strict=True) if ok]

    async def open(self, count: int) -> Phase:
        """Open ``count`` more connections, a GET on each; the failed ones are closed."""
        new = [
            session(self.url, limit=1, timeout=self.timeout, keepalive=3600, trace=self._trace)
            for _ in range(count)
        ]
        for client in new:  # its id may have been a closed session's
            self._opened[id(client)] = 0
        phase, ok = await self._use(new)
        self.held += ok
        return phase

    async def again(self) -> Phase:
        """One more GET on every held connection; the ones that fail are dropped."""
        phase, self.held = await self._use(self.held)
        return phase

    async def close(self) -> None:
        held, self.held = self.held, []
        await asyncio.gather(*(c.close() for c in held))


async def echoes(socket_path: str, sockets: int, messages: int, size: int) -> Histogram:
    """Each message's WebSocket echo time, ``sockets`` at once over a unix socket."""
    payload, times = b"x" * size, Histogram()

    async def one(client: aiohttp.ClientSession) -> None:
        async with client.ws_connect("http://localhost/ws") as ws:
            for _ in range(messages):
                started = time.perf_counter()
                await ws.send_bytes(payload)
                answer = await asyncio.wait_for(ws.receive(), DEFAULT_TIMEOUT)
                times.record(time.perf_counter() - started)
                if answer.data != payload:
                    raise RuntimeError(f"echo mismatch: {answer!r}")

    async with session("http://localhost/", unix_path=socket_path) as client:
        await asyncio.gather(*(one(client) for _ in range(sockets)))
    return times


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m loadtests.loadgen '{"url": ..., "rate": ..., "duration": ...}'``: one
    ``open_loop`` run (the JSON holds its arguments) on uvloop; its figures as JSON."""
    args = json.loads((sys.argv[1:] if argv is None else argv)[0])
    sys.stdout.write(json.dumps(uvloop.run(open_loop(**args)).figures()) + "\n")


if __name__ == "__main__":
    main()
