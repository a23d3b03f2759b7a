"""The forwarding path's cost against nginx: throughput, latency, CPU per request, memory.

The benchmark of "a forwarding path within 2× of nginx". One lbstack stack (a TCP
listener, ``--proxies`` × ``--servers-per-proxy`` simulated servers at ``--latency``,
zero by default) and nginx in the same shape over the *same* server processes (one
front nginx, one nginx per proxy, ``loadtests.topology.NginxTopology``) are both up;
wrk drives them in alternating rounds (lbstack, nginx, lbstack, nginx ...), each round
one run at c=1 and one at c=``--connections``, and each figure is the median over the
rounds. Around every run each process's CPU time is read from /proc, giving CPU time per
request per tier; after the rounds each process's peak RSS (``VmHWM``).

Then, unless ``--skip-scale``, two scale figures, each with a stack of its own and no
other load:

* 64 servers behind one proxy against 3 (zero latency, wrk at c=``--connections``):
  the throughput cost of a wide group. Then 64 again with the proxy's health checks
  and scrapes off ("quiet"): what is left is the cost of 64 server processes sharing
  the host's cores with everything else, a floor no proxy setting moves. nginx (front
  + one proxy) over the same 3 and 64 servers, in alternating rounds, measures that
  floor: what a wide group costs whoever routes to it.
* 5,000 concurrent keep-alive client connections on the balancer's TCP listener
  (``loadtests.keepalive_clients``): each sends a GET, all are held open, each sends
  a second GET; errors are counted and the balancer's RSS before and while holding
  them gives the memory per idle connection.

Targets are printed beside the figures (PASS/MISS), never asserted. Prints one line per
run, then the tables, and writes JSON (``--json``). Every process it starts is stopped
at the end, on errors and on Ctrl-C or SIGTERM too.

Run it from the project root: ``.venv/bin/python -m loadtests.bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loadtests.keepalive_clients import KeepAliveClients, Phase
from loadtests.options import positive_int, run_main, summarize
from loadtests.procstats import (
    FdLimit,
    Proc,
    ProcessGone,
    children,
    cpu_snapshot,
    cpu_used,
    fd_limit,
    open_fds,
    peak_rss_kib,
    raise_fd_limit,
    rss_kib,
)
from loadtests.topology import (
    LbstackStack,
    NginxTopology,
    TopologyError,
    find_nginx,
    make_workdir,
    nginx_version,
    remove_workdir,
)
from loadtests.wrk import WrkError, WrkResult, find_wrk, run_wrk, wrk_version

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "bench.json"
SYSTEMS = ("lbstack", "nginx")
TIERS = ("front", "proxies", "servers", "supervisor")
WRK_THREADS = 2
LOW_CONCURRENCY = 1
SCALE_BASE_SERVERS = 3
SCALE_WIDE_SERVERS = 64
HOLD_CONCURRENCY = 100  # connects or requests under way at once while opening/reusing
HOLD_STEP_TIMEOUT = 180.0  # the whole connection-holding step, start-up excluded
FD_MARGIN = 256  # fds a process needs beside the held connections
SLOW_START_S = 5  # lbstack's default slow start; the scale stacks warm up at least this long
WIDE_READY_TIMEOUT = 240.0  # 64 servers take ~40 s to boot on 2 cores

# Targets: printed beside the figures, never asserted.
TARGET_THROUGHPUT_RATIO = 0.6  # lbstack/nginx req/s at c=--connections, at least
TARGET_P50_RATIO = 1.5  # lbstack/nginx p50 at c=1, at most
TARGET_RSS_MIB = 60.0  # peak RSS of every lbstack process, at most
TARGET_SCALE_COST = 10.0  # % throughput lost with 64 servers behind a proxy instead of 3

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


class BenchError(Exception):
    """A step of the benchmark could not be carried out."""


STEP_ERRORS = (TopologyError, WrkError, ProcessGone, BenchError, OSError)


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    latency: str
    connections: int
    duration: int
    rounds: int
    warmup: int
    proxies: int
    servers_per_proxy: int
    hold: int
    skip_scale: bool
    only_scale: bool
    json_path: Path
    keep: bool


@dataclass(frozen=True)
class Measurement:
    """One wrk run and the CPU seconds each tier used during it."""

    system: str  # "lbstack", "nginx", or "1x3" / "1x64" in the scale step
    round: int
    connections: int
    result: WrkResult
    cpu_s: dict[str, float | None]

    @property
    def errors(self) -> int:
        return self.result.non_2xx + self.result.socket_errors

    def cpu_us_per_request(self) -> dict[str, float | None]:
        """CPU µs per answered request for each tier, and their ``total``."""
        requests = max(self.result.requests, 1)
        per = {
            tier: None if used is None else used / requests * 1e6
            for tier, used in self.cpu_s.items()
        }
        known = [value for value in per.values() if value is not None]
        per["total"] = sum(known) if len(known) == len(per) else None
        return per

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "round": self.round,
            "connections": self.connections,
            **asdict(self.result),
            "errors": self.errors,
            "cpu_s": self.cpu_s,
            "cpu_us_per_request": _rounded(self.cpu_us_per_request()),
        }


@dataclass(frozen=True)
class Summary:
    """The median figures of one system at one concurrency over the rounds."""

    runs: int
    requests_per_s: float
    p50_us: float
    p99_us: float
    errors: int  # summed over the runs
    cpu_us_per_request: dict[str, float | None]

    @classmethod
    def of(cls, runs: Sequence[Measurement]) -> Summary:
        if not runs:
            raise ValueError("no runs to summarise")
        per_run = [run.cpu_us_per_request() for run in runs]
        return cls(
            runs=len(runs),
            requests_per_s=statistics.median(r.result.requests_per_s for r in runs),
            p50_us=statistics.median(r.result.latency.p50_us for r in runs),
            p99_us=statistics.median(r.result.latency.p99_us for r in runs),
            errors=sum(r.errors for r in runs),
            cpu_us_per_request={
                tier: _median_of_known(cpu.get(tier) for cpu in per_run) for tier in per_run[0]
            },
        )

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        row["cpu_us_per_request"] = _rounded(self.cpu_us_per_request)
        return row


@dataclass(frozen=True)
class Target:
    """One target, the figure that meets or misses it, and the verdict."""

    name: str
    target: str
    value: str
    passed: bool | None  # None: the figure could not be measured

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


@dataclass
class HoldFigures:
    """The connection-holding step: what was held, the errors, the balancer's memory."""

    target: int
    concurrency: int
    balancer_fd_limit: tuple[int | None, int | None]
    opened: Phase | None = None
    second: Phase | None = None
    errors: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_held_kib: int = 0
    rss_after_second_kib: int = 0
    fds_before: int = 0
    fds_held: int = 0
    balancer_restarts: int = 0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def kib_per_connection(self) -> float | None:
        if self.opened is None or self.opened.ok == 0:
            return None
        return (self.rss_held_kib - self.rss_before_kib) / self.opened.ok

    @property
    def held_all(self) -> bool:
        return (
            self.opened is not None
            and self.second is not None
            and self.opened.ok == self.target
            and self.second.ok == self.target
            and self.error_count == 0
            and self.balancer_restarts == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "error_count": self.error_count,
            "kib_per_connection": _round(self.kib_per_connection),
            "held_all_without_errors": self.held_all,
        }


@dataclass
class Results:
    """Everything measured; a step that failed leaves its figures empty and an error."""

    runs: list[Measurement] = field(default_factory=list)
    peak_rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)
    scale_runs: list[Measurement] = field(default_factory=list)
    hold: HoldFigures | None = None
    errors: dict[str, str] = field(default_factory=dict)  # step → why it failed
    boots: dict[str, dict[str, float]] = field(default_factory=dict)  # start-up time, restarts
    log_problems: dict[str, list[str]] = field(default_factory=dict)

    def summary(self, system: str, connections: int) -> Summary | None:
        runs = [r for r in self.runs if (r.system, r.connections) == (system, connections)]
        return Summary.of(runs) if runs else None

    def scale_summary(
        self, servers: int, *, quiet: bool = False, system: str = "lbstack"
    ) -> Summary | None:
        label = _wide_label(servers, quiet=quiet, system=system)
        runs = [r for r in self.scale_runs if r.system == label]
        return Summary.of(runs) if runs else None


def _wide_label(servers: int, *, quiet: bool = False, system: str = "lbstack") -> str:
    label = f"1x{servers} quiet" if quiet else f"1x{servers}"
    return label if system == "lbstack" else f"{system} {label}"


# The scale step's stacks: (servers, quiet), quiet meaning no checks and no scrapes.
SCALE_STACKS = (
    (SCALE_BASE_SERVERS, False),
    (SCALE_WIDE_SERVERS, False),
    (SCALE_WIDE_SERVERS, True),
)


def _median_of_known(values: Iterable[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(values: dict[str, float | None]) -> dict[str, float | None]:
    return {key: _round(value) for key, value in values.items()}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def stack_config(*, proxies: int, servers_per_proxy: int, latency: str, quiet: bool = False) -> str:
    """The TOML config of a benchmarked lbstack stack (default policies, fixed latency).

    ``quiet``: the proxies neither check nor scrape their servers.
    """
    text = (
        f"proxies = {proxies}\nservers_per_proxy = {servers_per_proxy}\n\n"
        f"[server.simulation]\nlatency = {json.dumps(latency)}\n"
        'latency_distribution = "fixed"\n\n'
        '[supervisor]\ngraceful_timeout = "5s"\n'
    )
    if quiet:
        text += "\n[proxy]\nscrape_interval = 0\n\n[proxy.health]\ninterval = 0\n"
    return text


def lbstack_tiers(status: dict[str, Any]) -> dict[str, list[Proc]]:
    """The stack's processes by tier, from ``lbstack status --json``."""
    tier_of = {"balancer": "front", "proxy": "proxies", "server": "servers"}
    tiers: dict[str, list[Proc]] = {tier: [] for tier in TIERS}
    for component in status["components"]:
        pid = component.get("pid")
        if not isinstance(pid, int):
            raise BenchError(f"{component.get('name')} has no pid: {component}")
        role = str(component.get("role"))
        tiers[tier_of.get(role, "supervisor")].append(Proc(str(component["name"]), pid))
    if not (tiers["front"] and tiers["proxies"] and tiers["servers"]):
        raise BenchError(f"lbstack status lists no balancer, proxy or server: {status}")
    return tiers


def nginx_tiers(topology: NginxTopology, servers: list[Proc]) -> dict[str, list[Proc]]:
    """nginx's processes by tier: each instance's master (pid file) and its workers.

    ``servers`` are the shared server processes, measured under nginx's load too.
    """
    tiers: dict[str, list[Proc]] = {"front": [], "proxies": [], "servers": servers}
    for name, pid_file in topology.pid_files().items():
        try:
            master = int(pid_file.read_text().strip())
        except (OSError, ValueError) as exc:
            raise BenchError(f"nginx {name}: no pid in {pid_file}: {exc}") from exc
        workers = children(master)
        if not workers:
            raise BenchError(f"nginx {name} (master {master}) has no worker process")
        procs = [Proc(f"nginx-{name} master", master)]
        procs += [Proc(f"nginx-{name} worker", pid) for pid in workers]
        tiers["front" if name == "front" else "proxies"].extend(procs)
    return tiers


class Bench:
    """Runs the comparison and the scale steps, printing one line per run."""

    def __init__(self, options: Options, wrk: str, nginx: str, fd: FdLimit) -> None:
        self.options = options
        self.wrk = wrk
        self.nginx = nginx
        self.fd = fd
        self.results = Results()
        self.kept: list[Path] = []
        self.done = 0
        self.total = 0 if options.only_scale else options.rounds * len(SYSTEMS) * 2
        if not options.skip_scale:
            loud = sum(1 for _, quiet in SCALE_STACKS if not quiet)
            self.total += (len(SCALE_STACKS) + loud) * options.rounds + 1

    # -- helpers ----------------------------------------------------------------------

    def _progress(self, text: str) -> None:
        self.done += 1
        console.print(f"[{self.done}/{self.total}] {text}", markup=False)

    @contextlib.asynccontextmanager
    async def _workdir(self) -> AsyncIterator[Path]:
        """A temp dir for one step: kept (its logs) if the step failed or with --keep.

        An interrupted step's directory is removed: Ctrl-C leaves nothing behind.
        """
        path = make_workdir()
        keep = self.options.keep
        try:
            yield path
        except Exception:
            keep = True
            raise
        finally:
            if keep:
                self.kept.append(path)
            else:
                remove_workdir(path)

    async def _start_stack(
        self,
        stop: contextlib.AsyncExitStack,
        workdir: Path,
        what: str,
        *,
        proxies: int,
        servers: int,
        latency: str,
        quiet: bool = False,
    ) -> tuple[LbstackStack, dict[str, list[Proc]]]:
        """Start a stack (stopped by ``stop``); it and its processes by tier."""
        stack = LbstackStack(
            workdir,
            stack_config(proxies=proxies, servers_per_proxy=servers, latency=latency, quiet=quiet),
            ready_timeout=WIDE_READY_TIMEOUT,
        )
        began = time.monotonic()
        with console.status(f"{what}: starting lbstack, {proxies} proxies × {servers} servers"):
            stop.callback(self._stopped, what, stack)  # (callbacks run last-in first-out)
            stop.push_async_callback(stack.stop)
            await stack.start()
            status = await stack.status()
        seconds = time.monotonic() - began
        restarts = sum(int(c.get("restarts") or 0) for c in status["components"])
        self.results.boots[what] = {"seconds": round(seconds, 1), "restarts": restarts}
        console.print(
            f"      {what}: lbstack up in {seconds:.1f} s ({stack.url})"
            + (f", {restarts} child restarts while booting" if restarts else ""),
            markup=False,
        )
        return stack, lbstack_tiers(status)

    async def _start_nginx(
        self,
        stop: contextlib.AsyncExitStack,
        workdir: Path,
        what: str,
        stack: LbstackStack,
        lbstack_procs: dict[str, list[Proc]],
    ) -> tuple[str, dict[str, list[Proc]]]:
        """nginx in ``stack``'s shape over its servers (stopped by ``stop``): its URL and
        its processes by tier, the shared servers included."""
        topology = NginxTopology(workdir, stack.server_groups(), nginx=self.nginx)
        with console.status(f"{what}: starting nginx (front + proxies)"):
            await topology.start()
        stop.push_async_callback(topology.stop)
        return topology.url, nginx_tiers(topology, lbstack_procs["servers"])

    def _stopped(self, what: str, stack: LbstackStack) -> None:
        problems = stack.log_problems()
        if problems:
            self.results.log_problems[what] = problems

    async def _measure(
        self,
        system: str,
        round_: int,
        connections: int,
        url: str,
        tiers: dict[str, list[Proc]],
        workdir: Path,
    ) -> Measurement:
        """One measured wrk run with every tier's CPU time read before and after."""
        procs = [proc for tier in tiers.values() for proc in tier]
        with console.status(
            f"round {round_}: {system} at c={connections} for {self.options.duration} s"
        ):
            before = cpu_snapshot(procs)
            result = await run_wrk(
                url,
                workdir=workdir,
                duration=self.options.duration,
                connections=connections,
                threads=WRK_THREADS,
                wrk=self.wrk,
            )
            after = cpu_snapshot(procs)
        run = Measurement(system, round_, connections, result, cpu_used(tiers, before, after))
        cpu = run.cpu_us_per_request()["total"]
        self._progress(
            f"round {round_} {system:<7} c={connections:<4} {result.requests_per_s:>7.0f} req/s"
            f"  p50 {_ms(result.latency.p50_us):>6} ms  p99 {_ms(result.latency.p99_us):>6} ms"
            f"  {run.errors} errors  CPU {_num(cpu, 0)} µs/req"
        )
        return run

    async def _warm(self, what: str, url: str, workdir: Path, at_least: int = 0) -> None:
        """Unmeasured load for ``--warmup`` s (or ``at_least`` s, if longer)."""
        seconds = max(self.options.warmup, at_least)
        if seconds > 0:
            with console.status(f"{what}: warming up for {seconds} s"):
                await run_wrk(
                    url,
                    workdir=workdir,
                    duration=seconds,
                    connections=self.options.connections,
                    threads=WRK_THREADS,
                    wrk=self.wrk,
                )

    async def _step(self, name: str, step: Callable[[], Awaitable[None]]) -> None:
        """Run one step; a failure is recorded (and printed) and the next step goes on."""
        try:
            await step()
        except STEP_ERRORS as exc:
            self.results.errors[name] = str(exc)
            console.print(f"      {name} failed: {summarize(str(exc))}", markup=False)

    # -- the steps --------------------------------------------------------------------

    async def run(self) -> None:
        if not self.options.only_scale:
            await self._step("comparison", self.compare)
        if not self.options.skip_scale:
            await self._step("scale: servers", self.scale_servers)
            await self._step("scale: connections", self.hold_connections)

    async def compare(self) -> None:
        """lbstack and nginx over the same servers, in alternating rounds."""
        options = self.options
        async with self._workdir() as workdir, contextlib.AsyncExitStack() as stop:
            stack, lbstack_procs = await self._start_stack(
                stop,
                workdir,
                "comparison",
                proxies=options.proxies,
                servers=options.servers_per_proxy,
                latency=options.latency,
            )
            tiers = {"lbstack": lbstack_procs}
            nginx_url, tiers["nginx"] = await self._start_nginx(
                stop, workdir, "comparison", stack, tiers["lbstack"]
            )
            urls = {"lbstack": stack.url, "nginx": nginx_url}
            for system in SYSTEMS:
                await self._warm(f"comparison {system}", urls[system], workdir)
            for round_ in range(1, options.rounds + 1):
                for system in SYSTEMS:
                    for connections in (LOW_CONCURRENCY, options.connections):
                        self.results.runs.append(
                            await self._measure(
                                system, round_, connections, urls[system], tiers[system], workdir
                            )
                        )
            servers = {proc.pid for proc in tiers["lbstack"]["servers"]}
            for system in SYSTEMS:
                procs = [p for tier in tiers[system].values() for p in tier]
                if system != "lbstack":  # the shared servers are listed once, under lbstack
                    procs = [p for p in procs if p.pid not in servers]
                self.results.peak_rss_kib[system] = {p.name: peak_rss_kib(p.pid) for p in procs}

    async def scale_servers(self) -> None:
        """Throughput with 64 servers behind one proxy against 3, zero latency.

        nginx in the same topology over the same servers (front + one proxy), in
        alternating rounds: what 64 server processes cost whoever routes to them.
        """
        options = self.options
        for servers, quiet in SCALE_STACKS:
            label = _wide_label(servers, quiet=quiet)
            async with self._workdir() as workdir, contextlib.AsyncExitStack() as stop:
                stack, tiers = await self._start_stack(
                    stop,
                    workdir,
                    f"scale {label}",
                    proxies=1,
                    servers=servers,
                    latency="0ms",
                    quiet=quiet,
                )
                systems = {label: (stack.url, tiers)}
                if not quiet:
                    systems[_wide_label(servers, system="nginx")] = await self._start_nginx(
                        stop, workdir, f"scale {label}", stack, tiers
                    )
                # Servers restarted while booting ramp in over slow start: wait it out.
                for name, (url, _) in systems.items():
                    await self._warm(f"scale {name}", url, workdir, SLOW_START_S)
                for round_ in range(1, options.rounds + 1):
                    for name, (url, procs) in systems.items():
                        self.results.scale_runs.append(
                            await self._measure(
                                name, round_, options.connections, url, procs, workdir
                            )
                        )

    async def hold_connections(self) -> None:
        """The balancer holding ``--hold`` idle keep-alive client connections at once."""
        options = self.options
        needed = options.hold + FD_MARGIN
        if self.fd.soft < needed:
            raise BenchError(
                f"this process may open only {self.fd.soft} files (hard limit {self.fd.hard}); "
                f"{options.hold} connections need {needed}: raise the hard limit "
                f"(ulimit -Hn, or LimitNOFILE / limits.conf) and run again"
            )
        async with self._workdir() as workdir, contextlib.AsyncExitStack() as stop:
            stack, tiers = await self._start_stack(
                stop,
                workdir,
                "connections",
                proxies=options.proxies,
                servers=options.servers_per_proxy,
                latency="0ms",
            )
            balancer = tiers["front"][0]
            limit = fd_limit(balancer.pid)
            figures = HoldFigures(options.hold, HOLD_CONCURRENCY, limit)
            self.results.hold = figures
            if limit[0] is not None and limit[0] < needed:
                raise BenchError(
                    f"{balancer.name} inherited an open-files limit of {limit[0]} (hard "
                    f"{limit[1]}), too low for {options.hold} connections: raise the hard "
                    f"limit of the shell that runs the benchmark"
                )
            clients = KeepAliveClients("127.0.0.1", stack.port, concurrency=HOLD_CONCURRENCY)
            try:
                async with asyncio.timeout(HOLD_STEP_TIMEOUT):
                    await self._hold(balancer, clients, figures)
            except TimeoutError:
                raise BenchError(
                    f"holding {options.hold} connections took over {HOLD_STEP_TIMEOUT:g} s"
                ) from None
            finally:
                await clients.close()
                figures.errors = dict(clients.errors)
            after = {c["name"]: c for c in (await stack.status())["components"]}
            figures.balancer_restarts = int(after[balancer.name].get("restarts", 0))
        self._progress(
            f"connections: {_num(figures.opened.ok if figures.opened else None, 0)} of "
            f"{figures.target} held, {figures.error_count} errors; balancer RSS "
            f"{_mib(figures.rss_before_kib)} → {_mib(figures.rss_held_kib)} MiB, "
            f"{_num(figures.kib_per_connection, 1)} KiB per idle connection"
        )

    async def _hold(self, balancer: Proc, clients: KeepAliveClients, figures: HoldFigures) -> None:
        """Warm up, read the baseline, open and hold, read again, a second GET on each."""
        # Warm the path with as many connections as will be busy at once, and close
        # them: the upstream pools then have their size before the baseline is read.
        with console.status("connections: warming up"):
            await clients.open(HOLD_CONCURRENCY)
            await clients.close()
            await asyncio.sleep(1.0)
        figures.rss_before_kib = rss_kib(balancer.pid)
        figures.fds_before = open_fds(balancer.pid)
        with console.status(f"connections: opening {figures.target}, a GET on each"):
            figures.opened = await clients.open(figures.target)
            await asyncio.sleep(1.0)  # let the balancer settle with every connection idle
        figures.rss_held_kib = rss_kib(balancer.pid)
        figures.fds_held = open_fds(balancer.pid)
        with console.status(f"connections: a second GET on each of {clients.held} held"):
            figures.second = await clients.request_again()
        figures.rss_after_second_kib = rss_kib(balancer.pid)

    # -- reporting --------------------------------------------------------------------

    def targets(self) -> list[Target]:
        """Every target with its figure and verdict."""
        results, options = self.results, self.options
        targets: list[Target] = []
        lb_high, ng_high = (results.summary(s, options.connections) for s in SYSTEMS)
        ratio = _ratio(
            lb_high.requests_per_s if lb_high else None,
            ng_high.requests_per_s if ng_high else None,
        )
        targets.append(
            Target(
                f"throughput at c={options.connections}",
                f"≥ {TARGET_THROUGHPUT_RATIO:g}× nginx",
                "n/a" if ratio is None else f"{ratio:.2f}×",
                None if ratio is None else ratio >= TARGET_THROUGHPUT_RATIO,
            )
        )
        lb_low, ng_low = (results.summary(s, LOW_CONCURRENCY) for s in SYSTEMS)
        ratio = _ratio(lb_low.p50_us if lb_low else None, ng_low.p50_us if ng_low else None)
        targets.append(
            Target(
                f"p50 at c={LOW_CONCURRENCY}",
                f"≤ {TARGET_P50_RATIO:g}× nginx",
                "n/a" if ratio is None else f"{ratio:.2f}×",
                None if ratio is None else ratio <= TARGET_P50_RATIO,
            )
        )
        peaks = results.peak_rss_kib.get("lbstack", {})
        if peaks:
            name = max(peaks, key=lambda n: peaks[n])
            targets.append(
                Target(
                    "peak RSS per lbstack process",
                    f"≤ {TARGET_RSS_MIB:g} MiB",
                    f"{_mib(peaks[name])} MiB ({name})",
                    peaks[name] / 1024 <= TARGET_RSS_MIB,
                )
            )
        else:
            targets.append(
                Target("peak RSS per lbstack process", f"≤ {TARGET_RSS_MIB:g} MiB", "n/a", None)
            )
        if not options.skip_scale:
            cost = self.scale_cost()
            targets.append(
                Target(
                    f"{SCALE_WIDE_SERVERS} servers behind a proxy instead of {SCALE_BASE_SERVERS}",
                    f"≤ {TARGET_SCALE_COST:g} % throughput cost",
                    "n/a" if cost is None else f"{cost:.1f} %",
                    None if cost is None else cost <= TARGET_SCALE_COST,
                )
            )
            hold = results.hold
            targets.append(
                Target(
                    f"{options.hold:,} keep-alive client connections held",
                    "all held, 0 errors",
                    "n/a"
                    if hold is None or hold.opened is None
                    else f"{hold.opened.ok:,} held, {hold.error_count} errors",
                    None if hold is None or hold.second is None else hold.held_all,
                )
            )
        return targets

    def scale_cost(self, *, quiet: bool = False, system: str = "lbstack") -> float | None:
        """Throughput lost with the wide group, in % of the narrow group's."""
        base = self.results.scale_summary(SCALE_BASE_SERVERS, system=system)
        wide = self.results.scale_summary(SCALE_WIDE_SERVERS, quiet=quiet, system=system)
        if base is None or wide is None or not base.requests_per_s:
            return None
        return (base.requests_per_s - wide.requests_per_s) / base.requests_per_s * 100

    def scale_cost_beyond_nginx(self) -> float | None:
        """What lbstack loses with the wide group beyond what nginx loses over the same
        servers, in %: 1 - (lbstack's 64/3 throughput ratio) / (nginx's)."""
        lbstack, nginx = self.scale_cost(), self.scale_cost(system="nginx")
        if lbstack is None or nginx is None or nginx >= 100:
            return None
        return (1 - (100 - lbstack) / (100 - nginx)) * 100

    def comparison_table(self) -> Table:
        """Throughput, latency, errors and CPU per request of both systems, and ratios."""
        options, results = self.options, self.results
        high = options.connections
        table = Table(
            title=f"lbstack vs nginx, median of {options.rounds} rounds "
            f"({options.proxies} proxies × {options.servers_per_proxy} servers, "
            f"latency {options.latency})"
        )
        table.add_column("figure")
        for name in ("lbstack", "nginx", "lbstack / nginx", "target", ""):
            table.add_column(name, justify="right")
        verdicts = {t.name: t for t in self.targets()}

        def row(
            label: str,
            connections: int,
            pick: Callable[[Summary], float | None],
            fmt: Callable[[float | None], str],
            target: Target | None = None,
        ) -> None:
            lb, ng = (
                None if (s := results.summary(system, connections)) is None else pick(s)
                for system in SYSTEMS
            )
            ratio = _ratio(lb, ng)
            table.add_row(
                label,
                fmt(lb),
                fmt(ng),
                "n/a" if ratio is None else f"{ratio:.2f}×",
                target.target if target else "",
                target.verdict if target else "",
            )

        for c in (LOW_CONCURRENCY, high):
            row(f"req/s, c={c}", c, _pick_rps, _fmt_rps, verdicts.get(f"throughput at c={c}"))
            row(f"p50 ms, c={c}", c, _pick_p50, _fmt_ms, verdicts.get(f"p50 at c={c}"))
            row(f"p99 ms, c={c}", c, _pick_p99, _fmt_ms)
        errors = [sum(r.errors for r in results.runs if r.system == s) for s in SYSTEMS]
        table.add_row("errors (all runs)", str(errors[0]), str(errors[1]), "", "", "")
        table.add_section()
        servers = options.proxies * options.servers_per_proxy
        tiers = {
            "front": "balancer | nginx front",
            "proxies": f"{options.proxies} proxies",
            "servers": f"{servers} servers (shared)",
            "supervisor": "supervisor",
            "total": "total",
        }
        for tier, name in tiers.items():
            row(f"CPU µs/req c={high}: {name}", high, _pick_cpu(tier), _fmt_us)
        row(f"CPU µs/req c={LOW_CONCURRENCY}: total", LOW_CONCURRENCY, _pick_cpu("total"), _fmt_us)
        return table

    def rss_table(self) -> Table:
        """Every process's peak RSS; lbstack's against the target."""
        table = Table(title="Peak RSS per process after the comparison (VmHWM, MiB)")
        table.add_column("process")
        for name in ("peak RSS", "target", ""):
            table.add_column(name, justify="right")
        for system, peaks in self.results.peak_rss_kib.items():
            for name, kib in peaks.items():
                if system == "lbstack":
                    passed = kib / 1024 <= TARGET_RSS_MIB
                    table.add_row(
                        name, _mib(kib), f"≤ {TARGET_RSS_MIB:g}", "PASS" if passed else "MISS"
                    )
                else:
                    table.add_row(name, _mib(kib), "", "")
        return table

    def scale_table(self) -> Table:
        """The wide-group cost and the connection-holding figures."""
        results = self.results
        table = Table(title="Scale (zero-latency servers)")
        for name in ("figure", "value", "target", ""):
            table.add_column(name, justify="left" if name == "figure" else "right")
        verdicts = self.targets()
        stacks = [results.scale_summary(n, quiet=q) for n, q in SCALE_STACKS]

        def each(pick: Callable[[Summary], str]) -> str:
            return " → ".join("n/a" if s is None else pick(s) for s in stacks)

        def cpu(*tiers: str) -> Callable[[Summary], str]:
            def pick(summary: Summary) -> str:
                figures = [summary.cpu_us_per_request.get(tier) for tier in tiers]
                known = [f for f in figures if f is not None]
                return _fmt_us(sum(known) if known else None)

            return pick

        narrow_wide = f"{SCALE_BASE_SERVERS} → {SCALE_WIDE_SERVERS} → {SCALE_WIDE_SERVERS} quiet"
        c = self.options.connections
        table.add_row(
            f"req/s c={c}, {narrow_wide}", each(lambda s: f"{s.requests_per_s:.0f}"), "", ""
        )
        cost, held = verdicts[-2], verdicts[-1]
        table.add_row("  throughput cost", cost.value, cost.target, cost.verdict)
        quiet = self.scale_cost(quiet=True)
        table.add_row(
            "  cost with the proxy's checks and scrapes off",
            "n/a" if quiet is None else f"{quiet:.1f} %",
            "",
            "",
        )
        nginx_runs = [
            results.scale_summary(n, system="nginx")
            for n in (SCALE_BASE_SERVERS, SCALE_WIDE_SERVERS)
        ]
        table.add_row(
            f"  nginx over the same servers, req/s {SCALE_BASE_SERVERS} → {SCALE_WIDE_SERVERS}",
            " → ".join("n/a" if s is None else f"{s.requests_per_s:.0f}" for s in nginx_runs),
            "",
            "",
        )
        nginx = self.scale_cost(system="nginx")
        table.add_row(
            "  nginx's throughput cost", "n/a" if nginx is None else f"{nginx:.1f} %", "", ""
        )
        beyond = self.scale_cost_beyond_nginx()
        table.add_row(
            "  lbstack's cost beyond nginx's",
            "n/a" if beyond is None else f"{beyond:.1f} %",
            "",
            "",
        )
        table.add_row(f"  p99 ms, {narrow_wide}", each(lambda s: _ms(s.p99_us)), "", "")
        for label, tiers in (
            ("balancer + proxy", ("front", "proxies")),
            ("servers", ("servers",)),
            ("supervisor", ("supervisor",)),
            ("total", ("total",)),
        ):
            table.add_row(f"  {label} CPU µs/req, {narrow_wide}", each(cpu(*tiers)), "", "")
        table.add_row(f"  errors, {narrow_wide}", each(lambda s: str(s.errors)), "", "")
        table.add_section()
        table.add_row(
            f"{self.options.hold:,} keep-alive connections, 2 GETs each",
            held.value,
            held.target,
            held.verdict,
        )
        hold = results.hold
        if hold is None:
            return table
        limit = "/".join("unlimited" if n is None else str(n) for n in hold.balancer_fd_limit)
        table.add_row("  balancer open-files limit (soft/hard)", limit, "", "")
        for name, phase in (
            ("opened, 1st GET", hold.opened),
            ("2nd GET while all held", hold.second),
        ):
            if phase is not None:
                table.add_row(
                    f"  {name}",
                    f"{phase.ok:,} ok, {phase.failed} failed, {phase.seconds:.1f} s",
                    "",
                    "",
                )
        if hold.opened is not None:
            table.add_row(
                "  balancer open fds: before → holding",
                f"{hold.fds_before:,} → {hold.fds_held:,}",
                "",
                "",
            )
            table.add_row(
                "  balancer RSS MiB: before → held → after 2nd GET",
                f"{_mib(hold.rss_before_kib)} → {_mib(hold.rss_held_kib)} → "
                f"{_mib(hold.rss_after_second_kib)}",
                "",
                "",
            )
            table.add_row(
                "  memory per idle connection", f"{_num(hold.kib_per_connection, 1)} KiB", "", ""
            )
        if hold.errors:
            kinds = ", ".join(f"{kind}: {n}" for kind, n in sorted(hold.errors.items()))
            table.add_row("  errors by kind", kinds, "", "")
        if hold.balancer_restarts:
            table.add_row("  balancer restarts", str(hold.balancer_restarts), "", "")
        return table

    def notes(self) -> list[str]:
        """What a reader of the tables must know."""
        options = self.options
        notes = [
            f"wrk closed loop, {WRK_THREADS} threads (1 at c=1), {options.duration} s per run, "
            f"{options.warmup} s warm-up per system; rounds alternate lbstack, nginx",
            "latencies as the requests measured them (wrk's coordinated-omission "
            "correction undone, see loadtests/wrk.py); errors = non-2xx + socket errors",
            "nginx: front + one instance per proxy, worker_processes 1 each, round robin, "
            "upstream keepalive 64, over the same server processes as lbstack; lbstack "
            "uses its default policy (p2c_ewma), health checks and metrics scraping",
            "CPU µs/req: utime+stime from /proc/<pid>/stat of every process of a tier "
            "(nginx: masters and workers) over a run, divided by the run's requests; "
            "lbstack's include their background health checks and /metrics scrapes",
            "peak RSS: VmHWM of /proc/<pid>/status once all rounds are done; MiB = 2^20 bytes",
            f"host: {os.cpu_count()} CPUs shared by wrk, every lbstack process and nginx",
        ]
        if not options.skip_scale:
            notes.append(
                f"scale: each figure on a stack of its own, warmed up ≥ {SLOW_START_S} s "
                "(slow start); quiet: the proxy neither checks nor scrapes its servers; "
                f"{options.hold:,} connections "
                f"opened {HOLD_CONCURRENCY} at a time from one asyncio client, each one GET, "
                "all held idle, then a second GET on each; KiB per idle connection = "
                "(balancer VmRSS holding them − after a warm-up) / connections"
            )
        return notes

    def to_json(self, versions: dict[str, str | None], load: dict[str, Any]) -> dict[str, Any]:
        options, results = self.options, self.results
        summaries: dict[str, dict[str, Any]] = {}
        for system in SYSTEMS:
            for c in (LOW_CONCURRENCY, options.connections):
                summary = results.summary(system, c)
                summaries.setdefault(system, {})[f"c{c}"] = summary and summary.to_json()
        lb_high, ng_high = (results.summary(s, options.connections) for s in SYSTEMS)
        lb_low, ng_low = (results.summary(s, LOW_CONCURRENCY) for s in SYSTEMS)
        scale: dict[str, Any] | None = None
        if not options.skip_scale:
            scale = {
                "servers": {
                    "runs": [run.to_json() for run in results.scale_runs],
                    "median": {
                        _wide_label(n, quiet=q): (s := results.scale_summary(n, quiet=q))
                        and s.to_json()
                        for n, q in SCALE_STACKS
                    },
                    "throughput_cost_percent": _round(self.scale_cost()),
                    "throughput_cost_quiet_percent": _round(self.scale_cost(quiet=True)),
                    "nginx": {
                        _wide_label(n, system="nginx"): (
                            s := results.scale_summary(n, system="nginx")
                        )
                        and s.to_json()
                        for n in (SCALE_BASE_SERVERS, SCALE_WIDE_SERVERS)
                    },
                    "nginx_throughput_cost_percent": _round(self.scale_cost(system="nginx")),
                    "throughput_cost_beyond_nginx_percent": _round(self.scale_cost_beyond_nginx()),
                },
                "connections": results.hold and results.hold.to_json(),
            }
        return {
            "benchmark": "forwarding",
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                **versions,
                "fd_limit": asdict(self.fd),
                **load,
            },
            "options": {
                "latency": options.latency,
                "connections": options.connections,
                "low_connections": LOW_CONCURRENCY,
                "duration_s": options.duration,
                "warmup_s": options.warmup,
                "rounds": options.rounds,
                "proxies": options.proxies,
                "servers_per_proxy": options.servers_per_proxy,
                "threads": WRK_THREADS,
                "hold_connections": options.hold,
                "skip_scale": options.skip_scale,
                "only_scale": options.only_scale,
            },
            "comparison": {
                "runs": [run.to_json() for run in results.runs],
                "median": summaries,
                "ratios": {
                    f"throughput_c{options.connections}": _round(
                        _ratio(
                            lb_high.requests_per_s if lb_high else None,
                            ng_high.requests_per_s if ng_high else None,
                        ),
                        3,
                    ),
                    f"p50_c{LOW_CONCURRENCY}": _round(
                        _ratio(
                            lb_low.p50_us if lb_low else None, ng_low.p50_us if ng_low else None
                        ),
                        3,
                    ),
                },
                "peak_rss_kib": results.peak_rss_kib,
            },
            "scale": scale,
            "targets": [{**asdict(t), "verdict": t.verdict} for t in self.targets()],
            "notes": self.notes(),
            "errors": results.errors,
            "boots": results.boots,
            "lbstack_log_problems": results.log_problems,
        }


def _pick_rps(summary: Summary) -> float | None:
    return summary.requests_per_s


def _pick_p50(summary: Summary) -> float | None:
    return summary.p50_us


def _pick_p99(summary: Summary) -> float | None:
    return summary.p99_us


def _pick_cpu(tier: str) -> Callable[[Summary], float | None]:
    def pick(summary: Summary) -> float | None:
        return summary.cpu_us_per_request.get(tier)

    return pick


def _fmt_rps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else _ms(value)


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def _num(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def problem_kinds(lines: Iterable[str]) -> Counter[str]:
    """Log lines counted by kind: the timestamp dropped, component numbers as ``*``."""
    kinds: Counter[str] = Counter()
    for line in lines:
        text = re.sub(r"^\d[\d:.]*\s+", "", line.strip())
        text = re.sub(r"\b(server|proxy|balancer)-[\d-]+", r"\1-*", text)
        kinds[re.sub(r"\s+", " ", text)[:120]] += 1
    return kinds


def _latency(text: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?(us|ms|s|m)?", text):
        raise argparse.ArgumentTypeError(
            f"expected a duration like 0ms, 5ms or 0.2s, found {text!r}"
        )
    return text


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line → ``Options``."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description="lbstack's forwarding path against nginx in the same topology: "
        "throughput, latency, CPU per request, memory; then scale figures.",
    )
    parser.add_argument("--latency", type=_latency, default="0ms", help="server latency (0ms)")
    parser.add_argument(
        "--connections",
        type=positive_int,
        default=64,
        help="wrk connections of the loaded runs (64)",
    )
    parser.add_argument("--duration", type=positive_int, default=10, help="seconds per run (10)")
    parser.add_argument(
        "--rounds", type=positive_int, default=2, help="alternating rounds per system (2)"
    )
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of unmeasured load per system (2)"
    )
    parser.add_argument("--proxies", type=positive_int, default=2, help="proxies (2)")
    parser.add_argument(
        "--servers-per-proxy", type=positive_int, default=3, help="servers per proxy (3)"
    )
    parser.add_argument(
        "--hold", type=positive_int, default=5000, help="client connections to hold (5000)"
    )
    parser.add_argument("--skip-scale", action="store_true", help="skip the scale figures")
    parser.add_argument(
        "--only-scale", action="store_true", help="only the scale figures, no comparison"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results JSON"
    )
    parser.add_argument("--keep", action="store_true", help="keep temp dirs (configs, logs)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup: expected seconds ≥ 0, found {args.warmup}")
    if args.skip_scale and args.only_scale:
        parser.error("--skip-scale and --only-scale: expected at most one, found both")
    return Options(
        latency=args.latency,
        connections=args.connections,
        duration=args.duration,
        rounds=args.rounds,
        warmup=args.warmup,
        proxies=args.proxies,
        servers_per_proxy=args.servers_per_proxy,
        hold=args.hold,
        skip_scale=args.skip_scale,
        only_scale=args.only_scale,
        json_path=args.json,
        keep=args.keep,
    )


async def amain(options: Options) -> int:
    """Run the benchmark; the process exit status."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    wrk, nginx = find_wrk(), find_nginx()
    if wrk is None or nginx is None:
        missing = " and ".join(n for n, p in (("wrk", wrk), ("nginx", nginx)) if p is None)
        console.print(
            f"error: {missing} required but not found (Debian: apt-get install wrk nginx)",
            markup=False,
        )
        return 1
    # Before any stack starts: `lbstack up` and every child it spawns inherit the limit.
    fd = raise_fd_limit()
    versions: dict[str, str | None] = {
        "wrk": await wrk_version(wrk),
        "nginx": nginx_version(nginx),
    }
    load_start = os.getloadavg()
    bench = Bench(options, wrk, nginx, fd)
    console.print(
        f"forwarding bench: {bench.total} runs; {options.rounds} rounds × (c={LOW_CONCURRENCY}, "
        f"c={options.connections}) × {options.duration} s per system; {versions['wrk']}, "
        f"{versions['nginx']}; open files {fd.soft_before} → {fd.soft} (hard {fd.hard}); "
        f"load average {load_start[0]:.2f}",
        markup=False,
    )
    began = time.monotonic()
    await bench.run()
    load = {
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - began, 1),
    }
    if not options.only_scale:
        console.print(bench.comparison_table())
        console.print(bench.rss_table())
    if not options.skip_scale:
        console.print(bench.scale_table())
    console.print("Targets (figures only, not asserted):", markup=False)
    for target in bench.targets():
        console.print(
            f"  {target.verdict:<4}  {target.name}: {target.value} (target {target.target})",
            markup=False,
        )
    for note in bench.notes():
        console.print(f"  * {note}", markup=False)
    for step, error in bench.results.errors.items():
        console.print(f"  ! {step} failed: {summarize(error)}", markup=False)
    for name, problems in bench.results.log_problems.items():
        kinds = problem_kinds(problems).most_common(3)
        console.print(
            f"  ! lbstack log ({name}): {len(problems)} warning/error lines; "
            + "; ".join(f"{n}× {kind}" for kind, n in kinds),
            markup=False,
        )
    for path in bench.kept:
        console.print(f"  kept {path} (configs and logs)", markup=False)
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(bench.to_json(versions, load), indent=2) + "\n")
    console.print(f"wrote {options.json_path} ({load['wall_s']} s)", markup=False)
    return 1 if bench.results.errors else 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
