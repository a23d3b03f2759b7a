"""The autoscaler under a step load: offered load, servers, p99 and failures, second by second.

One ``lbstack up`` (scenario ``autoscale``: 1 proxy, 1 simulated server at 50 ms,
``[autoscale]`` on: min 1, max 6, target 2 requests in flight per server, interval 1 s,
window 3 s, scale_down_window 10 s) with a TCP listener on loopback. Closed-loop users
(``loadtests.loadgen``, each sending its next request once the last has answered) make
a step load: ``--low`` users for ``--lead`` s, ``--high`` for ``--phase`` s, then
``--low`` again for ``--phase`` s.

Every second: the users, the requests answered in that second, their p99, the failed
ones, and the group's servers from the supervisor's status (ready, draining, and the
autoscaler's last ``desired``). Prints one line per second, a table per phase, and
writes JSON and a PNG plot (matplotlib, Agg backend).

Run it from the project root: ``.venv/bin/python -m loadtests.autoscale_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from lbstack.api import StackStatus
from lbstack.errors import ControlError
from loadtests.loadgen import Histogram, Result, closed_loop
from loadtests.options import parser, positive_int, run_main, seconds
from loadtests.report import RESULTS, Report, Row, say
from loadtests.scenarios import AUTOSCALE, SCENARIOS, Users
from loadtests.topology import kept, lbstack_up

GROUP = "proxy-0"
PHASES = ("low", "high", "low again")
STATUS_TIMEOUT = 0.8  # a status read must not hold up the one-second ticker


def second_row(t: int, phase: str, users: int, load: Result, status: StackStatus | None) -> Row:
    """What second ``t`` (``[t - 1, t)``) answered, and the group then."""
    done, failed, latency = load.seconds[t - 1] if len(load.seconds) >= t else (0, 0, Histogram())
    servers = (
        [c for c in status.components if (c.role, c.group) == ("server", GROUP)] if status else []
    )
    decision = status.autoscale.get(GROUP) if status else None
    return {
        "t": t,
        "phase": phase,
        "users": users,
        "requests": done,
        "failed": failed,
        "p50_ms": latency.ms(50),
        "p99_ms": latency.ms(99),
        "servers": sum(c.state == "ready" for c in servers) if status else None,
        "draining": sum(c.state == "draining" for c in servers) if status else None,
        "desired": decision.desired if decision else None,
        "in_flight_per_server": decision.observed if decision else None,
    }


def phases(steps: Sequence[tuple[int, float]], load: Result, rows: Sequence[Row]) -> list[Row]:
    """Per phase: requests, req/s, latency, failures, servers (min, max, at the end)."""
    out, start = [], 0
    for name, (users, length) in zip(PHASES, steps, strict=True):
        end = start + round(length)
        latency, failed = Histogram(), 0
        for _, fails, histogram in load.seconds[start:end]:
            latency.merge(histogram)
            failed += fails
        servers = [r["servers"] for r in rows[start:end] if r["servers"] is not None]
        out.append(
            {
                "phase": name,
                "users": users,
                "seconds": length,
                "requests": latency.count,
                "req_per_s": latency.count / length,
                "p50_ms": latency.ms(50),
                "p99_ms": latency.ms(99),
                "failed": failed,
                "servers": [min(servers), max(servers), servers[-1]] if servers else None,
            }
        )
        start = end
    return out


def milestones(lead: float, phase: float, rows: Sequence[Row]) -> dict[str, float | None]:
    """Seconds from each step to the first signs of the autoscaler's answer."""
    up = [r for r in rows if lead < r["t"] <= lead + phase and r["servers"] is not None]
    down = [r for r in rows if r["t"] > lead + phase and r["servers"] is not None]
    peak = max((r["servers"] for r in up), default=0)

    def first(rows: Sequence[Row], since: float, test: Callable[[Row], bool]) -> float | None:
        return next((r["t"] - since for r in rows if test(r)), None)

    return {
        "step_up_to_first_new_server_s": first(up, lead, lambda r: r["servers"] > 1),
        "step_up_to_peak_servers_s": first(up, lead, lambda r: r["servers"] == peak),
        "peak_servers": peak,
        "step_down_to_first_removal_s": first(down, lead + phase, lambda r: r["servers"] < peak),
        "step_down_to_min_servers_s": first(
            down, lead + phase, lambda r: r["servers"] == AUTOSCALE["min"] and not r["draining"]
        ),
    }


async def amain(args: argparse.Namespace) -> int:
    steps = ((args.low, args.lead), (args.high, args.phase), (args.low, args.phase))
    scenario = replace(SCENARIOS["autoscale"], load=Users(steps))
    report = Report("autoscale", {"steps": steps, "latency": scenario.topology.latency})
    report.options["autoscale"] = dict(AUTOSCALE)
    with kept("lba-", args.keep) as workdir:
        async with lbstack_up(scenario.topology, workdir, report) as lb:
            load, loop = Result(origin=time.perf_counter()), asyncio.get_running_loop()
            origin, end = loop.time(), 0.0
            async with asyncio.TaskGroup() as users:  # a failure here stops the users
                users.create_task(
                    closed_loop(lb.url, steps, timeout=args.request_timeout, result=load)
                )
                for (count, length), phase in zip(steps, PHASES, strict=True):
                    start, end = end, end + length
                    for t in range(round(start) + 1, round(end) + 1):
                        await asyncio.sleep(max(0.0, origin + t - loop.time()))
                        try:
                            now = await asyncio.wait_for(lb.stack.status(), STATUS_TIMEOUT)
                        except (ControlError, TimeoutError):
                            now = None
                        report.row("seconds", second_row(t, phase, count, load, now))
            log = lb.stack.logs().splitlines()
    rows = report.tables["seconds"]
    report.table("phases", phases(steps, load, rows))
    report.figures |= milestones(args.lead, args.phase, rows)
    report.figures["errors"] = dict(load.errors)
    report.notes += [
        line for line in log if f"{GROUP}: " in line and " -> " in line and " servers" in line
    ]
    status = report.finish(args.json)
    plot(report, args.plot)
    return status


def plot(report: Report, path: Path) -> None:
    """Offered load and servers on the left axis, p99 on the right, against time."""
    import matplotlib  # noqa: PLC0415 (only needed here; the Agg backend first)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = report.tables["seconds"]
    t = [r["t"] for r in rows]

    def series(key: str) -> list[float]:
        return [math.nan if r[key] is None else r[key] for r in rows]

    figure, left = plt.subplots(figsize=(11, 5.5), dpi=110)
    left.step(t, series("users"), where="pre", color="tab:blue", label="offered load (users)")
    left.step(t, series("servers"), where="pre", color="tab:green", lw=2.2, label="servers")
    left.step(t, series("desired"), where="pre", color="tab:green", ls=":", label="desired")
    left.set(xlabel="time (s)", ylabel="users / servers", ylim=(0, max(series("users")) * 1.1))
    right = left.twinx()
    right.plot(t, series("p99_ms"), color="tab:red", marker=".", label="p99 of the second (ms)")
    right.set(ylabel="p99 latency (ms)", ylim=(0, None))
    lines, labels = left.get_legend_handles_labels()
    more_lines, more_labels = right.get_legend_handles_labels()
    left.legend(lines + more_lines, labels + more_labels, loc="center right", fontsize=8)
    left.set_title(f"lbstack autoscaling under a step load ({report.options['steps']})")
    left.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    say(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    load = SCENARIOS["autoscale"].load
    assert isinstance(load, Users)
    (low, lead), (high, phase), _ = load.steps
    cli = parser("autoscale_bench", __doc__, "autoscale.json")
    cli.add_argument("--low", type=positive_int, default=low, help="users before and after")
    cli.add_argument("--high", type=positive_int, default=high, help="users in the step")
    cli.add_argument("--lead", type=seconds, default=lead, help="s at --low first")
    cli.add_argument("--phase", type=seconds, default=phase, help="s of the step and after")
    cli.add_argument("--request-timeout", type=seconds, default=10.0, help="per request, s")
    cli.add_argument("--plot", type=Path, default=RESULTS / "autoscale.png", help="the PNG")
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
