"""Routing and failover under a slow or stalling server: lbstack's policies against nginx.

lbstack's default topology (balancer → 2 proxies → 3 servers at 5 ms); wrk loads the
balancer's TCP listener in a closed loop (64 connections, 2 threads). Scenarios:

* ``degraded``: server-0-2 answers in 50 ms (a fault posted once the stack is up);
* ``stall``: server-0-2 hangs for 1 s every 5 s, the first 1 s into a measured run.

Each lbstack routing policy gets a stack of its own (``[balancer]`` and ``[proxy]``
``policy``); nginx, round robin then ``least_conn``, runs in the same shape over the
*same* server processes as the first stack that comes up, so it meets the same slow
server or the same stalls. A run that fails becomes a row with an error; the others go
on. Latencies are what the requests had, and wrk's corrected p99 beside them (see
``loadtests.wrk``); each p99 is also given over nginx least_conn's in the same scenario.

Run it from the project root: ``.venv/bin/python -m loadtests.routing_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from functools import partial

from lbstack.client import AdminClient, cancel
from lbstack.config import PolicyName
from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import Report, Row, find, ratio, say
from loadtests.scenarios import NGINX_LC, POLICIES, SCENARIOS, Fault, Scenario, Wrk
from loadtests.topology import kept, lbstack_up, missing, other_up, version
from loadtests.wrk import rounds

STALL_OFFSET = 1.0  # the first stall starts this long into a measured run
COLUMNS = ["system", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "req_per_s", "errors"]
COLUMNS += ["p99_vs_nginx_lc", "wrk_p99_ms", "wrk_p99_vs_nginx_lc"]


@contextlib.asynccontextmanager
async def stalls(admin: AdminClient, fault: Fault) -> AsyncIterator[Row]:
    """Hang the server for ``stall_for`` s every ``stall_every`` s while the block runs.

    Posts ``hang`` and ``clear`` to its admin socket itself: ``lbstack fault`` needs over a
    second to start, which would blur a 1 s stall. Yields the count of stalls and the
    most requests a stall held, filled in as they happen.
    """
    every = fault.stall_every
    assert every is not None
    row: Row = {"stalls": 0, "held_max": 0}

    async def timer() -> None:
        loop = asyncio.get_running_loop()
        origin = loop.time()
        for index in itertools.count():
            start = origin + STALL_OFFSET + index * every
            await asyncio.sleep(max(0.0, start - loop.time()))
            await admin.fault({"hang": True})
            row["stalls"] += 1
            await asyncio.sleep(fault.stall_for)
            await release()

    async def release() -> None:
        released = await admin.fault({"clear": True})
        row["held_max"] = max(row["held_max"], released.held)

    task = asyncio.create_task(timer())
    try:
        yield row
    finally:
        await cancel(task)
        await release()


async def measure(
    name: str,
    scenario: Scenario,
    policy: PolicyName,
    others: Sequence[str],
    report: Report,
    keep: bool,
) -> bool:
    """One policy's stack in scenario ``name``, and ``others`` over its servers; True
    once done (a run wrk could not make is a row with an error)."""
    fault = scenario.fault
    assert fault is not None
    topology = replace(scenario.topology, policy=policy)
    system = f"lbstack {policy}"
    with kept("lbr-", keep) as workdir:
        async with (
            lbstack_up(topology, workdir, report, label=f"{name} {system}") as lb,
            contextlib.AsyncExitStack() as stack,
        ):
            admin = lb.stack.admin(fault.server)
            if fault.latency is not None:
                await admin.fault({"latency": fault.latency})
            systems = [await lb.system(system)]
            for other in others:
                systems.append(
                    await stack.enter_async_context(other_up(other, lb.server_groups(), workdir))
                )
            during = partial(stalls, admin, fault) if fault.stall_every else None
            # wrk's request timeout stays well above a stall, so stalled requests count.
            timeout = max(10, int(fault.stall_for * 4) + 1)
            await rounds(
                systems, scenario, report, workdir, table=name, during=during, timeout=timeout
            )
    return True


async def amain(args: argparse.Namespace) -> int:
    report = Report("routing", {k: v for k, v in vars(args).items() if k not in ("json", "keep")})
    report.host |= {p: version(p) for p in ("wrk", "nginx")}
    if problem := missing("wrk"):
        say(problem)
        return 1
    nginx_missing = missing("nginx")
    for name in args.scenarios:
        scenario = replace(timed(SCENARIOS[name], args), load=Wrk((args.connections,)))
        others = [s for s in scenario.systems if not s.startswith("lbstack")]
        if nginx_missing:
            report.notes.append(f"nginx rows omitted: {nginx_missing}")
            others = []
        for policy in args.policies:
            work = measure(name, scenario, policy, others, report, args.keep)
            if await report.step(f"{name} {policy}", work):
                others = []  # measured over the first stack that came up
        rows = report.tables.get(name, [])
        reference = find(rows, system=NGINX_LC)
        for row in rows:
            row["p99_vs_nginx_lc"] = ratio(row.get("p99_ms"), reference.get("p99_ms"))
            row["wrk_p99_vs_nginx_lc"] = ratio(row.get("wrk_p99_ms"), reference.get("wrk_p99_ms"))
        report.table(name, rows, COLUMNS + (["stalls", "held_max"] if name == "stall" else []))
        p2c, rr = (find(rows, system=f"lbstack {p}") for p in ("p2c_ewma", "round_robin"))
        report.figures[f"{name}_p2c_ewma_p99_ms"] = p2c.get("p99_ms")
        rates = (p2c.get("req_per_s"), rr.get("req_per_s"))
        report.figures[f"{name}_p2c_ewma_rps_ratio"] = ratio(*rates)
    report.notes += [
        f"closed loop: wrk, {args.connections} connections, 2 threads, {args.duration:g} s "
        f"per run after {args.warmup:g} s warm-up; servers at 5 ms; degraded: server-0-2 at "
        "50 ms; stall: server-0-2 hangs 1 s every 5 s",
        "nginx: front + 2 proxies, worker_processes 1, upstream keepalive 64, over the "
        "same server processes as an lbstack stack",
    ]
    return report.finish(args.json)


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser("routing_bench", __doc__, "routing.json", SCENARIOS["degraded"])
    cli.add_argument("--connections", type=positive_int, default=64, help="wrk connections")
    kinds = ["degraded", "stall"]
    cli.add_argument("--scenarios", nargs="+", choices=kinds, default=kinds)
    cli.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
