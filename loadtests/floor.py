"""Where aiohttp sets the floor: one forwarding hop, lbstack's against a bare aiohttp one.

Three processes are loaded by wrk over TCP at c=``--connections``, in alternating
rounds, each alone (scenario ``floor``):

* ``lbstack``: the balancer of a running stack (1 proxy × 3 servers, zero latency),
  i.e. lbstack's forwarding core with its routing, health, metrics and headers;
* ``aiohttp``: the plainest aiohttp forwarder there is (``web.Server`` plus
  ``ClientSession.request``, hop-by-hop headers dropped, body read and returned), in
  front of the very same proxy as the balancer;
* ``server``: a bare aiohttp server answering a fixed body itself — aiohttp's server
  side alone, the part of a hop no forwarder can avoid.

For each: requests per second, the process's CPU time per request, and a py-spy profile
of it under the same load, every sample attributed by its innermost frame to a group
(aiohttp's server side, its client side, lbstack's own code, ...); the groups' shares
times the CPU per request give µs per request by group.

Run it from the project root: ``.venv/bin/python -m loadtests.floor``. Needs wrk and
py-spy (``pip install py-spy``); py-spy needs ptrace rights over the processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web

from loadtests.options import parser, positive_int, run_main, timed
from loadtests.report import BenchError, Report, find, medians, ratio, say
from loadtests.scenarios import SCENARIOS, Wrk
from loadtests.topology import (
    System,
    free_port,
    kept,
    lbstack_up,
    missing,
    run_program,
    start_process,
)
from loadtests.wrk import rounds, run_wrk

PROFILE_RATE = 250  # py-spy samples per second
HOP_BY_HOP = frozenset(
    [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ]
)
AIOHTTP_CLIENT = ("client.py", "client_reqrep.py", "client_proto.py", "connector.py")
GROUPS = (
    "socket writes (kernel)",
    "aiohttp server side",
    "aiohttp client side",
    "aiohttp shared (streams, helpers)",
    "lbstack (app/)",
    "forwarder (loadtests/floor.py)",
    "prometheus_client",
    "event loop (uvloop, asyncio)",
    "other (multidict, yarl, stdlib)",
)


def group_of(frame: str) -> str:
    """The group of a py-spy frame ``func (path/file.py:line)``."""
    func, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0]
    name = path.rsplit("/", 1)[-1]
    if func in ("StreamWriter._write", "StreamWriter._writelines"):
        return GROUPS[0]  # the transport's write: a send(2) that may wake the peer
    if "aiohttp/" in path:
        if name.startswith("web") or name in ("http_parser.py", "http_writer.py"):
            return GROUPS[1]
        return GROUPS[2] if name in AIOHTTP_CLIENT else GROUPS[3]
    if path.startswith(("app/", "lbstack/")) or "/app/lbstack/" in path:
        return GROUPS[4]
    if name == "floor.py":
        return GROUPS[5]
    if "prometheus_client/" in path:
        return GROUPS[6]
    if "asyncio/" in path or "uvloop/" in path or func == "Runner.run":
        return GROUPS[7]
    return GROUPS[8]


def profile_shares(raw: str) -> dict[str, float]:
    """Each group's share of the samples of a py-spy ``--format raw`` profile."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[group_of(stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(counts.values())
    return {g: counts[g] / total for g in GROUPS} if total else {}


# -- the bare processes, run as ``python -m loadtests.floor --child KIND PORT [SOCKET]`` ---


async def serve(port: int, upstream: str | None) -> None:
    """A bare aiohttp server: answering itself, or forwarding to ``upstream`` through
    one ``ClientSession`` (the request sent on, the answer back), until SIGTERM."""
    client = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=upstream or "/", limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )

    async def answer(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=b'{"server": "bare"}', content_type="application/json")

    async def forward(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        async with client.request(
            request.method,
            f"http://upstream{request.raw_path}",
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as response:
            body = await response.read()
            back = [(k, v) for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP]
            return web.Response(status=response.status, body=body, headers=back)

    runner = web.ServerRunner(web.Server(forward if upstream else answer), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    await client.close()


async def start_child(
    stop: contextlib.AsyncExitStack, workdir: Path, name: str, upstream: str | None = None
) -> System:
    """A bare server or forwarder on a free loopback port, once it answers."""
    port = free_port()
    argv = [sys.executable, "-m", "loadtests.floor", "--child", str(port)]
    url = f"http://127.0.0.1:{port}/"
    log = workdir / f"{name}.log"
    process = await start_process(stop, argv + ([upstream] if upstream else []), log, url)
    return System(name, url, {"hop": {name: process}})


async def profile(
    py_spy: str, system: System, seconds: float, connections: int, workdir: Path
) -> dict[str, float]:
    """Each frame group's share of ``system``'s process's time under wrk's load."""
    (process,) = system.tiers["hop"].values()
    out = workdir / f"{system.name}.raw"
    spy = asyncio.create_task(
        run_program(
            *(py_spy, "record", "--nonblocking", f"--rate={PROFILE_RATE}", "--format=raw"),
            *(f"--duration={round(seconds)}", f"--output={out}", f"--pid={process.pid}"),
            timeout=seconds + 30,
        )
    )
    await run_wrk(system.url, workdir, seconds + 2, connections)
    status, _, err = await spy
    raw = out.read_text() if out.exists() else ""
    if status != 0 or not raw:
        raise BenchError(f"py-spy failed on pid {process.pid}: {err[-500:]}")
    return profile_shares(raw)


async def amain(args: argparse.Namespace) -> int:
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.defpath}")
    if py_spy is None or (problem := missing("wrk")):
        say(problem or "error: py-spy required but not found (pip install py-spy)")
        return 1
    scenario = replace(timed(SCENARIOS["floor"], args), load=Wrk((args.connections,)))
    report = Report("floor", {k: v for k, v in vars(args).items() if k not in ("json", "keep")})
    shares: dict[str, dict[str, float]] = {}
    with kept("lbf-", args.keep) as workdir:
        async with (
            lbstack_up(scenario.topology, workdir, report) as lb,
            contextlib.AsyncExitStack() as stop,
        ):
            balancer = (await lb.system()).tiers["front"]
            systems = [
                System("lbstack", lb.url, {"hop": balancer}),
                await start_child(stop, workdir, "aiohttp", str(lb.stack.run_dir / "proxy-0.sock")),
                await start_child(stop, workdir, "server"),
            ]
            runs = await rounds(systems, scenario, report, workdir)
            for system in systems:
                say(f"profiling {system.name} under load for {scenario.duration:g} s")
                shares[system.name] = await profile(
                    py_spy, system, scenario.duration, args.connections, workdir
                )
    summary = report.table("medians over the rounds", medians(runs, ("system",)))
    cpu = {s.name: find(summary, system=s.name).get("cpu_us_hop") for s in systems}
    report.table(
        "CPU µs per request by frame group (share of the samples)",
        [
            {"group": group, **{name: _share(shares[name].get(group), cpu[name]) for name in cpu}}
            for group in GROUPS
        ],
    )
    report.figures["cpu_ratio"] = ratio(cpu["lbstack"], cpu["aiohttp"])
    report.notes.append(
        "CPU: user+system time of the one process over each run / its requests; groups: "
        "each py-spy sample by its innermost frame; 'socket writes' is the transport's "
        "send(2), which also wakes the peer"
    )
    return report.finish(args.json)


def _share(share: float | None, cpu: float | None) -> str:
    if share is None or cpu is None or share < 0.005:
        return ""
    return f"{share * cpu:.0f} ({share:.0%})"


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:  # a bare server (PORT) or forwarder (PORT SOCKET)
        upstream = args[2] if len(args) > 2 else None
        uvloop.run(serve(int(args[1]), upstream))
        return
    cli = parser("floor", __doc__, "floor.json", SCENARIOS["floor"])
    cli.add_argument("--connections", type=positive_int, default=64, help="wrk connections")
    run_main(amain, cli, args)


if __name__ == "__main__":
    main()
