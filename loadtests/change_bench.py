"""Planned changes under load: reload, rolling restart and upgrade, timed and counted.

A stack (scenario ``changes``: 2 proxies × ``--servers`` simulated servers at 1 ms)
takes a bounded stream of GETs and 4 KiB POSTs (a POST is never retried by the stack,
so it shows any connection closed under a router) from ``--clients`` closed-loop users
while each change runs in turn:

* ``lbstack reload`` after the config's proxy policy changed (both proxies replaced);
* ``lbstack restart --rolling`` (every child replaced, one at a time);
* ``lbstack upgrade --supervisor-only`` (the supervisor re-executes, children adopted);
* ``lbstack upgrade`` (the same, then every child rolled onto the new code).

For each it prints how long the command took and what the stream got meanwhile, and
writes JSON; the exit status is 1 if any request failed.

Run it from the project root: ``.venv/bin/python -m loadtests.change_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

from loadtests.loadgen import closed_loop
from loadtests.options import parser, positive_int, run_main
from loadtests.report import BenchError, Report
from loadtests.scenarios import RELOADED, SCENARIOS, Scenario, Users
from loadtests.topology import Lbstack, kept, lbstack_up, run_program


async def change(lb: Lbstack, command: Sequence[str], scenario: Scenario, report: Report) -> None:
    """Run ``lbstack COMMAND`` while the users load the stack; one row of figures."""
    load = scenario.load
    assert isinstance(load, Users)
    ((_, bound),) = load.steps
    stop = asyncio.Event()
    stream = asyncio.create_task(
        closed_loop(lb.url, load.steps, post_bytes=load.post_bytes, stop=stop)
    )
    started = time.monotonic()
    try:
        argv = (sys.executable, "-m", "lbstack", *command, "--run-dir", str(lb.stack.run_dir))
        status, _, err = await run_program(*argv, timeout=bound)
    finally:
        took = time.monotonic() - started
        stop.set()
        result = await stream
    row = {"change": " ".join(("lbstack", *command)), "exit": status}
    failed = result.error_count
    report.row(
        "changes",
        row
        | {
            "seconds": took,
            "requests": result.completed + failed,
            "failed": failed,
            "errors": dict(result.errors),
        },
    )
    if status != 0:
        raise BenchError(f"{row['change']} exited with {status}: {err}")


async def amain(args: argparse.Namespace) -> int:
    scenario = SCENARIOS["changes"]
    assert isinstance(scenario.load, Users)
    topology = replace(scenario.topology, servers_per_proxy=args.servers)
    ((_, bound),) = scenario.load.steps
    scenario = replace(
        scenario, topology=topology, load=replace(scenario.load, steps=((args.clients, bound),))
    )
    report = Report("changes", {"clients": args.clients, "servers_per_proxy": args.servers})
    with kept("lbc-", args.keep) as workdir:
        async with lbstack_up(topology, workdir, report) as lb:
            lb.stack.config_file.write_text(topology.toml(RELOADED))
            for command in scenario.changes:
                await report.step(" ".join(command), change(lb, command, scenario, report))
    rows = report.table("changes", report.tables.get("changes", []))
    report.figures["failed"] = sum(row["failed"] for row in rows)
    status = report.finish(args.json)
    return status or int(report.figures["failed"] > 0)


def main(argv: Sequence[str] | None = None) -> None:
    scenario = SCENARIOS["changes"]
    assert isinstance(scenario.load, Users)
    cli = parser("change_bench", __doc__, "changes.json")
    users = scenario.load.steps[0][0]
    cli.add_argument("--clients", type=positive_int, default=users, help="closed-loop users")
    servers = scenario.topology.servers_per_proxy
    cli.add_argument("--servers", type=positive_int, default=servers, help="servers per proxy")
    run_main(amain, cli, argv)


if __name__ == "__main__":
    main()
