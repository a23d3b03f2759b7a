"""Planned changes under load: reload, rolling restart and upgrade, timed and counted.

A stack (2 proxies x 3 simulated servers by default) takes a bounded stream of GETs and
4 KiB POSTs (a POST is never retried by the stack, so it shows any connection closed
under a router) from a few closed-loop clients, while each change runs in turn:

* ``lbstack reload`` after the config's proxy policy changed (both proxies replaced);
* ``lbstack restart --rolling`` (every child replaced, one at a time);
* ``lbstack upgrade --supervisor-only`` (the supervisor re-executes, children adopted);
* ``lbstack upgrade`` (the same, then every child rolled onto the new code).

For each it prints how long the command took and what the stream got meanwhile, and
writes them to a JSON file. Every change must leave every request answered 200.

    python -m loadtests.change_bench [--clients 4] [--servers 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from loadtests.options import positive_int
from loadtests.topology import LbstackStack, make_workdir, remove_workdir

RESULTS = Path(__file__).resolve().parent / "results" / "changes.json"
MAX_REQUESTS = 200_000  # per client and change: the stream is bounded
BODY = b"x" * 4096


@dataclass
class Change:
    """One change: the command, how long it took, what the stream got meanwhile."""

    command: str
    exit_status: int
    seconds: float
    outcomes: dict[str, int]

    @property
    def failed(self) -> int:
        return sum(count for outcome, count in self.outcomes.items() if outcome != "200")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtests.change_bench", description=__doc__)
    parser.add_argument("--clients", type=positive_int, default=4, help="closed-loop clients")
    parser.add_argument("--servers", type=positive_int, default=3, help="servers per proxy")
    parser.add_argument("--json", type=Path, default=RESULTS, dest="json_path")
    return parser.parse_args(argv)


def config(servers: int, policy: str) -> str:
    return f"""
proxies = 2
servers_per_proxy = {servers}
[proxy]
policy = "{policy}"
[server.simulation]
latency = "1ms"
"""


async def _stream(url: str, clients: int, stop: asyncio.Event) -> Counter[str]:
    """GETs and POSTs, ``clients`` at a time, until ``stop``; answers by status."""
    seen: Counter[str] = Counter()

    async def client(session: aiohttp.ClientSession) -> None:
        for n in range(MAX_REQUESTS):
            if stop.is_set():
                return
            post = n % 2 == 1
            try:
                async with session.request(
                    "POST" if post else "GET", url, data=BODY if post else None
                ) as response:
                    await response.read()
                    seen[str(response.status)] += 1
            except aiohttp.ClientConnectorError:
                seen["refused"] += 1
            except aiohttp.ClientError:
                seen["failed"] += 1

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return seen


async def _change(stack: LbstackStack, clients: int, *args: str) -> Change:
    stop = asyncio.Event()
    stream = asyncio.create_task(_stream(stack.url, clients, stop))
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        str(stack.lbstack),
        *args,
        "--run-dir",
        str(stack.run_dir),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    took = time.monotonic() - started
    stop.set()
    seen = await stream
    if process.returncode != 0:
        print(stderr.decode(errors="replace"), file=sys.stderr)
    return Change(" ".join(("lbstack", *args)), process.returncode or 0, took, dict(seen))


async def amain(options: argparse.Namespace) -> int:
    workdir = make_workdir("lbc-")
    stack = LbstackStack(workdir, config(options.servers, "p2c_ewma"))
    changes: list[Change] = []
    try:
        await stack.start()
        stack.config_file.write_text(config(options.servers, "least_outstanding"))
        for args in (
            ("reload",),
            ("restart", "--rolling"),
            ("upgrade", "--supervisor-only"),
            ("upgrade",),
        ):
            changes.append(await _change(stack, options.clients, *args))
    finally:
        await stack.stop()
        remove_workdir(workdir)
    table = Table(
        title=f"Planned changes under load: 2 proxies x {options.servers} servers, "
        f"{options.clients} clients (GET + 4 KiB POST)"
    )
    for column in ("change", "exit", "seconds", "requests", "failed"):
        table.add_column(column, justify="left" if column == "change" else "right")
    for change in changes:
        table.add_row(
            change.command,
            str(change.exit_status),
            f"{change.seconds:.1f}",
            f"{sum(change.outcomes.values()):,}",
            str(change.failed),
        )
    console = Console()
    console.print(table)
    options.json_path.parent.mkdir(parents=True, exist_ok=True)
    options.json_path.write_text(
        json.dumps([{**asdict(c), "failed": c.failed} for c in changes], indent=2) + "\n"
    )
    console.print(f"wrote {options.json_path}", markup=False)
    return 0 if all(c.exit_status == 0 and c.failed == 0 for c in changes) else 1


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(asyncio.run(amain(parse_args(argv))))


if __name__ == "__main__":
    main()
