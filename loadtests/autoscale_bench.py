"""The autoscaler under a step load: offered load, servers, p99 and failures, second by second.

One ``lbstack up`` (1 proxy, 1 simulated server at ``--latency``, ``[autoscale]`` on:
min 1, max 6, target 2 requests in flight per server, interval 1 s, window 3 s,
scale_down_window 10 s) with a TCP listener on loopback. Our own asyncio client (one
aiohttp ``ClientSession``, closed-loop users: each sends its next request when the last
one is answered) drives a step load: ``--low`` users for ``--lead`` s, ``--high`` users
for ``--phase`` s, then ``--low`` users again for ``--phase`` s.

Every second it records the offered load (users), the requests answered in that second
(req/s), their p99, the failed requests (non-2xx, socket errors, timeouts) and the
servers of the group, read from the control socket (``GET /status`` on
``<run dir>/control.sock``, what ``lbstack status --json`` prints): the ready ones, the
draining ones and the autoscaler's last ``desired``. Prints one line per second, a
table per phase at the end, writes JSON and a PNG plot (matplotlib, Agg backend).

Run it from the project root: ``.venv/bin/python -m loadtests.autoscale_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from loadtests import options
from loadtests.options import run_main
from loadtests.topology import LbstackStack, TopologyError, make_workdir, remove_workdir

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_JSON = RESULTS / "autoscale.json"
DEFAULT_PLOT = RESULTS / "autoscale.png"
GROUP = "proxy-0"
MIN_SERVERS = 1
MAX_SERVERS = 6
TARGET_IN_FLIGHT = 2
AUTOSCALE: dict[str, int | str] = {
    "min": MIN_SERVERS,
    "max": MAX_SERVERS,
    "target": TARGET_IN_FLIGHT,
    "interval": "1s",
    "window": "3s",
    "scale_down_window": "10s",
}
STATUS_TIMEOUT = 0.8  # a status read must not hold up the one-second ticker
STOP_USERS_TIMEOUT = 15.0  # users finish their request in flight within this, or are cancelled

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


@dataclass(frozen=True)
class Options:
    """What to run, from the command line."""

    low: int
    high: int
    lead: float
    phase: float
    latency: str
    request_timeout: float
    json_path: Path
    plot_path: Path
    keep: bool

    @property
    def phases(self) -> list[tuple[str, int, float]]:
        """(name, users, seconds) in order."""
        return [
            ("low", self.low, self.lead),
            ("high", self.high, self.phase),
            ("low again", self.low, self.phase),
        ]

    @property
    def total_s(self) -> int:
        return math.ceil(sum(seconds for _, _, seconds in self.phases))


def config_text(options: Options) -> str:
    """The stack's TOML config."""
    autoscale = "\n".join(f"{key} = {json.dumps(value)}" for key, value in AUTOSCALE.items())
    return f"""\
proxies = 1
servers_per_proxy = 1
[server.simulation]
latency = {json.dumps(options.latency)}
[autoscale]
enabled = true
{autoscale}
"""


@dataclass(frozen=True)
class Done:
    """One request: when it was answered (s since the load started), latency, success."""

    at: float
    latency_s: float
    ok: bool


@dataclass
class Second:
    """One row of the time series: the requests answered in ``[t - 1, t)``."""

    t: int
    phase: str
    users: int
    requests: int
    failed: int
    p50_ms: float | None
    p99_ms: float | None
    servers: int | None  # ready (not draining) servers of the group
    draining: int | None
    desired: int | None  # the autoscaler's last decision
    observed: float | None  # its signal (in flight per server)


@dataclass
class Load:
    """Closed-loop users against one URL; ``users`` may change while they run."""

    session: aiohttp.ClientSession
    url: str
    started: float
    users: int = 0
    done: list[Done] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    tasks: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    stopping: bool = False

    def set_users(self, users: int) -> None:
        """Run ``users`` users: start the missing ones; extra ones stop after their request."""
        self.users = users
        for index in range(users):
            task = self.tasks.get(index)
            if task is None or task.done():
                self.tasks[index] = asyncio.create_task(self._user(index))

    async def _user(self, index: int) -> None:
        while not self.stopping and index < self.users:
            begin = time.monotonic()
            ok = False
            try:
                async with self.session.get(self.url) as response:
                    await response.read()
                    ok = 200 <= response.status < 300
                    if not ok:
                        self._error(f"HTTP {response.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._error(type(exc).__name__)
                await asyncio.sleep(0.05)  # no busy loop against a listener that refuses
            end = time.monotonic()
            self.done.append(Done(end - self.started, end - begin, ok))

    def _error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def stop(self) -> None:
        """Stop every user: let requests in flight finish, bounded, then cancel."""
        self.stopping = True
        tasks = [task for task in self.tasks.values() if not task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=STOP_USERS_TIMEOUT)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def read_status(control: Path) -> dict[str, Any] | None:
    """``GET /status`` on the control socket; None if it does not answer in time."""
    connector = aiohttp.UnixConnector(path=str(control))
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=STATUS_TIMEOUT)
            ) as client,
            client.get("http://localhost/status") as response,
        ):
            answer = await response.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def group_servers(status: dict[str, Any] | None) -> tuple[int | None, int | None]:
    """(ready, draining) servers of ``GROUP`` in a status."""
    if status is None:
        return None, None
    servers = [
        c
        for c in status.get("components", [])
        if isinstance(c, dict) and c.get("role") == "server" and c.get("group") == GROUP
    ]
    ready = sum(1 for c in servers if c.get("state") == "ready")
    draining = sum(1 for c in servers if c.get("state") == "draining")
    return ready, draining


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile (0..100) of ``values``, nearest rank; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Bench:
    """One run of the step load against one stack."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.seconds: list[Second] = []
        self.load: Load | None = None
        self.scale_log: list[str] = []
        self.log_problems: list[str] = []
        self.workdir: Path | None = None

    def phase_at(self, t: float) -> tuple[str, int]:
        """The phase (name, users) at ``t`` seconds into the load."""
        start = 0.0
        for name, users, seconds in self.options.phases:
            if t < start + seconds:
                return name, users
            start += seconds
        name, users, _ = self.options.phases[-1]
        return name, users

    async def run(self) -> None:
        options = self.options
        self.workdir = make_workdir("lba-")
        stack = LbstackStack(self.workdir, config_text(options))
        try:
            with console.status("starting the stack"):
                await stack.start()
            control = stack.run_dir / "control.sock"
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            timeout = aiohttp.ClientTimeout(total=options.request_timeout)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                self.load = Load(session, stack.url, time.monotonic())
                try:
                    await self._measure(self.load, control)
                finally:
                    await self.load.stop()
        finally:
            await stack.stop()
            self.log_problems = stack.log_problems()
            self.scale_log = _scale_lines(stack.log_file)
            if not options.keep:
                remove_workdir(self.workdir)

    async def _measure(self, load: Load, control: Path) -> None:
        loop = asyncio.get_running_loop()
        origin = loop.time()
        _, users = self.phase_at(0.0)
        load.set_users(users)
        first = 0  # index into load.done of the first request not yet counted
        for t in range(1, self.options.total_s + 1):
            await asyncio.sleep(max(0.0, origin + t - loop.time()))
            status = await read_status(control)
            # Requests answered before this tick (load.done is in completion order).
            batch = [d for d in load.done[first:] if d.at < t]
            first += len(batch)
            name, users = self.phase_at(t - 1)
            ready, draining = group_servers(status)
            decision = (status or {}).get("autoscale", {}).get(GROUP) or {}
            latencies = [d.latency_s for d in batch if d.ok]
            row = Second(
                t=t,
                phase=name,
                users=users,
                requests=sum(1 for d in batch if d.ok),
                failed=sum(1 for d in batch if not d.ok),
                p50_ms=_ms(percentile(latencies, 50)),
                p99_ms=_ms(percentile(latencies, 99)),
                servers=ready,
                draining=draining,
                desired=decision.get("desired"),
                observed=decision.get("observed"),
            )
            self.seconds.append(row)
            self._progress(row)
            _, next_users = self.phase_at(float(t))
            if next_users != load.users and t < self.options.total_s:
                load.set_users(next_users)

    def _progress(self, row: Second) -> None:
        servers = "?" if row.servers is None else str(row.servers)
        if row.draining:
            servers += f" (+{row.draining} draining)"
        observed = "-" if row.observed is None else f"{row.observed:.2f}"
        console.print(
            f"[{row.t:>3}/{self.options.total_s}] {row.phase:<9} users {row.users:>3}  "
            f"{row.requests:>5} req/s  p99 {_fmt(row.p99_ms):>7} ms  failed {row.failed:>3}  "
            f"servers {servers:<16} desired {_fmt_int(row.desired)}  in flight/server {observed}",
            markup=False,
        )

    def phase_rows(self) -> list[dict[str, Any]]:
        """Per phase: requests, req/s, latency, failures, servers (min / max / at the end)."""
        rows: list[dict[str, Any]] = []
        load = self.load
        start = 0.0
        for name, users, seconds in self.options.phases:
            end = start + seconds
            done = [d for d in (load.done if load else []) if start <= d.at < end]
            latencies = [d.latency_s for d in done if d.ok]
            servers = [
                s.servers for s in self.seconds if start < s.t <= end and s.servers is not None
            ]
            rows.append(
                {
                    "phase": name,
                    "users": users,
                    "from_s": start,
                    "to_s": end,
                    "requests": len(latencies),
                    "requests_per_s": round(len(latencies) / seconds, 1),
                    "failed": sum(1 for d in done if not d.ok),
                    "p50_ms": _ms(percentile(latencies, 50)),
                    "p99_ms": _ms(percentile(latencies, 99)),
                    "servers_min": min(servers) if servers else None,
                    "servers_max": max(servers) if servers else None,
                    "servers_at_end": servers[-1] if servers else None,
                }
            )
            start = end
        return rows

    def milestones(self) -> dict[str, float | int | None]:
        """Seconds from each step to the first sign of the autoscaler's answer."""
        lead = self.options.lead
        down_at = lead + self.options.phase
        high = [s for s in self.seconds if lead < s.t <= down_at and s.servers is not None]
        after = [s for s in self.seconds if s.t > down_at and s.servers is not None]
        peak = max((s.servers or 0 for s in high), default=None)

        def first(rows: list[Second], test: Any, since: float) -> float | None:
            for s in rows:
                if test(s):
                    return round(s.t - since, 1)
            return None

        return {
            "step_up_to_first_new_server_s": first(high, lambda s: s.servers > 1, lead),
            "step_up_to_peak_servers_s": (
                first(high, lambda s: s.servers == peak, lead) if peak else None
            ),
            "peak_servers": peak,
            "step_down_to_first_removal_s": (
                first(after, lambda s: s.servers < peak, down_at) if peak else None
            ),
            "step_down_to_min_servers_s": first(
                after, lambda s: s.servers == MIN_SERVERS and not s.draining, down_at
            ),
        }

    def table(self) -> Table:
        table = Table(title="Autoscaling under a step load (latency in ms)")
        table.add_column("phase")
        for name in (
            "users",
            "seconds",
            "requests",
            "req/s",
            "p50",
            "p99",
            "failed",
            "servers min",
            "servers max",
            "servers at end",
        ):
            table.add_column(name, justify="right")
        for row in self.phase_rows():
            table.add_row(
                row["phase"],
                str(row["users"]),
                f"{row['to_s'] - row['from_s']:g}",
                str(row["requests"]),
                f"{row['requests_per_s']:.0f}",
                _fmt(row["p50_ms"]),
                _fmt(row["p99_ms"]),
                str(row["failed"]),
                _fmt_int(row["servers_min"]),
                _fmt_int(row["servers_max"]),
                _fmt_int(row["servers_at_end"]),
            )
        return table

    def notes(self) -> list[str]:
        options = self.options
        scale = ", ".join(f"{key} {value}" for key, value in AUTOSCALE.items())
        return [
            f"stack: 1 proxy, 1 server at {options.latency} to start; autoscale {scale} "
            "(signal: in flight per server)",
            f"load: closed-loop users on one aiohttp session against the TCP listener, "
            f"{options.low} users for {options.lead:g} s, {options.high} for "
            f"{options.phase:g} s, {options.low} for {options.phase:g} s; "
            f"request timeout {options.request_timeout:g} s",
            "servers: ready servers of proxy-0 from GET /status on the control socket, "
            "read once a second (draining ones counted apart)",
            f"host: {os.cpu_count()} CPUs shared by the client and every lbstack process",
        ]

    def to_json(self) -> dict[str, Any]:
        options = self.options
        load = self.load
        return {
            "benchmark": "autoscale",
            "generated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "python": platform.python_version(),
                "aiohttp": aiohttp.__version__,
            },
            "options": {
                "low_users": options.low,
                "high_users": options.high,
                "lead_s": options.lead,
                "phase_s": options.phase,
                "latency": options.latency,
                "request_timeout_s": options.request_timeout,
                "autoscale": AUTOSCALE,
            },
            "notes": self.notes(),
            "phases": self.phase_rows(),
            "milestones": self.milestones(),
            "errors": dict(load.errors) if load else {},
            "seconds": [asdict(s) for s in self.seconds],
            "scale_events": self.scale_log,
            "lbstack_log_problems": self.log_problems,
        }


def _scale_lines(log_file: Path) -> list[str]:
    """The autoscaler's scale steps in the stack's log (not its "stays at" decisions)."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [
        line for line in lines if f"{GROUP}: load" in line and " servers" in line and " -> " in line
    ]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt_any(value: float | None) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.1f}"


def _fmt_int(value: int | None) -> str:
    return "-" if value is None else str(value)


def plot(bench: Bench, path: Path) -> None:
    """Offered load and servers on the left axis, p99 on the right, against time."""
    import matplotlib  # noqa: PLC0415 (only needed here; the Agg backend first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = bench.seconds
    t = [s.t for s in rows]
    figure, left = plt.subplots(figsize=(11, 5.5), dpi=110)
    left.step(
        t, [s.users for s in rows], where="pre", color="tab:blue", label="offered load (users)"
    )
    left.step(
        t,
        [math.nan if s.servers is None else s.servers for s in rows],
        where="pre",
        color="tab:green",
        linewidth=2.2,
        label="servers (ready)",
    )
    left.step(
        t,
        [math.nan if s.desired is None else s.desired for s in rows],
        where="pre",
        color="tab:green",
        linestyle=":",
        label="desired servers",
    )
    left.set_xlabel("time (s)")
    left.set_ylabel("users / servers")
    left.set_ylim(0, max([*(s.users for s in rows), MAX_SERVERS, 1]) * 1.1)
    right = left.twinx()
    right.plot(
        t,
        [math.nan if s.p99_ms is None else s.p99_ms for s in rows],
        color="tab:red",
        marker=".",
        label="p99 of the second (ms)",
    )
    right.set_ylabel("p99 latency (ms)")
    right.set_ylim(bottom=0)
    failed = [(s.t, s.failed) for s in rows if s.failed]
    if failed:
        left.scatter(
            [f[0] for f in failed], [0.2] * len(failed), marker="x", color="black", label="failures"
        )
    lines = left.get_legend_handles_labels()
    more = right.get_legend_handles_labels()
    left.legend(lines[0] + more[0], lines[1] + more[1], loc="center right", fontsize=8)
    options = bench.options
    left.set_title(
        f"lbstack autoscaling: {options.low} → {options.high} → {options.low} users, "
        f"servers at {options.latency}, target {TARGET_IN_FLIGHT} in flight per server"
    )
    left.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The command line → ``Options``."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.autoscale_bench",
        description="The autoscaler under a step load: servers, p99 and failures per second.",
    )
    parser.add_argument(
        "--low", type=options.positive_int, default=2, help="users before/after (2)"
    )
    parser.add_argument(
        "--high", type=options.positive_int, default=16, help="users in the step (16)"
    )
    parser.add_argument(
        "--lead", type=options.seconds, default=10.0, help="seconds at --low before the step (10)"
    )
    parser.add_argument(
        "--phase", type=options.seconds, default=30.0, help="seconds of the step and after it (30)"
    )
    parser.add_argument("--latency", default="50ms", help="the servers' latency (50ms)")
    parser.add_argument(
        "--request-timeout", type=options.seconds, default=10.0, help="per request, s (10)"
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the results JSON"
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="where to save the PNG")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (config, log)")
    args = parser.parse_args(argv)
    return Options(
        low=args.low,
        high=args.high,
        lead=args.lead,
        phase=args.phase,
        latency=args.latency,
        request_timeout=args.request_timeout,
        json_path=args.json,
        plot_path=args.plot,
        keep=args.keep,
    )


async def amain(options: Options) -> int:
    """Run the benchmark; the process exit status."""
    bench = Bench(options)
    console.print(
        f"autoscale bench: {options.low} → {options.high} → {options.low} users "
        f"({options.lead:g} s + {options.phase:g} s + {options.phase:g} s), "
        f"servers at {options.latency}",
        markup=False,
    )
    try:
        await bench.run()
    except TopologyError as exc:
        console.print(f"error: {exc}", markup=False)
        return 1
    console.print(bench.table())
    milestones = bench.milestones()
    console.print(
        "  scaling: " + ", ".join(f"{key} {_fmt_any(value)}" for key, value in milestones.items()),
        markup=False,
    )
    for note in bench.notes():
        console.print(f"  * {note}", markup=False)
    for line in bench.scale_log:
        console.print(f"  > {line.strip()}", markup=False)
    if bench.load is not None and bench.load.errors:
        console.print(f"  ! request errors: {bench.load.errors}", markup=False)
    if bench.log_problems:
        console.print(
            f"  ! lbstack log: {len(bench.log_problems)} warning/error lines, "
            f"first: {bench.log_problems[0].strip()}",
            markup=False,
        )
    if bench.workdir is not None and options.keep:
        console.print(f"  kept {bench.workdir} (config and log)", markup=False)
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(json.dumps(bench.to_json(), indent=2) + "\n")
    console.print(f"wrote {options.json_path}", markup=False)
    plot(bench, options.plot_path)
    console.print(f"wrote {options.plot_path}", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    run_main(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
