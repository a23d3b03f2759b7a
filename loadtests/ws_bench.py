"""WebSocket message round trip through the stack, against a direct connection.

One lbstack stack (balancer → 2 proxies → 3 simulated servers each, zero latency);
``--sockets`` WebSocket clients each send ``--messages`` messages of ``--size`` bytes one
after the other and time each echo. The same is done straight to one server's unix
socket, so the difference is what two tunnelling hops add to a message. Rounds
alternate between the two. Prints p50/p99/p99.9 per path and writes JSON.

Run it from the project root: ``.venv/bin/python -m loadtests.ws_bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from loadtests.bench import stack_config
from loadtests.options import positive_int, run_main
from loadtests.topology import LbstackStack, make_workdir, remove_workdir

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "ws.json"
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)


async def round_trips(socket: Path, sockets: int, messages: int, size: int) -> list[float]:
    """Every message's echo time, in seconds, over ``sockets`` WebSockets to ``socket``."""
    payload = b"x" * size
    times: list[float] = []

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.ws_connect("http://localhost/ws") as ws:
            for _ in range(messages):
                started = time.perf_counter()
                await ws.send_bytes(payload)
                answer = await asyncio.wait_for(ws.receive(), 10.0)
                times.append(time.perf_counter() - started)
                if answer.data != payload:
                    raise RuntimeError(f"echo mismatch: {answer!r}")

    connector = aiohttp.UnixConnector(path=str(socket), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(one(session) for _ in range(sockets)))
    return times


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def amain(options: argparse.Namespace) -> int:
    workdir = make_workdir("lbw-")
    results: dict[str, list[float]] = {"through the stack": [], "direct to a server": []}
    try:
        async with LbstackStack(
            workdir, stack_config(proxies=2, servers_per_proxy=3, latency="0ms")
        ) as stack:
            paths = {
                "through the stack": stack.run_dir / "balancer.sock",
                "direct to a server": stack.run_dir / "server-0-0.sock",
            }
            for socket in paths.values():  # warm-up
                await round_trips(socket, 1, 50, options.size)
            for round_ in range(1, options.rounds + 1):
                for name, socket in paths.items():
                    times = await round_trips(
                        socket, options.sockets, options.messages, options.size
                    )
                    results[name] += times
                    console.print(
                        f"round {round_} {name:<20} p50 {percentile(times, 0.5):6.3f} ms  "
                        f"p99 {percentile(times, 0.99):6.3f} ms",
                        markup=False,
                    )
    finally:
        remove_workdir(workdir)
    table = Table(
        title=f"WebSocket round trip, {options.sockets} sockets × {options.messages} "
        f"messages of {options.size} B × {options.rounds} rounds"
    )
    for column in ("path", "messages", "p50 ms", "p99 ms", "p99.9 ms", "mean ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    figures: dict[str, Any] = {}
    for name, times in results.items():
        figures[name] = {
            "messages": len(times),
            "p50_ms": round(percentile(times, 0.5), 4),
            "p99_ms": round(percentile(times, 0.99), 4),
            "p999_ms": round(percentile(times, 0.999), 4),
            "mean_ms": round(statistics.fmean(times) * 1e3, 4),
        }
        row = figures[name]
        table.add_row(
            name,
            str(row["messages"]),
            f"{row['p50_ms']:.3f}",
            f"{row['p99_ms']:.3f}",
            f"{row['p999_ms']:.3f}",
            f"{row['mean_ms']:.3f}",
        )
    console.print(table)
    options.json.parent.mkdir(parents=True, exist_ok=True)
    options.json.write_text(json.dumps({"benchmark": "ws", "figures": figures}, indent=2) + "\n")
    console.print(f"wrote {options.json}", markup=False)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtests.ws_bench", description=__doc__)
    parser.add_argument("--sockets", type=positive_int, default=8, help="WebSockets at once (8)")
    parser.add_argument("--messages", type=positive_int, default=500, help="per socket (500)")
    parser.add_argument("--size", type=positive_int, default=128, help="message bytes (128)")
    parser.add_argument("--rounds", type=positive_int, default=3, help="rounds per path (3)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results JSON")
    run_main(amain(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
