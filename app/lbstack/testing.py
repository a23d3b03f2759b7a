"""A real stack for tests and benchmarks: ``running_stack()`` starts ``lbstack up``.

Like ``aiohttp.test_utils``, for the whole stack::

    async with running_stack("--proxies", "1", config=TOML) as stack:
        async with stack.session() as client, client.get("/") as response:
            ...
        print((await stack.control.status()).components)
        await stack.admin("server-0-0").fault({"latency": "50ms"})

The stack runs in a short temporary directory (unix socket paths must fit in 107
bytes), with its metrics endpoint on a free loopback port; it is ready once its
banner is printed, and stops with SIGTERM (SIGKILL after ``stop_timeout``). Its
stdout and stderr go to ``log_file``. Nothing here sleeps to wait: readiness is the
banner, and ``wait_for`` polls with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from lbstack.address import Address
from lbstack.api import ComponentStatus, StackStatus
from lbstack.client import AdminClient, ControlClient, cancel
from lbstack.errors import ControlError, StartupError
from lbstack.rundir import RunDir

BANNER_FIRST = "lbstack up:"  # the banner's first line ...
BANNER_LAST = "stop:"  # ... and its last
POLL_INTERVAL = 0.05
LOG_PROBLEMS = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")


def short_tmpdir(prefix: str = "lb") -> Path:
    """A new temp dir short enough for unix socket paths (pytest's tmp_path can be too long)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class RunningStack:
    """A running ``lbstack up`` and the ways to talk to it (see ``running_stack``).

    ``workdir`` holds ``run/`` (the run dir), ``lbstack.toml`` (the config, when one was
    given) and ``stack.log`` (the supervisor's stdout and stderr).
    """

    def __init__(
        self, workdir: Path, process: asyncio.subprocess.Process, *, stop_timeout: float = 30.0
    ) -> None:
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.config_file = workdir / "lbstack.toml"
        self.log_file = workdir / "stack.log"
        self.process = process
        self.banner = ""
        self.stop_timeout = stop_timeout
        self._copy: asyncio.Task[None] | None = None

    @property
    def socket(self) -> str:
        """The balancer's data socket (``<run dir>/balancer.sock``)."""
        return RunDir(self.run_dir).balancer.path

    @property
    def control(self) -> ControlClient:
        """A client of the supervisor's control API."""
        return ControlClient(self.run_dir)

    def admin(self, name: str) -> AdminClient:
        """A client of the admin API of the child ``name`` (``proxy-0``, ``server-0-1`` ...)."""
        return AdminClient(RunDir(self.run_dir).admin(name))

    def session(self, **options: Any) -> aiohttp.ClientSession:
        """A client session on the balancer's data socket (paths only: base URL
        ``http://localhost``); ``options`` go to ``aiohttp.ClientSession``."""
        return aiohttp.ClientSession(
            base_url=Address.unix(self.socket).http_base,
            connector=aiohttp.UnixConnector(path=self.socket),
            **options,
        )

    async def status(self) -> StackStatus:
        """The supervisor's status (what ``lbstack status --json`` prints)."""
        return await self.control.status()

    async def component(self, name: str) -> ComponentStatus:
        """One component's entry in the status; KeyError if there is none."""
        return (await self.status()).component(name)

    async def wait_for(
        self,
        name: str,
        *,
        state: str = "ready",
        timeout: float = 30.0,
        not_pid: int | None = None,
    ) -> ComponentStatus:
        """Poll the status until ``name`` is in ``state`` (with a pid other than
        ``not_pid``: a restarted child); TimeoutError after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(KeyError, ControlError):  # not there yet; re-executing
                component = await self.component(name)
                if component.state == state and (not_pid is None or component.pid != not_pid):
                    return component
            if loop.time() > deadline:
                seen = await self._describe(name)
                raise TimeoutError(f"{name} not {state} within {timeout:g}s: {seen}")
            await asyncio.sleep(POLL_INTERVAL)  # wait-ok: polling with a deadline

    async def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        """Send ``sig`` to the child ``name`` (by the pid in the status); the pid."""
        pid = (await self.component(name)).pid
        if pid is None or name == "supervisor":
            raise ProcessLookupError(f"{name} has no child process to signal")
        os.kill(pid, sig)
        return pid

    async def _describe(self, name: str) -> str:
        try:
            return repr(await self.component(name))
        except (KeyError, ControlError) as exc:
            return f"no status ({exc})"

    def logs(self) -> str:
        """Everything the supervisor and its children logged so far."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_problems(self) -> list[str]:
        """The log's warning, error and traceback lines, injected faults aside."""
        return [
            line
            for line in self.logs().splitlines()
            if any(mark in line for mark in LOG_PROBLEMS) and "fault injected" not in line
        ]

    async def stop(self) -> int:
        """SIGTERM the supervisor (it stops every child in order), SIGKILL it after
        ``stop_timeout``; its exit status (-9 when it had to be killed)."""
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), self.stop_timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if self._copy is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._copy), 5.0)
            except TimeoutError:  # a grandchild still holds stdout open
                await cancel(self._copy)
        assert process.returncode is not None
        return process.returncode

    async def _read_banner(self, timeout: float) -> None:
        """Read stdout up to the end of the banner, then keep copying it to the log
        (a supervisor blocked on a full pipe would stop answering)."""
        stdout = self.process.stdout
        assert stdout is not None
        lines: list[str] = []

        async def banner() -> bool:
            while line := await stdout.readline():
                lines.append(line.decode(errors="replace"))
                if BANNER_LAST in lines[-1] and any(BANNER_FIRST in x for x in lines):
                    return True
            return False

        try:
            ready = await asyncio.wait_for(banner(), timeout)
        except TimeoutError:
            self._append(lines)
            raise StartupError(
                f"lbstack up printed no banner within {timeout:g}s; {self.log_file}:\n{self.logs()}"
            ) from None
        self._append(lines)
        if not ready:
            status = await self.process.wait()
            raise StartupError(
                f"lbstack up exited with status {status} before it was ready; "
                f"{self.log_file}:\n{self.logs()}"
            )
        self.banner = "".join(lines)
        self._copy = asyncio.create_task(self._copy_stdout(stdout), name="stack-stdout")

    async def _copy_stdout(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            self._append([line.decode(errors="replace")])

    def _append(self, lines: Sequence[str]) -> None:
        with self.log_file.open("a", errors="replace") as log:
            log.writelines(lines)


@contextlib.asynccontextmanager
async def running_stack(
    *args: str,
    config: str | None = None,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] = (sys.executable, "-m", "lbstack"),
    workdir: Path | None = None,
    metrics_listen: str = "tcp://127.0.0.1:0",
    start_timeout: float = 60.0,
    stop_timeout: float = 30.0,
) -> AsyncIterator[RunningStack]:
    """Start ``lbstack up ARGS``, yield it once its banner says it is ready, stop it.

    ``config``: the text of a TOML config (written to ``workdir/lbstack.toml``).
    ``cwd``: where it runs (``python -m lbstack`` imports the ``lbstack`` package it
    finds there first: a copy of the code a test can change). ``env``: variables added
    to this process's environment. ``command``: what runs ``lbstack`` (e.g. a venv's
    ``bin/lbstack``). ``workdir``: where the run dir, config and log go, kept afterwards
    (default: a short temp dir, removed at the end). ``metrics_listen``: ``"off"`` for
    none. ``StartupError`` (with the log) if it exits or prints no banner in
    ``start_timeout`` seconds.
    """
    base = workdir if workdir is not None else short_tmpdir()
    argv = [
        *command,
        "up",
        "--run-dir",
        str(base / "run"),
        "--metrics-listen",
        metrics_listen,
        *args,
    ]
    if config is not None:
        (base / "lbstack.toml").write_text(config)
        argv += ["--config", str(base / "lbstack.toml")]
    try:
        with (base / "stack.log").open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                cwd=cwd,
            )
        stack = RunningStack(base, process, stop_timeout=stop_timeout)
        try:
            await stack._read_banner(start_timeout)
            yield stack
        finally:
            await stack.stop()
    finally:
        if workdir is None:
            shutil.rmtree(base, ignore_errors=True)


__all__ = ["RunningStack", "running_stack", "short_tmpdir"]
