"""One aiohttp HTTP load generator: open loop (Poisson arrivals) or closed loop.

``open_loop`` sends requests at exponentially spaced times (a seeded Poisson process at
``rate`` per second), each its own task, whether or not earlier ones have answered;
every latency is measured from the request's *scheduled* start, so time spent waiting
for the generator, for a pooled connection or for a new one counts (no coordinated
omission). How late each request started against its schedule is recorded too
(``lateness``): a generator that cannot keep up shows it there instead of hiding it.
``closed_loop`` runs ``concurrency`` workers, each sending its next request when the
previous one has answered.

Both use one ``ClientSession`` with a keep-alive pool of at most ``connections_max``
connections (TCP, or a unix socket with ``unix_path``), and both are bounded in
requests and time: at the hard deadline (the run plus ``grace``) requests still under
way are cancelled and counted as ``unfinished``. The figures come back as a ``Result``
(log-bucketed histograms, counts, errors by kind), which is JSON-able.

Run it in a process of its own, so that nothing else shares its event loop (uvloop)::

    .venv/bin/python -m loadtests.loadgen --mode open --rate 900 --duration 10 \\
        --url http://127.0.0.1:8080/ --json -

Timers: the event loop's timers have millisecond resolution, and sleeping shorter only
spins the CPU (which the stack under test needs on a small machine), so by default the
generator never sleeps less than ``min_sleep`` (1 ms): requests start up to about 1 ms
behind schedule (lateness p50 ≈ 0.5 ms), which is part of every latency.
``--min-sleep 0`` starts them within ~0.1 ms at the price of a busy loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import uvloop
from yarl import URL

from loadtests.options import positive_int, seconds

Mode = Literal["open", "closed"]
UNFINISHED = "unfinished"  # the error kind of a request cancelled at the hard deadline
DEFAULT_CONNECTIONS = 256
DEFAULT_TIMEOUT = 10.0  # per request
DEFAULT_GRACE = 11.0  # after the run: room for the last requests' own timeout
DEFAULT_MIN_SLEEP = 0.001
BURST = 64  # dispatches in a row before the scheduler yields, when it runs behind
CLOSED_TIME_LIMIT = 600.0  # a closed loop bounded by a request count only stops here

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

    counts: dict[int, int] = field(default_factory=dict)  # bucket lower bound (µs) → count
    count: int = 0
    total_us: int = 0
    max_us: int = 0

    def record(self, duration_s: float) -> None:
        us = int(duration_s * 1e6) if duration_s > 0 else 0
        lower = _bucket(us)
        self.counts[lower] = self.counts.get(lower, 0) + 1
        self.count += 1
        self.total_us += us
        self.max_us = max(self.max_us, us)

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile in µs (a bucket's midpoint); None if empty."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for lower in sorted(self.counts):
            seen += self.counts[lower]
            if seen >= rank:
                return float(min(lower + (_width(lower) - 1) / 2, self.max_us))
        return float(self.max_us)

    def percentile_ms(self, p: float) -> float | None:
        value = self.percentile(p)
        return None if value is None else value / 1000

    @property
    def mean_us(self) -> float | None:
        return self.total_us / self.count if self.count else None

    def summary_ms(self) -> dict[str, float | None]:
        """p50, p90, p99, p99.9, mean and max, in ms (rounded to µs)."""
        figures = {f"p{p:g}": self.percentile_ms(p) for p in (50, 90, 99, 99.9)}
        figures["mean"] = None if self.mean_us is None else self.mean_us / 1000
        figures["max"] = self.max_us / 1000 if self.count else None
        return {k: None if v is None else round(v, 3) for k, v in figures.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total_us": self.total_us,
            "max_us": self.max_us,
            "buckets_us": [[lower, self.counts[lower]] for lower in sorted(self.counts)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Histogram:
        return cls(
            counts={int(lower): int(n) for lower, n in data["buckets_us"]},
            count=int(data["count"]),
            total_us=int(data["total_us"]),
            max_us=int(data["max_us"]),
        )


@dataclass
class Result:
    """What one run measured.

    ``sent`` = ``completed`` (2xx answers) + every error; ``errors`` by kind: ``status
    503``, an exception's name, ``timeout`` (the per-request timeout) or ``unfinished``
    (cancelled at the hard deadline). ``latency`` covers completed requests, from their
    scheduled start; ``lateness`` (open loop) how late each request started.
    """

    mode: Mode
    url: str
    duration_s: float  # the planned window in which requests were started
    rate: float | None = None  # open loop: offered requests per second
    concurrency: int | None = None  # closed loop
    seed: int | None = None
    warmup_s: float = 0.0
    connections_max: int = DEFAULT_CONNECTIONS
    unix_path: str | None = None
    sent: int = 0
    completed: int = 0
    statuses: dict[str, int] = field(default_factory=dict)  # every answer, by status code
    errors: dict[str, int] = field(default_factory=dict)
    latency: Histogram = field(default_factory=Histogram)
    lateness: Histogram = field(default_factory=Histogram)
    window_s: float = 0.0  # measured: first start to the end of the window
    elapsed_s: float = 0.0  # measured: first start until every request had ended
    cpu_s: float = 0.0  # the generator's own CPU time during the run

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def achieved_rps(self) -> float:
        """Completed requests per second of the window."""
        return self.completed / self.window_s if self.window_s > 0 else 0.0

    @property
    def sent_rps(self) -> float:
        """Requests started per second of the window (open loop: close to ``rate``)."""
        return self.sent / self.window_s if self.window_s > 0 else 0.0

    def percentile(self, p: float) -> float | None:
        """The ``p``-th latency percentile in ms, None if nothing completed."""
        return self.latency.percentile_ms(p)

    def lateness_percentile(self, p: float) -> float | None:
        """The ``p``-th percentile of how late requests started, in ms."""
        return self.lateness.percentile_ms(p)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "url": self.url,
            "unix_path": self.unix_path,
            "rate": self.rate,
            "concurrency": self.concurrency,
            "seed": self.seed,
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "connections_max": self.connections_max,
            "sent": self.sent,
            "completed": self.completed,
            "error_count": self.error_count,
            "statuses": dict(sorted(self.statuses.items())),
            "errors": dict(sorted(self.errors.items())),
            "window_s": round(self.window_s, 4),
            "elapsed_s": round(self.elapsed_s, 4),
            "sent_rps": round(self.sent_rps, 2),
            "achieved_rps": round(self.achieved_rps, 2),
            "cpu_s": round(self.cpu_s, 3),
            "latency_ms": self.latency.summary_ms(),
            "lateness_ms": self.lateness.summary_ms(),
            "latency": self.latency.to_json(),
            "lateness": self.lateness.to_json(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Result:
        mode = data["mode"]
        if mode not in ("open", "closed"):
            raise ValueError(f"mode: expected 'open' or 'closed', found {mode!r}")
        return cls(
            mode=mode,
            url=str(data["url"]),
            unix_path=data.get("unix_path"),
            rate=data.get("rate"),
            concurrency=data.get("concurrency"),
            seed=data.get("seed"),
            duration_s=float(data["duration_s"]),
            warmup_s=float(data.get("warmup_s", 0.0)),
            connections_max=int(data.get("connections_max", DEFAULT_CONNECTIONS)),
            sent=int(data["sent"]),
            completed=int(data["completed"]),
            statuses={str(k): int(v) for k, v in data["statuses"].items()},
            errors={str(k): int(v) for k, v in data["errors"].items()},
            latency=Histogram.from_json(data["latency"]),
            lateness=Histogram.from_json(data["lateness"]),
            window_s=float(data["window_s"]),
            elapsed_s=float(data["elapsed_s"]),
            cpu_s=float(data["cpu_s"]),
        )


class _Recorder:
    """Where one phase's requests land (the warm-up has one of its own, thrown away)."""

    def __init__(self) -> None:
        self.sent = 0
        self.completed = 0
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latency = Histogram()
        self.lateness = Histogram()
        self.last_end = 0.0

    def into(self, result: Result) -> Result:
        result.sent = self.sent
        result.completed = self.completed
        result.statuses = {str(code): n for code, n in sorted(self.statuses.items())}
        result.errors = dict(self.errors)
        result.latency = self.latency
        result.lateness = self.lateness
        return result


def _session(connections_max: int, unix_path: str | None, timeout: float) -> aiohttp.ClientSession:
    """One keep-alive session for the whole run; nothing a load generator doesn't need."""
    connector: aiohttp.BaseConnector
    if unix_path is not None:
        connector = aiohttp.UnixConnector(path=unix_path, limit=connections_max)
    else:
        connector = aiohttp.TCPConnector(limit=connections_max, limit_per_host=0)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )


async def _request(
    session: aiohttp.ClientSession, url: URL, scheduled: float, record: _Recorder, *, late: bool
) -> None:
    """One GET, its body read; latency from ``scheduled`` (a ``perf_counter`` time)."""
    if late:
        record.lateness.record(time.perf_counter() - scheduled)
    try:
        async with session.get(url) as response:
            await response.read()
            status = response.status
    except TimeoutError:
        record.errors["timeout"] += 1
        return
    except (aiohttp.ClientError, OSError) as exc:
        record.errors[type(exc).__name__] += 1
        return
    finally:
        record.last_end = time.perf_counter()
    record.statuses[status] += 1
    if 200 <= status < 300:
        record.completed += 1
        record.latency.record(record.last_end - scheduled)
    else:
        record.errors[f"status {status}"] += 1


async def _settle(tasks: set[asyncio.Task[None]], deadline: float) -> int:
    """Wait for ``tasks`` until ``deadline`` (perf_counter); cancel the rest, their count."""
    if tasks:
        await asyncio.wait(set(tasks), timeout=max(0.0, deadline - time.perf_counter()))
    left = [task for task in tasks if not task.done()]
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left)
    return len(left)


async def _poisson(
    session: aiohttp.ClientSession,
    url: URL,
    *,
    rate: float,
    start: float,
    end: float,
    rng: random.Random,
    record: _Recorder,
    max_requests: int,
    min_sleep: float,
    tasks: set[asyncio.Task[None]],
) -> float:
    """Start requests at Poisson times in [start, end); the last scheduled time drawn."""
    at = start
    burst = 0
    while record.sent < max_requests:
        at += rng.expovariate(rate)
        if at >= end:
            break
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
        task = asyncio.create_task(_request(session, url, at, record, late=True))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        record.sent += 1
    return at


async def open_loop(
    url: str,
    rate: float,
    duration: float,
    *,
    connections_max: int = DEFAULT_CONNECTIONS,
    seed: int = 1,
    unix_path: str | None = None,
    warmup: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    max_requests: int | None = None,
    min_sleep: float = DEFAULT_MIN_SLEEP,
) -> Result:
    """Poisson arrivals at ``rate``/s for ``duration`` s (after ``warmup`` s unmeasured).

    At most ``max_requests`` (default: three times the expected count) are sent; the
    requests still under way ``grace`` s after the window are cancelled (``unfinished``).
    """
    if rate <= 0 or duration <= 0:
        raise ValueError(f"rate and duration must be > 0, found {rate} and {duration}")
    limit = max_requests if max_requests is not None else int(rate * duration * 3) + 100
    result = Result(
        "open",
        url,
        duration,
        rate=rate,
        seed=seed,
        warmup_s=warmup,
        connections_max=connections_max,
        unix_path=unix_path,
    )
    target = URL(url)
    rng = random.Random(seed)
    tasks: set[asyncio.Task[None]] = set()
    async with _session(connections_max, unix_path, timeout) as session:
        start = time.perf_counter()
        if warmup > 0:
            # The same flow, unmeasured: the pool and the routers' estimates warm up,
            # and the measured window starts in steady state (warm-up stragglers still
            # land in the warm-up's recorder).
            await _poisson(
                session,
                target,
                rate=rate,
                start=start,
                end=start + warmup,
                rng=rng,
                record=_Recorder(),
                max_requests=int(rate * warmup * 3) + 100,
                min_sleep=min_sleep,
                tasks=tasks,
            )
            start += warmup
        record = _Recorder()
        cpu = time.process_time()
        end = start + duration
        await _poisson(
            session,
            target,
            rate=rate,
            start=start,
            end=end,
            rng=rng,
            record=record,
            max_requests=limit,
            min_sleep=min_sleep,
            tasks=tasks,
        )
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        result.window_s = time.perf_counter() - start
        unfinished = await _settle(tasks, end + grace)
        if unfinished:
            record.errors[UNFINISHED] += unfinished
        result.elapsed_s = max(record.last_end, end) - start
        result.cpu_s = time.process_time() - cpu
    return record.into(result)


async def closed_loop(
    url: str,
    concurrency: int,
    *,
    duration: float | None = None,
    requests: int | None = None,
    connections_max: int | None = None,
    unix_path: str | None = None,
    warmup: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT,
    grace: float = DEFAULT_GRACE,
    time_limit: float = CLOSED_TIME_LIMIT,
) -> Result:
    """``concurrency`` workers, each sending its next request once the last has answered.

    Runs ``duration`` s or until ``requests`` have been sent (whichever comes first;
    at least one must be given), never longer than ``time_limit`` s; workers still busy
    ``grace`` s after that are cancelled (``unfinished``).
    """
    if duration is None and requests is None:
        raise ValueError("closed_loop needs a duration or a request count")
    if concurrency < 1:
        raise ValueError(f"concurrency must be ≥ 1, found {concurrency}")
    window = min(duration, time_limit) if duration is not None else time_limit
    limit = requests if requests is not None else sys.maxsize
    pool = connections_max if connections_max is not None else concurrency
    result = Result(
        "closed",
        url,
        window,
        concurrency=concurrency,
        warmup_s=warmup,
        connections_max=pool,
        unix_path=unix_path,
    )
    target = URL(url)

    async def worker(record: _Recorder, end: float, limit: int) -> None:
        while record.sent < limit and time.perf_counter() < end:
            record.sent += 1
            await _request(session, target, time.perf_counter(), record, late=False)

    async def phase(record: _Recorder, length: float, limit: int) -> float:
        start = time.perf_counter()
        end = start + length
        tasks = {asyncio.create_task(worker(record, end, limit)) for _ in range(concurrency)}
        unfinished = await _settle(tasks, end + grace)
        if unfinished:
            record.errors[UNFINISHED] += unfinished
        return start

    async with _session(pool, unix_path, timeout) as session:
        if warmup > 0:
            await phase(_Recorder(), warmup, sys.maxsize)
        record = _Recorder()
        cpu = time.process_time()
        start = await phase(record, window, limit)
        result.elapsed_s = time.perf_counter() - start
        result.window_s = min(result.elapsed_s, window)
        result.cpu_s = time.process_time() - cpu
    if requests is not None and duration is None:
        result.duration_s = result.window_s
    return record.into(result)


# -- the command line --------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.loadgen",
        description="HTTP load from one aiohttp client: open loop (Poisson arrivals at "
        "--rate) or closed loop (--concurrency workers). Targets loopback or a unix socket.",
    )
    parser.add_argument("--mode", choices=("open", "closed"), default="open")
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/")
    parser.add_argument("--unix", help="send over this unix socket (the URL gives the path)")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--concurrency", type=positive_int, help="closed loop: workers")
    parser.add_argument("--duration", type=seconds, help="seconds of measured load")
    parser.add_argument("--requests", type=positive_int, help="at most this many requests")
    parser.add_argument("--warmup", type=float, default=0.0, help="unmeasured seconds first (0)")
    parser.add_argument(
        "--connections",
        type=positive_int,
        help=f"most connections at once (open: {DEFAULT_CONNECTIONS}; closed: --concurrency)",
    )
    parser.add_argument("--seed", type=int, default=1, help="open loop: arrival times' seed")
    parser.add_argument(
        "--timeout", type=seconds, default=DEFAULT_TIMEOUT, help="per request, s (10)"
    )
    parser.add_argument(
        "--grace",
        type=seconds,
        default=DEFAULT_GRACE,
        help="after the window, s, before requests still under way are cancelled (11)",
    )
    parser.add_argument(
        "--min-sleep",
        type=float,
        default=DEFAULT_MIN_SLEEP,
        help="open loop: shortest timer sleep, s (0.001; 0 = busy-wait, more precise)",
    )
    parser.add_argument("--json", help="write the Result as JSON to this path ('-': stdout)")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    host = URL(args.url).host
    if args.unix is None and host not in ("127.0.0.1", "localhost", "::1"):
        parser.error(f"--url: expected a loopback host, found {host!r}")
    if args.warmup < 0 or args.min_sleep < 0:
        parser.error("--warmup and --min-sleep must be ≥ 0")
    if args.mode == "open":
        if args.rate is None or args.rate <= 0 or args.duration is None:
            parser.error("--mode open needs --rate > 0 and --duration")
    elif args.concurrency is None or (args.duration is None and args.requests is None):
        parser.error("--mode closed needs --concurrency and --duration or --requests")


def _run(args: argparse.Namespace) -> Coroutine[Any, Any, Result]:
    if args.mode == "open":
        return open_loop(
            args.url,
            args.rate,
            args.duration,
            connections_max=args.connections or DEFAULT_CONNECTIONS,
            seed=args.seed,
            unix_path=args.unix,
            warmup=args.warmup,
            timeout=args.timeout,
            grace=args.grace,
            max_requests=args.requests,
            min_sleep=args.min_sleep,
        )
    return closed_loop(
        args.url,
        args.concurrency,
        duration=args.duration,
        requests=args.requests,
        connections_max=args.connections,
        unix_path=args.unix,
        warmup=args.warmup,
        timeout=args.timeout,
        grace=args.grace,
    )


def describe(result: Result) -> str:
    """A few lines a person reads: counts, rate, latency and lateness percentiles."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    offered = f"offered {result.rate:g}/s" if result.rate else f"c={result.concurrency}"
    lines = [
        f"{result.mode} loop, {offered}, {result.window_s:.1f} s: sent {result.sent}, "
        f"completed {result.completed}, errors {result.error_count}, "
        f"{result.achieved_rps:.0f} req/s, generator CPU {result.cpu_s:.2f} s",
        "latency ms: "
        + "  ".join(f"p{p:g} {ms(result.percentile(p))}" for p in (50, 90, 99, 99.9)),
    ]
    if result.lateness.count:
        lines.append(
            "lateness ms: "
            + "  ".join(f"p{p:g} {ms(result.lateness_percentile(p))}" for p in (50, 99, 100))
        )
    if result.errors:
        lines.append("errors: " + ", ".join(f"{k} {v}" for k, v in sorted(result.errors.items())))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    try:
        result = uvloop.run(_run(args))
    except KeyboardInterrupt:
        sys.exit(130)
    text = json.dumps(result.to_json())
    if args.json == "-":
        sys.stdout.write(text + "\n")
    else:
        if args.json is not None:
            Path(args.json).write_text(text + "\n")
        print(describe(result))
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()


if __name__ == "__main__":
    main()
