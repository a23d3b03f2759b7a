"""Routing and failover under a slow or stalling server: lbstack's policies against nginx.

The benchmark of "Load-aware routing and failover that beat nginx and HAProxy on tail
latency". The topology is lbstack's default one (balancer → 2 proxies → 3 servers
each); wrk loads the balancer's TCP listener in a closed loop (``--connections``
connections, 2 threads). Scenarios:

* ``degraded``: every server answers in ``--latency`` except server-0-2, set to
  ``--slow-latency`` with ``lbstack fault`` once the stack is up.
* ``stall``: every server answers in ``--latency``; server-0-2 hangs for
  ``--stall-for`` s every ``--stall-every`` s (``hang`` then ``clear`` on a timer).

Each lbstack routing policy (``lbstack.config.PolicyName``, so a new policy is picked up
by itself) gets its own stack with ``[balancer] policy`` and ``[proxy] policy`` set.
nginx (round robin, then ``least_conn``), when installed, runs in the same shape over
the *same* server processes as the first lbstack stack that comes up, so it meets the
same slow server or the same stalls. A run that fails (a policy that does not start,
say) becomes a row marked failed; the others go on.

Prints one line per run, then a table, and writes JSON. Latencies are given twice: as
the requests measured them and as wrk reports them, corrected for coordinated omission
(see ``loadtests.wrk``); each p99 is also given over nginx least_conn's p99 in the
same scenario.

Run it from the project root: ``.venv/bin/python -m loadtests.routing_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, get_args

from rich.console import Console
from rich.table import Table

from lbstack.config import PolicyName
from loadtests.options import positive_int, run_main, seconds, summarize
from loadtests.topology import (
    NGINX_METHODS,
    LbstackStack,
    NginxMethod,
    NginxTopology,
    TopologyError,
    find_nginx,
    make_workdir,
    nginx_version,
    post_fault,
    remove_workdir,
)
from loadtests.wrk import WrkError, WrkResult, find_wrk, run_wrk, wrk_version

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "routing.json"
SCENARIOS = ("degraded", "stall")
SLOW_SERVER = "server-0-2"
REFERENCE = ("nginx", "least_conn")  # the row every p99 is compared with
STALL_OFFSET = 1.0  # the first stall starts this long into a measured run
WRK_THREADS = 2

# Piped output gets a width that fits the table rather than rich's default 80 columns.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    duration: int
    connections: int
    warmup: int
    latency: str
    slow_latency: str
    stall_every: float
    stall_for: float
    scenarios: tuple[str, ...]
    policies: tuple[str, ...]
    json_path: Path
    keep: bool

    @property
    def wrk_timeout(self) -> int:
        """wrk's request timeout: well above a stall, so stalled requests are measured."""
        return max(10, int(self.stall_for * 4) + 1)


@dataclass(frozen=True)
class Stall:
    """One stall of the intermittent scenario, in seconds from the measured run's start."""

    start_s: float
    end_s: float
    held: int  # requests waiting at the stalled server when it was released


@dataclass
class Run:
    """One row of the results: a scenario against one system and policy.

    ``result`` is None when the run could not be made; ``error`` then says why.
    """

    scenario: str
    system: str  # "lbstack" or "nginx"
    policy: str
    result: WrkResult | None
    wall_s: float = 0.0
    error: str | None = None
    stalls: list[Stall] = field(default_factory=list)
    p99_ratio: float | None = None  # measured p99 over nginx least_conn's
    wrk_p99_ratio: float | None = None  # the same with wrk's corrected p99s

    @property
    def label(self) -> str:
        return f"{self.system} {self.policy}"

    def to_json(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "scenario": self.scenario,
            "system": self.system,
            "policy": self.policy,
            "error": self.error,
        }
        if self.result is not None:
            row.update(asdict(self.result))
            row["socket_errors"] = self.result.socket_errors
        row.update(
            p99_vs_nginx_least_conn=self.p99_ratio,
            wrk_p99_vs_nginx_least_conn=self.wrk_p99_ratio,
            wall_s=round(self.wall_s, 2),
            stalls=[asdict(stall) for stall in self.stalls],
        )
        return row


class StallTimer:
    """The stall scenario's load shape: hang one server, release it, again and again.

    Posts ``hang`` and ``clear`` to the server's admin socket directly, as ``lbstack
    fault`` does: the CLI needs over a second to start, which would blur a 1 s stall.
    """

    def __init__(self, admin_socket: Path, every: float, stall_for: float) -> None:
        self.admin_socket = admin_socket
        self.every = every
        self.stall_for = stall_for
        self.stalls: list[Stall] = []
        self._task: asyncio.Task[None] | None = None
        self._origin = 0.0
        self._hung_at: float | None = None  # loop time of the hang not yet released

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        self._origin = loop.time()
        for index in itertools.count():
            next_stall = self._origin + STALL_OFFSET + index * self.every
            await asyncio.sleep(max(0.0, next_stall - loop.time()))
            self._hung_at = loop.time()
            await post_fault(self.admin_socket, {"hang": True})
            await asyncio.sleep(self.stall_for)
            await self._release()

    async def _release(self) -> None:
        """Clear the fault; record the stall if one was on."""
        answer = await post_fault(self.admin_socket, {"clear": True})
        if self._hung_at is not None:
            now = asyncio.get_running_loop().time()
            held = answer.get("held", 0) if isinstance(answer, dict) else 0
            start, self._hung_at = self._hung_at - self._origin, None
            self.stalls.append(Stall(round(start, 3), round(now - self._origin, 3), held))

    async def stop(self) -> None:
        """Stop the timer (re-raising its own failure, if any); the server ends released."""
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            await self._release()


class Bench:
    """Runs every scenario against every system, printing one line per run."""

    def __init__(self, options: Options, wrk: str, nginx: str | None) -> None:
        self.options = options
        self.wrk = wrk
        self.nginx = nginx
        self.runs: list[Run] = []
        self.log_problems: dict[str, list[str]] = {}
        self.kept: list[Path] = []
        nginx_runs = len(NGINX_METHODS) if nginx else 0
        self.total = len(options.scenarios) * (len(options.policies) + nginx_runs)

    def stack_config(self, policy: str) -> str:
        """The TOML config of one lbstack stack."""
        return (
            f'[balancer]\npolicy = "{policy}"\n\n'
            f'[proxy]\npolicy = "{policy}"\n\n'
            f'[server.simulation]\nlatency = "{self.options.latency}"\n'
            'latency_distribution = "fixed"\n\n'
            '[supervisor]\ngraceful_timeout = "5s"\n'
        )

    async def run(self) -> None:
        """Every scenario: a stack per policy; nginx over the first stack that comes up."""
        for scenario in self.options.scenarios:
            nginx_pending = self.nginx is not None
            for policy in self.options.policies:
                if await self._stack_runs(scenario, policy, with_nginx=nginx_pending):
                    nginx_pending = False
            if nginx_pending:
                for method in NGINX_METHODS:
                    self._record(
                        Run(
                            scenario,
                            "nginx",
                            method,
                            None,
                            error="no lbstack stack came up to provide the server processes",
                        )
                    )
        self._compare()

    async def _stack_runs(self, scenario: str, policy: str, *, with_nginx: bool) -> bool:
        """Start one lbstack stack; measure it, then nginx over its servers if asked.

        Failures become rows with an error, so one broken policy does not stop the
        others; returns whether the nginx runs were made.
        """
        workdir = make_workdir()
        keep = self.options.keep
        stack = LbstackStack(workdir, self.stack_config(policy))
        nginx_done = False
        try:
            try:
                await stack.start()
            except TopologyError as exc:
                keep = True
                self._record(Run(scenario, "lbstack", policy, None, error=f"{exc}"))
                return False
            try:
                if scenario == "degraded":
                    try:
                        await stack.fault(SLOW_SERVER, f"latency={self.options.slow_latency}")
                    except TopologyError as exc:
                        keep = True
                        self._record(Run(scenario, "lbstack", policy, None, error=f"{exc}"))
                        return False
                keep |= not await self._measure(scenario, "lbstack", policy, stack, workdir)
                if with_nginx:
                    for method in NGINX_METHODS:
                        keep |= not await self._nginx_run(scenario, method, stack, workdir)
                    nginx_done = True
            finally:
                await stack.stop()
            problems = stack.log_problems()
            if problems:
                self.log_problems[f"{scenario} lbstack {policy}"] = problems
            return nginx_done
        finally:
            if keep:
                self.kept.append(workdir)
            else:
                remove_workdir(workdir)

    async def _nginx_run(
        self, scenario: str, method: NginxMethod, stack: LbstackStack, workdir: Path
    ) -> bool:
        """nginx with ``method`` over ``stack``'s servers; whether it could be measured."""
        assert self.nginx is not None
        topology = NginxTopology(workdir, stack.server_groups(), method=method, nginx=self.nginx)
        try:
            await topology.start()
        except TopologyError as exc:
            self._record(Run(scenario, "nginx", method, None, error=f"{exc}"))
            return False
        try:
            return await self._measure(scenario, "nginx", method, stack, workdir, topology.url)
        finally:
            await topology.stop()

    async def _measure(
        self,
        scenario: str,
        system: str,
        policy: str,
        stack: LbstackStack,
        workdir: Path,
        url: str | None = None,
    ) -> bool:
        """Warm up, then one measured run (with the stall timer in the stall scenario).

        ``url`` defaults to the stack's own listener. Returns whether it succeeded.
        """
        options = self.options
        target = url if url is not None else stack.url
        label = f"{scenario} {system} {policy}"
        began = time.monotonic()
        wrk_args: dict[str, Any] = {
            "workdir": workdir,
            "connections": options.connections,
            "threads": WRK_THREADS,
            "timeout": options.wrk_timeout,
            "wrk": self.wrk,
        }
        timer: StallTimer | None = None
        if scenario == "stall":
            timer = StallTimer(
                stack.admin_socket(SLOW_SERVER), options.stall_every, options.stall_for
            )
        try:
            if options.warmup > 0:
                with console.status(f"{label}: warming up for {options.warmup} s"):
                    await run_wrk(target, duration=options.warmup, **wrk_args)
            with console.status(f"{label}: measuring for {options.duration} s"):
                try:
                    if timer is not None:
                        timer.start()
                    result = await run_wrk(target, duration=options.duration, **wrk_args)
                finally:
                    if timer is not None:
                        await timer.stop()
        except (TopologyError, WrkError) as exc:
            self._record(
                Run(scenario, system, policy, None, time.monotonic() - began, error=f"{exc}")
            )
            return False
        self._record(
            Run(
                scenario,
                system,
                policy,
                result,
                wall_s=time.monotonic() - began,
                stalls=timer.stalls if timer is not None else [],
            )
        )
        return True

    def _record(self, run: Run) -> None:
        """Keep a row and print its progress line."""
        self.runs.append(run)
        head = f"[{len(self.runs)}/{self.total}] {run.scenario:<9} {run.label:<28}"
        result = run.result
        if result is None:
            console.print(f"{head} FAILED: {summarize(run.error or '')}", markup=False)
            return
        errors = result.non_2xx + result.socket_errors
        stalls = ""
        if run.stalls:
            held = max(stall.held for stall in run.stalls)
            stalls = f"  {len(run.stalls)} stalls, up to {held} requests held"
        console.print(
            f"{head} p50 {_ms(result.latency.p50_us):>7} ms  "
            f"p99 {_ms(result.latency.p99_us):>7} ms  "
            f"{result.requests_per_s:>6.0f} req/s  {errors} errors{stalls}  ({run.wall_s:.1f} s)",
            markup=False,
        )

    def ordered(self) -> list[Run]:
        """The runs by scenario, lbstack's policies first, then nginx's methods."""
        order = [*self.options.policies, *NGINX_METHODS]

        def key(run: Run) -> tuple[int, bool, int]:
            return (
                self.options.scenarios.index(run.scenario),
                run.system != "lbstack",
                order.index(run.policy),
            )

        return sorted(self.runs, key=key)

    def _compare(self) -> None:
        """Each row's p99 over nginx least_conn's p99 in the same scenario."""
        references = {
            run.scenario: run.result
            for run in self.runs
            if (run.system, run.policy) == REFERENCE and run.result is not None
        }
        for run in self.runs:
            reference = references.get(run.scenario)
            if run.result is None or reference is None:
                continue
            if reference.latency.p99_us:
                run.p99_ratio = round(run.result.latency.p99_us / reference.latency.p99_us, 3)
            if reference.wrk_latency.p99_us:
                run.wrk_p99_ratio = round(
                    run.result.wrk_latency.p99_us / reference.wrk_latency.p99_us, 3
                )

    @property
    def _scenario_notes(self) -> dict[str, str]:
        options = self.options
        return {
            "degraded": f"degraded: 6 servers at {options.latency}, "
            f"{SLOW_SERVER} at {options.slow_latency} (lbstack fault)",
            "stall": f"stall: 6 servers at {options.latency}, {SLOW_SERVER} hangs "
            f"{options.stall_for:g} s every {options.stall_every:g} s "
            f"(first {STALL_OFFSET:g} s into the run); the nginx rows meet the same stalls",
        }

    def notes(self) -> list[str]:
        """What a reader of the table must know."""
        options = self.options
        notes = [
            f"closed loop: wrk, {options.connections} connections, {WRK_THREADS} threads, "
            f"{options.duration} s per run after {options.warmup} s warm-up; "
            f"wrk timeout {options.wrk_timeout} s",
            *(self._scenario_notes[scenario] for scenario in options.scenarios),
            "p50..p99.9: latencies the requests had; wrk p99: wrk's own figure, corrected "
            "for coordinated omission with each run's own mean request interval",
            "nginx: 3 instances (front + 2 proxies), worker_processes 1 each, upstream "
            "keepalive 64, over the same server processes as an lbstack stack",
            f"host: {os.cpu_count()} CPUs shared by wrk, every lbstack process and nginx",
        ]
        if self.nginx is None:
            notes.append("nginx not installed (apt-get install nginx): nginx rows omitted")
        if not any(r.result and (r.system, r.policy) == REFERENCE for r in self.runs):
            notes.append("no nginx least_conn figures: p99 ratios not computed")
        return notes

    def table(self) -> Table:
        """The results, one section per scenario."""
        table = Table(title="Routing under a slow / stalling server (latency in ms)")
        for name in ("scenario", "system", "policy"):
            table.add_column(name)
        for name in ("p50", "p90", "p99", "p99.9", "req/s", "non-2xx", "sock err"):
            table.add_column(name, justify="right")
        for name in ("p99 / nginx lc", "wrk p99", "wrk p99 / nginx lc"):
            table.add_column(name, justify="right")
        previous = None
        for run in self.ordered():
            if previous is not None and run.scenario != previous:
                table.add_section()
            previous = run.scenario
            result = run.result
            if result is None:
                table.add_row(run.scenario, run.system, run.policy, "failed", *[""] * 9)
                continue
            latency = result.latency
            table.add_row(
                run.scenario,
                run.system,
                run.policy,
                _ms(latency.p50_us),
                _ms(latency.p90_us),
                _ms(latency.p99_us),
                _ms(latency.p999_us),
                f"{result.requests_per_s:.0f}",
                str(result.non_2xx),
                str(result.socket_errors),
                _ratio(run.p99_ratio),
                _ms(result.wrk_latency.p99_us),
                _ratio(run.wrk_p99_ratio),
            )
        return table

    def to_json(self, versions: dict[str, str | None]) -> dict[str, Any]:
        options = self.options
        return {
            "benchmark": "routing",
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                **versions,
            },
            "options": {
                "duration_s": options.duration,
                "warmup_s": options.warmup,
                "connections": options.connections,
                "threads": WRK_THREADS,
                "wrk_timeout_s": options.wrk_timeout,
                "latency": options.latency,
                "slow_latency": options.slow_latency,
                "slow_server": SLOW_SERVER,
                "stall_every_s": options.stall_every,
                "stall_for_s": options.stall_for,
                "stall_offset_s": STALL_OFFSET,
                "scenarios": list(options.scenarios),
                "policies": list(options.policies),
            },
            "reference": " ".join(REFERENCE),
            "notes": self.notes(),
            "runs": [run.to_json() for run in self.ordered()],
            "lbstack_log_problems": self.log_problems,
        }


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.1f}"


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line → ``Options``."""
    policies: tuple[str, ...] = get_args(PolicyName)
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.routing_bench",
        description="Tail latency of lbstack's routing policies against nginx, "
        "with one slow or intermittently stalling server.",
    )
    parser.add_argument(
        "--duration", type=positive_int, default=15, help="seconds per measured run (15)"
    )
    parser.add_argument("--connections", type=positive_int, default=64, help="wrk connections (64)")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of unmeasured load before each run (2)"
    )
    parser.add_argument("--latency", default="5ms", help="every server's latency (5ms)")
    parser.add_argument(
        "--slow-latency", default="50ms", help=f"{SLOW_SERVER}'s latency when degraded (50ms)"
    )
    parser.add_argument(
        "--stall-every", type=seconds, default=5.0, help="seconds between stalls (5)"
    )
    parser.add_argument("--stall-for", type=seconds, default=1.0, help="stall length, s (1)")
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=SCENARIOS,
        default=list(SCENARIOS),
        help="scenarios to run (all)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        choices=policies,
        default=list(policies),
        help="lbstack routing policies to run (all)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results JSON"
    )
    parser.add_argument("--keep", action="store_true", help="keep temp dirs (logs, configs)")
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error(f"--warmup: expected seconds ≥ 0, found {args.warmup}")
    if args.stall_for >= args.stall_every:
        parser.error("--stall-for must be shorter than --stall-every")
    return Options(
        duration=args.duration,
        connections=args.connections,
        warmup=args.warmup,
        latency=args.latency,
        slow_latency=args.slow_latency,
        stall_every=args.stall_every,
        stall_for=args.stall_for,
        scenarios=tuple(dict.fromkeys(args.scenarios)),
        policies=tuple(dict.fromkeys(args.policies)),
        json_path=args.json,
        keep=args.keep,
    )


async def amain(options: Options) -> int:
    """Run the benchmark; the process exit status."""
    wrk = find_wrk()
    if wrk is None:
        console.print(
            "error: wrk is required but was not found on PATH (Debian: apt-get install wrk)",
            markup=False,
        )
        return 1
    nginx = find_nginx()
    versions: dict[str, str | None] = {
        "wrk": await wrk_version(wrk),
        "nginx": nginx_version(nginx) if nginx else None,
    }
    if nginx is None:
        console.print("note: nginx not found (apt-get install nginx): nginx rows omitted")
    bench = Bench(options, wrk, nginx)
    console.print(
        f"routing bench: {bench.total} runs of {options.duration} s "
        f"(+{options.warmup} s warm-up); policies {', '.join(options.policies)}; "
        f"{versions['wrk']}, {versions['nginx'] or 'no nginx'}",
        markup=False,
    )
    await bench.run()
    console.print(bench.table())
    for note in bench.notes():
        console.print(f"  * {note}", markup=False)
    for run in bench.ordered():
        if run.error is not None:
            console.print(
                f"  ! {run.scenario} {run.label} failed: {summarize(run.error)}", markup=False
            )
    for name, problems in bench.log_problems.items():
        console.print(
            f"  ! lbstack log ({name}): {len(problems)} warning/error lines, "
            f"first: {problems[0].strip()}",
            markup=False,
        )
    for path in bench.kept:
        console.print(f"  kept {path} (configs and logs)", markup=False)
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(bench.to_json(versions), indent=2) + "\n")
    console.print(f"wrote {options.json_path}", markup=False)
    failed = sum(run.error is not None for run in bench.runs)
    return 1 if failed == len(bench.runs) else 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
