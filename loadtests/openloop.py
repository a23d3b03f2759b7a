"""Routing judged under open-loop load below saturation: lbstack against nginx and HAProxy.

Closed-loop load at saturation measures CPU, not routing. Here requests arrive at
Poisson times at fixed rates (``--rates``, default 400, 900 and 1200 req/s), each rate
for ``--duration`` s after ``--warmup`` s, from ``loadtests.loadgen`` in a process of its
own; every latency counts from the request's *scheduled* start (no coordinated
omission), and the generator's own lateness is reported so a saturated generator shows.

Six simulated servers at ``--latency`` (5 ms), one of them (server-0-2) slowed to
``--slow-latency`` (50 ms) with ``lbstack fault``. Three systems in the same shape
(a front on a loopback TCP port → 2 proxies → 3 servers each) over the *same* server
processes, all up for the whole run:

* lbstack in its default topology, policy ``p2c_ewma`` on the balancer and the proxies;
* nginx ``least_conn`` (``loadtests.topology.NginxTopology``);
* HAProxy ``leastconn`` (``loadtests.topology.HaproxyTopology``).

The order of the systems rotates from one rate to the next, so drift spreads evenly;
every system meets the same arrival times at a given rate (one seed per rate). A
system whose binary is missing or that does not start is skipped with a message.

Prints one line per run, a table (sent, completed, errors, achieved rate, p50/p99/p99.9,
generator lateness p99), lbstack's p99 over nginx's and HAProxy's per rate and the
target (PASS/MISS, never an exit status), and writes JSON (``--json``).

Run it from the project root: ``.venv/bin/python -m loadtests.openloop``
(``--duration 3 --rates 900`` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from loadtests.bench import SLOW_START_S, stack_config
from loadtests.loadgen import DEFAULT_CONNECTIONS, DEFAULT_GRACE, Result
from loadtests.options import positive_int, run_main, seconds, summarize
from loadtests.topology import (
    HaproxyTopology,
    LbstackStack,
    NginxTopology,
    TopologyError,
    find_haproxy,
    find_nginx,
    haproxy_version,
    make_workdir,
    nginx_version,
    remove_workdir,
    stop_process,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "openloop.json"
SYSTEMS = ("lbstack", "nginx", "haproxy")
LABELS = {
    "lbstack": "lbstack p2c_ewma",
    "nginx": "nginx least_conn",
    "haproxy": "haproxy leastconn",
}
POLICY = "p2c_ewma"
SLOW_SERVER = "server-0-2"
LATE_MS = 2.0  # generator lateness p99 above this: it could not keep its schedule
SPAWN_MARGIN = 30.0  # the generator's start-up and exit, beyond its own bounds

# Target: printed beside the figure, never asserted.
TARGET_RATE = 900
TARGET_P99_MS = 15.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    rates: tuple[int, ...]
    duration: float
    warmup: float
    connections: int
    latency: str
    slow_latency: str
    seed: int
    systems: tuple[str, ...]
    json_path: Path
    keep: bool


@dataclass
class Run:
    """One row: one system at one rate; ``result`` None when it could not be measured."""

    system: str
    rate: int
    result: Result | None
    error: str | None = None
    wall_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "label": LABELS[self.system],
            "rate": self.rate,
            "error": self.error,
            "wall_s": round(self.wall_s, 2),
            "result": self.result.to_json() if self.result is not None else None,
        }


class GeneratorError(Exception):
    """The load generator process failed or printed no result."""


async def generate(url: str, rate: int, seed: int, options: Options) -> Result:
    """One open-loop run by ``loadtests.loadgen`` in a process of its own."""
    bound = options.warmup + options.duration + DEFAULT_GRACE + SPAWN_MARGIN
    argv = [
        *("--mode", "open", "--url", url, "--rate", str(rate), "--seed", str(seed)),
        *("--duration", str(options.duration), "--warmup", str(options.warmup)),
        *("--connections", str(options.connections), "--json", "-"),
    ]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtests.loadgen",
            *argv,
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise GeneratorError(f"could not start the load generator: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(process.communicate(), bound)
    except TimeoutError:
        raise GeneratorError(f"load generator still running after {bound:g} s") from None
    finally:
        await stop_process(process, signal.SIGKILL, 1.0)  # no-op once it has exited
    if process.returncode != 0:
        raise GeneratorError(
            f"load generator exited with status {process.returncode}: "
            f"{err.decode(errors='replace').strip()}"
        )
    try:
        return Result.from_json(json.loads(out.decode().strip().splitlines()[-1]))
    except (ValueError, KeyError, IndexError) as exc:
        raise GeneratorError(f"load generator printed no result: {exc!r}") from exc


@dataclass
class Bench:
    """The three systems up over one set of servers, and the runs made against them."""

    options: Options
    workdir: Path
    urls: dict[str, str] = field(default_factory=dict)  # system → its front's URL
    skipped: dict[str, str] = field(default_factory=dict)  # system → why it is not run
    versions: dict[str, str | None] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)
    fault: str = ""
    start_failed: bool = False
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # at start and at end

    @property
    def failed(self) -> bool:
        """Whether a system did not start or a run failed (its logs are worth keeping)."""
        return self.start_failed or any(
            run.result is None and run.system not in self.skipped for run in self.runs
        )

    @property
    def total(self) -> int:
        return len(self.options.rates) * len(self.options.systems)

    async def run(self) -> None:
        """Bring the systems up, run every rate against each, bring them down."""
        options = self.options
        config = stack_config(proxies=2, servers_per_proxy=3, latency=options.latency) + (
            f'\n[balancer]\npolicy = "{POLICY}"\n\n[proxy]\npolicy = "{POLICY}"\n'
        )
        stack = LbstackStack(self.workdir, config)
        with console.status("starting lbstack"):
            await stack.start()
        try:
            ready_at = time.monotonic()
            self.fault = await stack.fault(SLOW_SERVER, f"latency={options.slow_latency}")
            async with contextlib.AsyncExitStack() as others:
                if "lbstack" in options.systems:
                    self.urls["lbstack"] = stack.url
                await self._start_others(stack, others)
                # lbstack's new upstreams ramp up over its slow start: measure after it.
                await asyncio.sleep(max(0.0, ready_at + SLOW_START_S - time.monotonic()))
                await self._runs()
        finally:
            await stack.stop()
            self.log_problems = stack.log_problems()

    async def _start_others(self, stack: LbstackStack, others: contextlib.AsyncExitStack) -> None:
        """nginx and HAProxy over ``stack``'s servers; a missing or failing one is skipped."""
        groups = stack.server_groups()
        if "nginx" in self.options.systems:
            nginx = find_nginx()
            self.versions["nginx"] = nginx_version(nginx) if nginx else None
            if nginx is None:
                self.skipped["nginx"] = "nginx not found (Debian: apt-get install nginx)"
            else:
                topology = NginxTopology(self.workdir, groups, method="least_conn", nginx=nginx)
                await self._start_one("nginx", topology, others)
        if "haproxy" in self.options.systems:
            haproxy = find_haproxy()
            self.versions["haproxy"] = haproxy_version(haproxy) if haproxy else None
            if haproxy is None:
                self.skipped["haproxy"] = "haproxy not found (Debian: apt-get install haproxy)"
            else:
                other = HaproxyTopology(self.workdir, groups, method="leastconn", haproxy=haproxy)
                await self._start_one("haproxy", other, others)
        for system, why in self.skipped.items():
            console.print(f"note: {LABELS[system]} skipped: {summarize(why)}", markup=False)

    async def _start_one(
        self,
        system: str,
        topology: NginxTopology | HaproxyTopology,
        others: contextlib.AsyncExitStack,
    ) -> None:
        with console.status(f"starting {LABELS[system]}"):
            try:
                await topology.start()
            except TopologyError as exc:
                self.skipped[system] = f"did not start: {exc}"
                self.start_failed = True
                return
        others.push_async_callback(topology.stop)
        self.urls[system] = topology.url

    async def _runs(self) -> None:
        """Every rate; the systems' order rotates from one rate to the next."""
        options = self.options
        systems = [s for s in options.systems if s in self.urls]
        for index, rate in enumerate(options.rates):
            for system in options.systems:
                if system in self.skipped:
                    self._record(Run(system, rate, None, error=self.skipped[system]))
            shift = index % len(systems) if systems else 0
            for system in systems[shift:] + systems[:shift]:
                await self._measure(system, rate, options.seed + index)

    async def _measure(self, system: str, rate: int, seed: int) -> None:
        label = f"{LABELS[system]} at {rate}/s"
        options = self.options
        began = time.monotonic()
        with console.status(f"{label}: {options.warmup:g} s warm-up + {options.duration:g} s"):
            try:
                result = await generate(self.urls[system], rate, seed, options)
            except GeneratorError as exc:
                self._record(Run(system, rate, None, f"{exc}", time.monotonic() - began))
                return
        self._record(Run(system, rate, result, wall_s=time.monotonic() - began))

    def _record(self, run: Run) -> None:
        self.runs.append(run)
        head = f"[{len(self.runs)}/{self.total}] {run.rate:>5}/s {LABELS[run.system]:<18}"
        result = run.result
        if result is None:
            console.print(f"{head} no figures: {summarize(run.error or '')}", markup=False)
            return
        console.print(
            f"{head} p50 {_ms(result.percentile(50))}  p99 {_ms(result.percentile(99))}  "
            f"p99.9 {_ms(result.percentile(99.9))} ms  {result.achieved_rps:.0f} req/s  "
            f"{result.error_count} errors  late p99 {_ms(result.lateness_percentile(99))} ms  "
            f"({run.wall_s:.1f} s)",
            markup=False,
        )

    # -- the report -------------------------------------------------------------------

    def result(self, system: str, rate: int) -> Result | None:
        for run in self.runs:
            if (run.system, run.rate) == (system, rate) and run.result is not None:
                return run.result
        return None

    def p99_ratio(self, rate: int, other: str) -> float | None:
        """lbstack's p99 over ``other``'s at ``rate``."""
        mine, theirs = self.result("lbstack", rate), self.result(other, rate)
        if mine is None or theirs is None:
            return None
        a, b = mine.percentile(99), theirs.percentile(99)
        return None if a is None or not b else a / b

    def target(self) -> tuple[float | None, bool | None]:
        """lbstack's p99 at the target rate, and whether it meets the target."""
        result = self.result("lbstack", TARGET_RATE)
        p99 = result.percentile(99) if result is not None else None
        return p99, None if p99 is None else p99 <= TARGET_P99_MS

    def ordered(self) -> list[Run]:
        order = {s: i for i, s in enumerate(SYSTEMS)}
        return sorted(self.runs, key=lambda r: (r.rate, order[r.system]))

    def table(self) -> Table:
        table = Table(
            title=f"Open-loop Poisson load, {SLOW_SERVER} at {self.options.slow_latency} "
            f"(latency in ms, from the scheduled start)"
        )
        table.add_column("rate/s", justify="right")
        table.add_column("system")
        for name in ("sent", "completed", "errors", "achieved/s"):
            table.add_column(name, justify="right")
        for name in ("p50", "p99", "p99.9", "max", "gen late p99", "gen CPU"):
            table.add_column(name, justify="right")
        previous = None
        for run in self.ordered():
            if previous is not None and run.rate != previous:
                table.add_section()
            previous = run.rate
            result = run.result
            if result is None:
                table.add_row(str(run.rate), LABELS[run.system], "skipped", *[""] * 9)
                continue
            late = result.lateness_percentile(99)
            flag = " (behind)" if late is not None and late > LATE_MS else ""
            table.add_row(
                str(run.rate),
                LABELS[run.system],
                str(result.sent),
                str(result.completed),
                str(result.error_count),
                f"{result.achieved_rps:.0f}",
                _ms(result.percentile(50)),
                _ms(result.percentile(99)),
                _ms(result.percentile(99.9)),
                _ms(result.latency.max_us / 1000 if result.latency.count else None),
                _ms(late) + flag,
                f"{result.cpu_s / result.window_s:.0%}" if result.window_s else "",
            )
        return table

    def ratio_lines(self) -> list[str]:
        lines = []
        for rate in self.options.rates:
            parts = [
                f"{_ratio(self.p99_ratio(rate, other))} × {LABELS[other]}'s"
                for other in ("nginx", "haproxy")
                if other in self.options.systems
            ]
            lines.append(f"{rate:>5}/s: lbstack p99 = " + ", ".join(parts))
        return lines

    def notes(self) -> list[str]:
        options = self.options
        notes = [
            f"open loop: Poisson arrivals, {options.warmup:g} s warm-up then "
            f"{options.duration:g} s per run; one generator process (aiohttp on uvloop, "
            f"keep-alive pool of at most {options.connections} connections); the same "
            "arrival times for every system at a rate",
            "latency counts from each request's scheduled start; 'gen late p99': how late "
            "the generator started requests (timer granularity ~1 ms); above "
            f"{LATE_MS:g} ms it fell behind its schedule and that lag is in the latencies",
            f"6 servers at {options.latency}, {SLOW_SERVER} at {options.slow_latency}; "
            "lbstack, nginx and HAProxy over the same server processes, all up throughout "
            "(lbstack's proxies keep checking and scraping their servers)",
            f"lbstack: balancer → 2 proxies, policy {POLICY}; nginx: front + 2 proxies, "
            "worker_processes 1, upstream keepalive 64; HAProxy: front + 2 proxies, "
            "nbthread 1, http-reuse always",
            f"host: {os.cpu_count()} CPUs shared by the generator and every process; "
            "load average (1 min) "
            + " → ".join(f"{v[0]:.2f}" for v in self.loadavg.values())
            + " (start → end; anything else running adds noise)",
        ]
        late = [
            f"{run.rate}/s ({LABELS[run.system]})"
            for run in self.ordered()
            if run.result is not None and (run.result.lateness_percentile(99) or 0.0) > LATE_MS
        ]
        if late:
            notes.append("the generator fell behind its schedule at " + ", ".join(late))
        return notes

    def to_json(self) -> dict[str, Any]:
        options = self.options
        p99, passed = self.target()
        return {
            "benchmark": "openloop",
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "aiohttp": aiohttp.__version__,
                **self.versions,
                **self.loadavg,
            },
            "options": {
                "rates": list(options.rates),
                "duration_s": options.duration,
                "warmup_s": options.warmup,
                "connections": options.connections,
                "latency": options.latency,
                "slow_latency": options.slow_latency,
                "slow_server": SLOW_SERVER,
                "seed": options.seed,
                "policy": POLICY,
                "systems": list(options.systems),
            },
            "fault": self.fault,
            "notes": self.notes(),
            "skipped": self.skipped,
            "runs": [run.to_json() for run in self.ordered()],
            "p99_ratios": {
                str(rate): {
                    f"lbstack/{other}": _round(self.p99_ratio(rate, other))
                    for other in ("nginx", "haproxy")
                }
                for rate in options.rates
            },
            "target": {
                "name": f"lbstack p99 at {TARGET_RATE} req/s",
                "limit_ms": TARGET_P99_MS,
                "value_ms": _round(p99),
                "passed": passed,
            },
            "lbstack_log_problems": self.log_problems,
        }


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line → ``Options``."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.openloop",
        description="Open-loop (Poisson) routing benchmark with one slow server: "
        "lbstack p2c_ewma against nginx least_conn and HAProxy leastconn.",
    )
    parser.add_argument(
        "--rates",
        nargs="+",
        type=positive_int,
        default=[400, 900, 1200],
        help="offered requests per second (400 900 1200)",
    )
    parser.add_argument(
        "--duration", type=seconds, default=10.0, help="measured seconds per run (10)"
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="unmeasured seconds before each run (2)"
    )
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=DEFAULT_CONNECTIONS,
        help=f"the generator's most connections (the pool's limit; {DEFAULT_CONNECTIONS})",
    )
    parser.add_argument("--latency", default="5ms", help="every server's latency (5ms)")
    parser.add_argument("--slow-latency", default="50ms", help=f"{SLOW_SERVER}'s latency (50ms)")
    parser.add_argument("--seed", type=int, default=1, help="arrival times' seed (1)")
    parser.add_argument(
        "--systems",
        nargs="+",
        choices=SYSTEMS,
        default=list(SYSTEMS),
        help="systems to run (all)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results JSON"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup: expected seconds ≥ 0, found {args.warmup}")
    return Options(
        rates=tuple(dict.fromkeys(args.rates)),
        duration=args.duration,
        warmup=args.warmup,
        connections=args.connections,
        latency=args.latency,
        slow_latency=args.slow_latency,
        seed=args.seed,
        systems=tuple(s for s in SYSTEMS if s in args.systems),
        json_path=args.json,
        keep=args.keep,
    )


def report(bench: Bench) -> None:
    """The table, the ratios, the target and the notes."""
    console.print(bench.table())
    console.print("lbstack's p99 over the others' (below 1: lbstack's tail is shorter):")
    for line in bench.ratio_lines():
        console.print(f"  {line}", markup=False)
    p99, passed = bench.target()
    verdict = {True: "PASS", False: "MISS", None: "n/a"}[passed]
    console.print(
        f"Target (figure only, not asserted): {verdict}  lbstack p99 at {TARGET_RATE} req/s: "
        f"{_ms(p99)} ms (target ≤ {TARGET_P99_MS:g} ms)",
        markup=False,
    )
    for note in bench.notes():
        console.print(f"  * {note}", markup=False)
    for run in bench.ordered():
        if run.error is not None and run.system not in bench.skipped:
            console.print(
                f"  ! {run.rate}/s {LABELS[run.system]} failed: {summarize(run.error)}",
                markup=False,
            )
    if bench.log_problems:
        console.print(
            f"  ! lbstack log: {len(bench.log_problems)} warning/error lines, first: "
            f"{bench.log_problems[0].strip()}",
            markup=False,
        )


async def amain(options: Options) -> int:
    """Run the benchmark; the process exit status."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = make_workdir("lbo-")
    bench = Bench(options, workdir)
    console.print(
        f"open-loop bench: {bench.total} runs of {options.warmup:g} + {options.duration:g} s; "
        f"rates {', '.join(map(str, options.rates))} req/s; "
        f"systems {', '.join(LABELS[s] for s in options.systems)}",
        markup=False,
    )
    began = time.monotonic()
    bench.loadavg["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    try:
        await bench.run()
    except TopologyError as exc:
        console.print(f"error: {summarize(str(exc))}", markup=False)
        console.print(f"  kept {workdir} (configs and logs)", markup=False)
        return 1
    except BaseException:  # Ctrl-C or SIGTERM: leave nothing behind
        remove_workdir(workdir)
        raise
    bench.loadavg["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    report(bench)
    if options.keep or bench.failed:
        console.print(f"  kept {workdir} (configs and logs)", markup=False)
    else:
        remove_workdir(workdir)
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(bench.to_json(), indent=2) + "\n")
    console.print(f"wrote {options.json_path} ({time.monotonic() - began:.0f} s)", markup=False)
    return 0 if any(run.result is not None for run in bench.runs) else 1


def main(argv: Sequence[str] | None = None) -> None:
    run_main(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
