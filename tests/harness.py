"""Starting a real stack (``python -m lbstack up``) in a short temp run dir, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lbstack.address import Address
from lbstack.client import fetch, fetch_json
from lbstack.metrics import parse

READY_LINE = "lbstack up:"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


def short_tmpdir() -> Path:
    """A temp dir short enough for unix socket paths (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix="lb", dir="/tmp"))


class Stack:
    """A running ``lbstack up`` and the ways a test talks to it."""

    def __init__(self, run_dir: Path, process: asyncio.subprocess.Process, log: Path) -> None:
        self.run_dir = run_dir
        self.process = process
        self.log = log
        self.banner = ""

    @property
    def socket(self) -> str:
        return str(self.run_dir / "balancer.sock")

    def session(self, **kwargs: Any) -> aiohttp.ClientSession:
        """A client session on the balancer's unix socket."""
        return aiohttp.ClientSession(
            base_url="http://localhost",
            connector=aiohttp.UnixConnector(path=self.socket),
            **kwargs,
        )

    async def status(self) -> dict[str, Any]:
        out = await cli("status", "--json", "--run-dir", str(self.run_dir))
        assert out.returncode == 0, out.stderr
        return dict(json.loads(out.stdout))

    async def component(self, name: str) -> dict[str, Any]:
        for component in (await self.status())["components"]:
            if component["name"] == name:
                return dict(component)
        raise KeyError(name)

    async def wait_for(
        self, name: str, *, state: str = "ready", timeout: float = 30.0, not_pid: int | None = None
    ) -> dict[str, Any]:
        """Poll the status until ``name`` is in ``state`` (with a pid other than ``not_pid``)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            component = await self.component(name)
            if component["state"] == state and (not_pid is None or component["pid"] != not_pid):
                return component
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{name} not {state} within {timeout}s: {component}")
            await asyncio.sleep(0.05)  # wait-ok: polling with a deadline

    @property
    def control(self) -> Address:
        """The supervisor's control socket."""
        return Address.unix(str(self.run_dir / "control.sock"))

    async def autoscale(self) -> dict[str, Any]:
        """The supervisor's view of every autoscaled group (``status --json``'s)."""
        status, body = await fetch_json(self.control, "/status")
        assert status == 200, body
        return dict(body["autoscale"])

    async def supervisor_samples(self, name: str) -> list[tuple[dict[str, str], float]]:
        """The supervisor's own samples of the metric ``name``: (labels, value)."""
        status, raw = await fetch(self.control, "/metrics")
        assert status == 200, raw
        return [(labels, value) for n, labels, value in parse(raw.decode()) if n == name]

    async def scale_events(self, group: str) -> dict[str, float]:
        """``lbstack_scale_events_total`` of ``group``, by direction."""
        samples = await self.supervisor_samples("lbstack_scale_events_total")
        return {labels["direction"]: v for labels, v in samples if labels["group"] == group}

    async def admin(self, name: str, path: str = "/status") -> dict[str, Any]:
        """GET ``path`` on a component's admin socket (JSON)."""
        address = Address.unix(str(self.run_dir / f"{name}.admin.sock"))
        status, body = await fetch_json(address, path)
        assert status == 200, body
        return dict(body)

    async def admin_text(self, name: str, path: str = "/metrics") -> str:
        """GET ``path`` on a component's admin socket (text)."""
        address = Address.unix(str(self.run_dir / f"{name}.admin.sock"))
        status, body = await fetch(address, path)
        assert status == 200, body
        return body.decode()

    def logs(self) -> str:
        return self.log.read_text(errors="replace")

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)


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
    stack: Stack, workers: int = 6, path: str = "/load", *, posts: bool = False
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
async def running_stack(
    *args: str, config: str | None = None, cwd: Path | None = None
) -> AsyncIterator[Stack]:
    """Start ``lbstack up`` with ARGS (and a TOML config text), wait for its banner.

    ``cwd``: where it runs; ``python -m lbstack`` there imports the ``lbstack`` package found
    there first (a copy of the code a test can change)."""
    base = short_tmpdir()
    run_dir = base / "run"
    log = base / "stack.log"
    argv = ["up", "--run-dir", str(run_dir), "--metrics-listen", "tcp://127.0.0.1:0", *args]
    if config is not None:
        (base / "lbstack.toml").write_text(config)
        argv += ["--config", str(base / "lbstack.toml")]
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "lbstack",
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
        )
    stack = Stack(run_dir, process, log)
    try:
        assert process.stdout is not None
        banner = await asyncio.wait_for(_read_banner(process.stdout), START_TIMEOUT)
        if not banner:
            await process.wait()
            raise AssertionError(
                f"stack did not start (exit {process.returncode}):\n{stack.logs()}"
            )
        stack.banner = banner
        yield stack
    finally:
        if process.returncode is None:
            await stack.stop()
        shutil.rmtree(base, ignore_errors=True)


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


async def _read_banner(stdout: asyncio.StreamReader) -> str:
    lines = []
    while line := await stdout.readline():
        lines.append(line.decode())
        if "stop:" in lines[-1] and any(READY_LINE in x for x in lines):
            return "".join(lines)
    return ""
