"""Where aiohttp sets the floor: one forwarding hop, lbstack's against a bare aiohttp one.

Three processes are loaded by wrk over TCP at c=``--connections``, in alternating
rounds, each alone:

* ``lbstack``: the balancer of a running stack (1 proxy × 3 servers, zero latency),
  i.e. lbstack's forwarding core with its routing, health, metrics and headers;
* ``aiohttp``: the plainest aiohttp forwarder there is (``web.Server`` plus
  ``ClientSession.request``, hop-by-hop headers dropped, body read and returned), in
  front of the very same proxy as the balancer;
* ``server``: a bare aiohttp server answering a fixed body itself — aiohttp's server
  side alone, the part of a hop no forwarder can avoid.

For each: requests per second, the process's CPU time per request (``/proc``), and a
py-spy profile of it under the same load, every sample attributed by its innermost
frame to a group (aiohttp's server side, its client side, lbstack's own code, ...).
The groups' shares times the CPU per request give µs per request by group: what
lbstack adds over aiohttp, and what aiohttp itself costs. Prints a table and writes
JSON (``--json``).

Run it from the project root: ``.venv/bin/python -m loadtests.floor``. Needs wrk and
py-spy (``pip install py-spy``); py-spy needs ptrace rights over the processes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
from aiohttp import web
from rich.console import Console
from rich.table import Table

from loadtests.bench import stack_config
from loadtests.options import positive_int
from loadtests.procstats import cpu_seconds
from loadtests.topology import (
    LbstackStack,
    free_port,
    http_ok,
    make_workdir,
    poll_until,
    remove_workdir,
    stop_process,
)
from loadtests.wrk import find_wrk, run_wrk

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "floor.json"
SYSTEMS = ("lbstack", "aiohttp", "server")
PROFILE_RATE = 250  # py-spy samples per second
TARGET_CPU_RATIO = 0.5  # lbstack's hop / the ClientSession forwarder, CPU per request
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
# Groups of the innermost frame, tried in order: (group, predicate on "func (file:line)").
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

console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


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
        if name in AIOHTTP_CLIENT:
            return GROUPS[2]
        return GROUPS[3]
    if path.startswith("app/") or "/app/" in path:
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
        if not stack or not count.isdigit():
            continue
        counts[group_of(stack.rsplit(";", 1)[-1])] += int(count)
    total = sum(counts.values())
    return {g: counts[g] / total for g in GROUPS} if total else {}


# -- the bare processes -------------------------------------------------------------------


async def _serve(port: int, handler: Any) -> None:
    runner = web.ServerRunner(web.Server(handler), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await runner.cleanup()


async def bare_server(port: int) -> None:
    """aiohttp answering every request itself with a fixed body."""
    body = b'{"server": "bare"}'

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    await _serve(port, handle)


async def bare_forwarder(port: int, upstream: str) -> None:
    """The plainest aiohttp forwarder: one session, the request sent on, the answer back."""
    session = aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=upstream, limit=0),
        timeout=aiohttp.ClientTimeout(total=None),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        data = request.content if request.body_exists else None
        async with session.request(
            request.method,
            f"http://upstream{request.raw_path}",
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            back = [(k, v) for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP]
            return web.Response(status=answer.status, body=body, headers=back)

    try:
        await _serve(port, handle)
    finally:
        await session.close()


def child_main(argv: Sequence[str]) -> None:
    """``python -m loadtests.floor server PORT`` or ``... forwarder PORT SOCKET``."""
    kind, port = argv[0], int(argv[1])
    if kind == "server":
        uvloop.run(bare_server(port))
    else:
        uvloop.run(bare_forwarder(port, argv[2]))


# -- the measurement ----------------------------------------------------------------------


@dataclass
class Figures:
    """One system's runs and profile."""

    requests_per_s: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    errors: int = 0
    shares: dict[str, float] = field(default_factory=dict)

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None

    def to_json(self) -> dict[str, Any]:
        cpu = self.median(self.cpu_us)
        return {
            "requests_per_s": self.requests_per_s,
            "cpu_us_per_request": self.cpu_us,
            "errors": self.errors,
            "profile_shares": {g: round(s, 4) for g, s in self.shares.items()},
            "us_per_request_by_group": {
                g: round(s * cpu, 1) for g, s in self.shares.items() if cpu is not None
            },
        }


async def _start_child(workdir: Path, *args: str) -> asyncio.subprocess.Process:
    log = (workdir / f"{args[0]}.log").open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtests.floor",
            "--child",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    finally:
        log.close()


async def _profile(py_spy: str, pid: int, seconds: int, out: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        py_spy,
        "record",
        "--nonblocking",
        f"--rate={PROFILE_RATE}",
        f"--duration={seconds}",
        "--format=raw",
        f"--output={out}",
        f"--pid={pid}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(process.communicate(), seconds + 30)
    try:
        text = await asyncio.to_thread(out.read_text)
    except OSError:
        text = ""
    if process.returncode != 0 or not text:
        raise RuntimeError(f"py-spy failed on pid {pid}: {err.decode(errors='replace')[-500:]}")
    return text


async def measure(options: argparse.Namespace, wrk: str, py_spy: str) -> dict[str, Figures]:
    figures = {system: Figures() for system in SYSTEMS}
    workdir = make_workdir("lbf-")
    children: list[asyncio.subprocess.Process] = []
    try:
        async with contextlib.AsyncExitStack() as stop:
            stack = LbstackStack(
                workdir, stack_config(proxies=1, servers_per_proxy=3, latency="0ms")
            )
            with console.status("starting lbstack (1 proxy × 3 servers)"):
                await stack.start()
            stop.push_async_callback(stack.stop)
            status = await stack.status()
            pids = {c["name"]: c["pid"] for c in status["components"]}
            ports = {"aiohttp": free_port(), "server": free_port()}
            proxy_socket = str(stack.run_dir / "proxy-0.sock")
            children.append(
                await _start_child(workdir, "forwarder", str(ports["aiohttp"]), proxy_socket)
            )
            children.append(await _start_child(workdir, "server", str(ports["server"])))
            urls = {"lbstack": stack.url}
            for name, port in ports.items():
                urls[name] = f"http://127.0.0.1:{port}/"
                await poll_until(partial(http_ok, urls[name]), timeout=20.0, what=name)
            targets = {
                "lbstack": int(pids["balancer-0"]),
                "aiohttp": children[0].pid,
                "server": children[1].pid,
            }

            async def load(system: str, seconds: int) -> Any:
                return await run_wrk(
                    urls[system],
                    workdir=workdir,
                    duration=seconds,
                    connections=options.connections,
                    wrk=wrk,
                )

            for system in SYSTEMS:
                with console.status(f"warming up {system}"):
                    await load(system, 2)
            for round_ in range(1, options.rounds + 1):
                for system in SYSTEMS:
                    pid = targets[system]
                    with console.status(f"round {round_}: {system}"):
                        before = cpu_seconds(pid)
                        result = await load(system, options.duration)
                        used = cpu_seconds(pid) - before
                    figure = figures[system]
                    figure.requests_per_s.append(round(result.requests_per_s, 1))
                    cpu = used / max(result.requests, 1) * 1e6
                    figure.cpu_us.append(round(cpu, 1))
                    figure.errors += result.non_2xx + result.socket_errors
                    console.print(
                        f"round {round_} {system:<8} {result.requests_per_s:>7.0f} req/s  "
                        f"{cpu:>5.0f} µs CPU/req  {result.non_2xx + result.socket_errors} errors",
                        markup=False,
                    )
            for system in SYSTEMS:
                with console.status(f"profiling {system} under load"):
                    profiled = asyncio.create_task(
                        _profile(
                            py_spy,
                            targets[system],
                            options.duration,
                            workdir / f"{system}.raw",
                        )
                    )
                    await load(system, options.duration + 2)
                    raw = await profiled
                figures[system].shares = profile_shares(raw)
                if options.keep_profiles:
                    options.keep_profiles.mkdir(parents=True, exist_ok=True)
                    shutil.copy(workdir / f"{system}.raw", options.keep_profiles)
            for child in children:
                await stop_process(child, signal.SIGTERM, 10.0)
    finally:
        for child in children:
            if child.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.kill()
                await child.wait()
        remove_workdir(workdir)
    return figures


def table(figures: dict[str, Figures], connections: int) -> Table:
    result = Table(title=f"One hop at c={connections}: µs of CPU per request, by frame group")
    result.add_column("")
    for system in SYSTEMS:
        result.add_column(system, justify="right")
    cpu = {s: f.median(f.cpu_us) for s, f in figures.items()}
    result.add_row(
        "req/s", *(f"{figures[s].median(figures[s].requests_per_s) or 0:.0f}" for s in SYSTEMS)
    )
    result.add_row("CPU µs/req", *(f"{cpu[s] or 0:.0f}" for s in SYSTEMS))
    result.add_section()
    for group in GROUPS:
        cells = []
        for system in SYSTEMS:
            share, us = figures[system].shares.get(group), cpu[system]
            cells.append(
                ""
                if share is None or us is None or share < 0.005
                else f"{share * us:.0f} ({share:.0%})"
            )
        result.add_row(group, *cells)
    return result


def _ratio(figures: dict[str, Figures]) -> float | None:
    """lbstack's CPU per request over the plain aiohttp forwarder's (medians)."""
    ours = figures["lbstack"].median(figures["lbstack"].cpu_us)
    theirs = figures["aiohttp"].median(figures["aiohttp"].cpu_us)
    return None if not ours or not theirs else round(ours / theirs, 3)


async def amain(options: argparse.Namespace) -> int:
    wrk = find_wrk()
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.defpath}")
    if wrk is None or py_spy is None:
        console.print("error: wrk and py-spy are required", markup=False)
        return 1
    began = time.monotonic()
    figures = await measure(options, wrk, py_spy)
    console.print(table(figures, options.connections))
    ratio = _ratio(figures)
    if ratio is not None:
        verdict = "PASS" if ratio <= TARGET_CPU_RATIO else "MISS"
        console.print(
            f"lbstack's hop: {ratio:.2f}× the aiohttp forwarder's CPU per request "
            f"(target ≤ {TARGET_CPU_RATIO:g}×): {verdict}",
            markup=False,
        )
    console.print(
        "  * CPU: utime+stime of the one process over each run / its requests; groups: "
        "each py-spy sample by its innermost frame, shares × CPU µs/req; 'socket writes' "
        "is the transport's send(2), which also wakes the peer (wall time in it includes "
        "being preempted by the woken process).",
        markup=False,
    )
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(
        json.dumps(
            {
                "benchmark": "floor",
                "connections": options.connections,
                "duration_s": options.duration,
                "rounds": options.rounds,
                "loadavg": os.getloadavg(),
                "systems": {s: f.to_json() for s, f in figures.items()},
                "cpu_ratio": ratio,
                "target_cpu_ratio": TARGET_CPU_RATIO,
            },
            indent=2,
        )
        + "\n"
    )
    console.print(f"wrote {options.json} ({time.monotonic() - began:.0f} s)", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--child"]:
        child_main(args[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.floor",
        description="One forwarding hop: lbstack's balancer, a bare aiohttp forwarder and "
        "a bare aiohttp server, with CPU per request by frame group (py-spy).",
    )
    parser.add_argument("--connections", type=positive_int, default=64, help="wrk connections")
    parser.add_argument("--duration", type=positive_int, default=10, help="seconds per run")
    parser.add_argument("--rounds", type=positive_int, default=2, help="rounds per system")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results JSON")
    parser.add_argument(
        "--keep-profiles", type=Path, default=None, help="copy the raw py-spy profiles here"
    )
    options = parser.parse_args(args)
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(amain(options)))


if __name__ == "__main__":
    main()
