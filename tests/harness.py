"""What the real-process tests share beside ``lbstack.testing``'s stack: the CLI, steady
load, polling, a stand-in server, and typed shortcuts to the stack's APIs."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lbstack.address import Address
from lbstack.api import RouterStatus, ServerStatus
from lbstack.metrics import parse
from lbstack.testing import RunningStack, short_tmpdir

__all__ = [
    "cli",
    "router_status",
    "scale_events",
    "server_status",
    "serving",
    "short_tmpdir",  # lbstack.testing's, with the other helpers of the tests
    "statuses",
    "steady_load",
    "supervisor_samples",
    "until",
]


async def router_status(stack: RunningStack, name: str) -> RouterStatus:
    """The ``/status`` of the balancer or proxy ``name``."""
    view = await stack.admin(name).status()
    assert isinstance(view, RouterStatus), view
    return view


async def server_status(stack: RunningStack, name: str) -> ServerStatus:
    """The ``/status`` of the simulated server ``name``."""
    view = await stack.admin(name).status()
    assert isinstance(view, ServerStatus), view
    return view


async def supervisor_samples(stack: RunningStack, name: str) -> list[tuple[dict[str, str], float]]:
    """The supervisor's own samples of the metric ``name``: (labels, value)."""
    text = await stack.control.metrics()
    return [(labels, value) for n, labels, value in parse(text) if n == name]


async def scale_events(stack: RunningStack, group: str) -> dict[str, float]:
    """``lbstack_scale_events_total`` of ``group``, by direction."""
    samples = await supervisor_samples(stack, "lbstack_scale_events_total")
    return {labels["direction"]: v for labels, v in samples if labels["group"] == group}


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


async def cli(*args: str, timeout: float = 30.0) -> CliResult:
    """Run ``python -m lbstack ARGS`` to completion."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbstack",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return CliResult(process.returncode, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def steady_load(
    stack: RunningStack, workers: int = 6, path: str = "/load", *, posts: bool = False
) -> AsyncIterator[Counter[str]]:
    """GETs through the balancer, ``workers`` at a time, until the block ends; with
    ``posts``, every other request is a POST with a 4 KiB body (never retried).

    Counts each answer as ``"<status>:<X-Served-By>"``; a request that got no answer
    counts as ``"refused"`` (could not connect) or ``"failed"``. Bounded in requests.
    """
    seen: Counter[str] = Counter()
    stop = asyncio.Event()
    body = b"x" * 4096

    async def loop(client: aiohttp.ClientSession) -> None:
        for n in range(50_000):  # bounded; normally ended by ``stop``
            if stop.is_set():
                return
            post = posts and n % 2 == 1
            try:
                async with client.request(
                    "POST" if post else "GET", path, data=body if post else None
                ) as response:
                    await response.read()
                    seen[f"{response.status}:{response.headers.get('X-Served-By', '-')}"] += 1
            except aiohttp.ClientConnectorError:
                seen["refused"] += 1
            except aiohttp.ClientError:
                seen["failed"] += 1

    async with stack.session() as client:
        tasks = [asyncio.create_task(loop(client)) for _ in range(workers)]
        try:
            yield seen
        finally:
            stop.set()
            await asyncio.gather(*tasks)


def statuses(seen: Counter[str]) -> set[str]:
    """The outcomes ``steady_load`` counted, without the servers: {"200", "failed", ...}."""
    return {key.split(":")[0] for key in seen}


async def until(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    """Poll ``check`` until it is true, or fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)  # wait-ok: polling with a deadline


@contextlib.asynccontextmanager
async def serving(app: web.Application, path: Path) -> AsyncIterator[Address]:
    """Serve ``app`` on the unix socket ``path`` for the block (a stand-in server)."""
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        await web.UnixSite(runner, str(path)).start()
        yield Address.unix(str(path))
    finally:
        await runner.cleanup()


def tool(name: str, *candidates: Path, package: str = "") -> str:
    """The first of ``candidates`` that exists, else ``name`` on PATH. Missing fails in
    CI (.ci/run or the dev dependencies install it), else skips."""
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        reason = f"{name} is not installed" + (f" (Debian package {package})" if package else "")
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason}: CI must install it (.ci/run)")
        pytest.skip(reason)
    return found
