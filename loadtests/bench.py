"""The forwarding path's cost against nginx: throughput, latency, CPU per request, memory.

One lbstack stack (``--proxies`` × ``--servers-per-proxy`` simulated servers at
``--latency``, zero by default) and nginx in the same shape over the *same* server
processes (scenario ``compare``), driven by wrk in alternating rounds at c=1 and
c=``--connections``; each figure is the median over the rounds. Around every run each
process's CPU time is read (psutil), giving CPU per request per tier; afterwards each
process's peak RSS.

Then, unless ``--skip-scale``, each on a stack of its own and no other load: 64 servers
behind one proxy against 3, with nginx (front + one proxy) over the same servers, and 64
again with the proxy's checks and scrapes off (``scale 1x3``, ``scale 1x64``, ``scale
1x64 quiet``): what a wide group costs, and what it costs whoever routes to it; and
``--hold`` keep-alive client connections held at once on the balancer's TCP listener,
each used twice (``hold``), with the balancer's memory per idle connection.

Run it from the project root: ``.venv/bin/python -m loadtests.bench`` (``make bench``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import psutil

from loadtests.loadgen import HeldConnections
from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import BenchError, Report, Row, find, medians, ratio, say
from loadtests.scenarios import NGINX_RR, SCENARIOS, Hold, Scenario, Topology, Wrk
from loadtests.topology import System, kept, lbstack_up, missing, other_up, version
from loadtests.wrk import rounds

SCALE = ("scale 1x3", "scale 1x64", "scale 1x64 quiet")
FD_MARGIN = 256  # files a process needs beside the held connections
HOLD_TIMEOUT = 180.0  # the whole connection-holding step, start-up excluded
WIDE_START_TIMEOUT = 240.0  # 64 servers take ~40 s to boot on 2 cores
CPU = ["cpu_us_front", "cpu_us_proxies", "cpu_us_servers", "cpu_us_supervisor", "cpu_us_total"]
COLUMNS = ["system", "c", "runs", "req_per_s", "p50_ms", "p99_ms", "errors", *CPU]


async def compare(args: argparse.Namespace, report: Report) -> None:
    """lbstack and nginx over the same servers, in alternating rounds at c=1 and c=N."""
    scenario = replace(
        timed(SCENARIOS["compare"], args),
        topology=Topology(args.proxies, args.servers_per_proxy, args.latency),
        load=Wrk((1, args.connections)),
    )
    with kept("lbb-", args.keep) as workdir:
        async with lbstack_up(scenario.topology, workdir, report, label="compare") as lb:
            lbstack = await lb.system()
            async with other_up(NGINX_RR, lb.server_groups(), workdir) as nginx:
                nginx.tiers["servers"] = lbstack.tiers["servers"]  # measured under both
                runs = await rounds([lbstack, nginx], scenario, report, workdir)
                peaks = {system.name: system.peak_rss_mib() for system in (lbstack, nginx)}
    report.tables["peak RSS per process, MiB"] = [{"system": s, **p} for s, p in peaks.items()]
    report.table(
        "peak RSS, MiB",
        [
            {"system": s, "processes": len(p), "min": min(p.values()), "max": max(p.values())}
            for s, p in peaks.items()
        ],
    )
    summary = report.table("medians over the rounds", medians(runs, ("system", "c")), COLUMNS)
    high = [find(summary, system=s, c=args.connections) for s in ("lbstack", NGINX_RR)]
    low = [find(summary, system=s, c=1) for s in ("lbstack", NGINX_RR)]
    report.figures["throughput_ratio"] = ratio(high[0].get("req_per_s"), high[1].get("req_per_s"))
    report.figures["p50_ratio_c1"] = ratio(low[0].get("p50_ms"), low[1].get("p50_ms"))
    report.figures["peak_rss_mib"] = round(max(peaks["lbstack"].values()), 1)


async def scale(args: argparse.Namespace, report: Report) -> None:
    """Throughput with 64 servers behind one proxy against 3, each stack of its own."""
    for name in SCALE:
        scenario: Scenario = SCENARIOS[name]
        scenario = replace(
            timed(scenario, args),
            warmup=max(args.warmup, scenario.warmup),  # restarted servers ramp in slowly
            load=Wrk((args.connections,)),
        )
        with kept("lbs-", args.keep) as workdir:
            async with (
                lbstack_up(
                    scenario.topology, workdir, report, label=name, start_timeout=WIDE_START_TIMEOUT
                ) as lb,
                contextlib.AsyncExitStack() as others,
            ):
                systems: list[System] = [await lb.system(f"{name}: lbstack")]
                for other in scenario.systems[1:]:
                    system = await others.enter_async_context(
                        other_up(other, lb.server_groups(), workdir)
                    )
                    system.name = f"{name}: {other}"
                    system.tiers["servers"] = systems[0].tiers["servers"]
                    systems.append(system)
                await rounds(systems, scenario, report, workdir, table="scale runs")
    runs = report.tables.get("scale runs", [])
    summary = report.table("scale", medians(runs, ("system",)), COLUMNS[:1] + COLUMNS[2:])

    def rate(system: str) -> float | None:
        return find(summary, system=system).get("req_per_s")

    def cost(narrow: str, wide: str) -> float | None:
        lost = ratio(rate(wide), rate(narrow))
        return None if lost is None else round((1 - lost) * 100, 1)

    figures = report.figures
    figures["scale_cost_pct"] = cost("scale 1x3: lbstack", "scale 1x64: lbstack")
    figures["scale_cost_quiet_pct"] = cost("scale 1x3: lbstack", "scale 1x64 quiet: lbstack")
    figures["nginx_scale_cost_pct"] = cost(f"scale 1x3: {NGINX_RR}", f"scale 1x64: {NGINX_RR}")
    ours, theirs = figures["scale_cost_pct"], figures["nginx_scale_cost_pct"]
    if ours is not None and theirs is not None and theirs < 100:
        # What lbstack loses with the wide group beyond what nginx loses over it.
        figures["scale_cost_beyond_nginx_pct"] = round((1 - (100 - ours) / (100 - theirs)) * 100, 1)


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft open-files limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def hold(args: argparse.Namespace, report: Report) -> None:
    """The balancer holding ``--hold`` idle keep-alive client connections at once."""
    scenario = SCENARIOS["hold"]
    assert isinstance(scenario.load, Hold)
    load = replace(scenario.load, connections=args.hold)
    needed = load.connections + FD_MARGIN
    if raise_fd_limit()[0] < needed:
        raise BenchError(
            f"{load.connections} connections need {needed} open files: raise the hard "
            "limit (ulimit -Hn, or LimitNOFILE / limits.conf) and run again"
        )
    topology = replace(
        scenario.topology, proxies=args.proxies, servers_per_proxy=args.servers_per_proxy
    )
    with kept("lbh-", args.keep) as workdir:
        async with lbstack_up(topology, workdir, report, label="hold") as lb:
            balancer = (await lb.system()).tiers["front"]["balancer-0"]
            limit = balancer.rlimit(psutil.RLIMIT_NOFILE)
            if 0 <= limit[0] < needed:
                raise BenchError(f"the balancer may open only {limit[0]} files, {needed} needed")
            held, memory, fds = HeldConnections(lb.url, at_once=load.at_once), [], []

            def read() -> None:
                memory.append(balancer.memory_info().rss / 2**20)
                fds.append(balancer.num_fds())

            try:
                async with asyncio.timeout(HOLD_TIMEOUT):
                    # Warm the path with as many connections as will be busy at once: the
                    # upstream pools then have their size before the baseline is read.
                    await held.open(load.at_once)
                    await held.close()
                    await asyncio.sleep(1.0)
                    read()
                    opened = await held.open(load.connections)
                    await asyncio.sleep(1.0)  # the balancer settles, every connection idle
                    read()
                    again = await held.again()
                    read()
            finally:
                await held.close()
            restarts = (await lb.stack.component("balancer-0")).restarts
    phases: list[Row] = [
        {"phase": "opened, a GET on each", **vars(opened)},
        {"phase": "a 2nd GET on each, all held", **vars(again)},
    ]
    report.table(f"{load.connections:,} keep-alive connections", phases)
    figures: dict[str, Any] = {
        "hold_balancer_rss_mib": [round(m, 1) for m in memory],  # before, holding, after
        "hold_balancer_fds": fds,
        "hold_kib_per_connection": round((memory[1] - memory[0]) * 1024 / max(opened.ok, 1), 1),
        "hold_errors": dict(held.result.errors),
        "hold_balancer_restarts": restarts,
        # Connections not held through both GETs, or any error on the way (warm-up too).
        "hold_failed": max(load.connections - again.ok, held.result.error_count) + restarts,
    }
    report.figures |= figures


async def amain(args: argparse.Namespace) -> int:
    if problem := missing("wrk", "nginx"):
        say(problem)
        return 1
    options = {k: v for k, v in vars(args).items() if k not in ("json", "keep")}
    report = Report("bench", options)
    report.host |= {program: version(program) for program in ("wrk", "nginx")}
    if not args.only_scale:
        await report.step("compare", compare(args, report))
    if not args.skip_scale:
        await report.step("scale: servers", scale(args, report))
        await report.step("scale: connections", hold(args, report))
    report.notes += [
        "wrk closed loop, 2 threads (1 at c=1); rounds alternate lbstack, nginx; latencies "
        "as the requests had them (wrk's coordinated-omission correction undone, "
        "loadtests/wrk.py), wrk p99 is wrk's own; errors = non-2xx + socket errors",
        "nginx: front + one instance per proxy, worker_processes 1, round robin, upstream "
        "keepalive 64, over the same servers; lbstack: default policy (p2c_ewma), checks, "
        "scrapes",
        "CPU µs/req: user+system time of every process of a tier (nginx: masters and "
        "workers) over a run / its requests; the servers are measured under both",
        "peak RSS: VmHWM after the rounds; hold: balancer RSS before → holding → after "
        "the 2nd GET, KiB per idle connection = (holding − before) / connections",
    ]
    return report.finish(args.json)


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser("bench", __doc__, "bench.json", SCENARIOS["compare"])
    cli.add_argument("--latency", default="0ms", help="server latency (0ms)")
    cli.add_argument("--connections", type=positive_int, default=64, help="wrk's loaded c (64)")
    cli.add_argument("--proxies", type=positive_int, default=2, help="proxies (2)")
    cli.add_argument("--servers-per-proxy", type=positive_int, default=3, help="(3)")
    cli.add_argument("--hold", type=positive_int, default=5000, help="connections to hold")
    skip = cli.add_mutually_exclusive_group()
    skip.add_argument("--skip-scale", action="store_true", help="skip the scale figures")
    skip.add_argument("--only-scale", action="store_true", help="only the scale figures")
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
