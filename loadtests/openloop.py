"""Routing judged under open-loop load below saturation: lbstack against nginx and HAProxy.

Closed-loop load at saturation measures CPU, not routing. Here requests arrive at
Poisson times at fixed rates (scenario ``openloop``: 400, 900 and 1200 req/s), each for
``--duration`` s after ``--warmup`` s, from ``loadtests.loadgen`` in a process of its own;
every latency counts from the request's *scheduled* start (no coordinated omission), and
the generator's own lateness is reported, so a generator that fell behind shows.

Six simulated servers at 5 ms, server-0-2 slowed to 50 ms. lbstack (``p2c_ewma`` on the
balancer and the proxies), nginx ``least_conn`` and HAProxy ``leastconn`` in the same
shape over the *same* server processes, all up throughout; their order rotates from one
rate to the next so drift spreads evenly, and every system meets the same arrival times
at a rate (one seed per rate). A system that is not installed is skipped.

Run it from the project root: ``.venv/bin/python -m loadtests.openloop``
(``--duration 3 --rates 900`` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from loadtests.loadgen import DEFAULT_GRACE
from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import BenchError, Report, Row, find, ratio
from loadtests.scenarios import SCENARIOS, SLOW_START_S, Poisson, Scenario
from loadtests.topology import kept, lbstack_up, missing, other_up, run_program, version

ROOT = Path(__file__).resolve().parent.parent
LATE_MS = 2.0  # generator lateness p99 above this: it could not keep its schedule
SPAWN_MARGIN = 30.0  # the generator's start-up and exit, beyond its own bounds
COLUMNS = ["rate", "system", "sent", "errors", "req_per_s", "p50_ms", "p99_ms", "p999_ms"]
COLUMNS += ["max_ms", "late_p99_ms", "behind", "generator_cpu"]


async def generate(
    url: str, rate: int, seed: int, scenario: Scenario, unix_path: str | None = None
) -> Row:
    """One open-loop run by ``loadtests.loadgen`` in a process of its own: its figures."""
    assert isinstance(scenario.load, Poisson)
    bound = scenario.warmup + scenario.duration + DEFAULT_GRACE + SPAWN_MARGIN
    run = {"url": url, "rate": rate, "seed": seed, "connections": scenario.load.connections}
    run |= {"unix_path": unix_path} if unix_path else {}
    run |= {"duration": scenario.duration, "warmup": scenario.warmup}
    argv = (sys.executable, "-m", "loadtests.loadgen", json.dumps(run))
    status, out, err = await run_program(*argv, timeout=bound, cwd=ROOT)
    if status != 0 or not out.strip():
        raise BenchError(f"load generator failed ({status}): {err[-500:]}")
    figures: Row = json.loads(out.strip().splitlines()[-1])
    return figures


async def amain(args: argparse.Namespace) -> int:
    scenario = timed(SCENARIOS["openloop"], args)
    systems = tuple(s for s in scenario.systems if s.split()[0] in args.systems)
    scenario = replace(scenario, load=Poisson(tuple(args.rates), args.connections))
    options = {k: v for k, v in vars(args).items() if k not in ("json", "keep", "rounds")}
    report = Report("openloop", options)
    report.host |= {p: version(p) for p in ("nginx", "haproxy")}
    fault = scenario.fault
    assert fault is not None
    with kept("lbo-", args.keep) as workdir:
        async with (
            lbstack_up(scenario.topology, workdir, report) as lb,
            contextlib.AsyncExitStack() as others,
        ):
            ready_at = time.monotonic()
            await lb.stack.admin(fault.server).fault({"latency": fault.latency})
            urls = {}
            for name in systems:
                if name == "lbstack":
                    urls[name] = lb.url
                elif problem := missing(name.split()[0]):
                    report.notes.append(f"{name} skipped: {problem}")
                else:
                    other = others.enter_async_context(other_up(name, lb.server_groups(), workdir))
                    if started := await report.step(f"starting {name}", other):
                        urls[name] = started.url
            # lbstack's new upstreams ramp up over its slow start: measure after it.
            await asyncio.sleep(max(0.0, ready_at + SLOW_START_S - time.monotonic()))
            names = list(urls)
            for index, rate in enumerate(args.rates):
                shift = index % len(names)
                for name in names[shift:] + names[:shift]:
                    run = generate(urls[name], rate, args.seed + index, scenario)
                    figures = await report.step(f"{name} at {rate}/s", run)
                    if figures is not None:
                        figures["behind"] = (figures.get("late_p99_ms") or 0.0) > LATE_MS
                        report.row("runs", {"rate": rate, "system": name, **figures})
    runs = report.tables.get("runs", [])
    runs.sort(key=lambda r: (r["rate"], systems.index(r["system"])))
    report.table("runs", runs, COLUMNS)
    for rate in args.rates:
        p99 = {name: find(runs, rate=rate, system=name).get("p99_ms") for name in systems}
        report.figures[f"lbstack_p99_ms_at_{rate}"] = p99.get("lbstack")
        for name in systems[1:]:
            kind = name.split()[0]
            report.figures[f"p99_ratio_at_{rate}_to_{kind}"] = ratio(p99.get("lbstack"), p99[name])
    report.notes += [
        f"latency from each request's scheduled start; 'late p99': how late the generator "
        f"started requests (timers ~1 ms); 'behind': above {LATE_MS:g} ms, it fell behind "
        "its schedule and that lag is in the latencies",
        f"6 servers at {scenario.topology.latency}, {fault.server} at {fault.latency}; nginx "
        "and HAProxy: front + 2 proxies, one worker or thread each, upstream keep-alive",
    ]
    return report.finish(args.json)


def poisson_parser(name: str, doc: str | None, scenario: Scenario) -> argparse.ArgumentParser:
    """The command line of an open-loop benchmark: the shared options, then the rates,
    connections and seed of ``scenario``'s Poisson load."""
    assert isinstance(scenario.load, Poisson)
    cli = parser(name, doc, f"{name.removesuffix('_bench')}.json", scenario)
    cli.add_argument("--rates", nargs="+", type=positive_int, default=list(scenario.load.rates))
    cli.add_argument("--connections", type=positive_int, default=scenario.load.connections)
    cli.add_argument("--seed", type=int, default=1, help="arrival times' seed (1)")
    return cli


def main(argv: Sequence[str] | None = None) -> None:
    cli = poisson_parser("openloop", __doc__, SCENARIOS["openloop"])
    kinds = ["lbstack", "nginx", "haproxy"]
    cli.add_argument("--systems", nargs="+", choices=kinds, default=kinds)
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
