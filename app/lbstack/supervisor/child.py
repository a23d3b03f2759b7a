"""One supervised child: spawn it, wait until ready, watch it, restart it, stop it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import aiohttp

from lbstack.address import Address
from lbstack.client import answers, probe, session
from lbstack.config import SupervisorConfig
from lbstack.errors import SocketError
from lbstack.identity import ChildId, Role
from lbstack.log import get_logger

log = get_logger("supervisor")

LIVENESS_INTERVAL = 2.0
LIVENESS_TIMEOUT = 2.0
LIVENESS_FAILURES = 3
READY_POLL = 0.05


class State(StrEnum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass
class Launch:
    """How to start a child: its command line, environment and inherited sockets."""

    argv: Sequence[str]
    env: dict[str, str]
    pass_fds: Sequence[int] = ()
    preexec_fn: Callable[[], None] | None = None


class Process(Protocol):
    """What supervising a process needs of it: ``asyncio.subprocess.Process`` has it."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def send_signal(self, sig: int) -> None: ...


class AdoptedProcess:
    """A child process this supervisor did not spawn in its current image: its exit is
    seen through a pidfd, and it is reaped with ``waitpid`` (it is still our child)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._exited: asyncio.Future[int] | None = None

    async def wait(self) -> int:
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._reap())
        return await asyncio.shield(self._exited)

    async def _reap(self) -> int:
        loop = asyncio.get_running_loop()
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:  # gone and reaped already: nothing to tell
            self.returncode = -signal.SIGKILL
            return self.returncode
        exited: asyncio.Future[None] = loop.create_future()

        def readable() -> None:  # a pidfd turns readable when its process exits
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
            os.close(pidfd)
        try:
            _, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 (it has exited)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped by someone else: the status is lost
            self.returncode = -signal.SIGKILL
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


@dataclass
class Child:
    """A child process the supervisor keeps running.

    ``launch`` is called for every (re)start, so a restarted child gets the same
    inherited sockets and the topology as it is at that moment.
    """

    id: ChildId
    listen: list[Address]
    admin: Address | None
    launch: Callable[[], Launch]
    ready_check: tuple[Address, str]
    settings: SupervisorConfig
    # Called when a child that never became ready failed ``boot_failures`` times in a
    # row: its supervision ends (``wait_ready`` answers False). A child that has served
    # before is restarted for as long as the stack runs instead.
    on_give_up: Callable[[Child, str], None]
    on_restart: Callable[[Child], None]
    state: State = State.STOPPED
    pid: int | None = None
    restarts: int = 0
    started_at: float | None = None
    last_exit: str | None = None
    draining: bool = False  # its routers send it no new requests
    _process: Process | None = field(default=None, repr=False)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _ready: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def role(self) -> Role:
        return self.id.role

    @property
    def group(self) -> int | None:
        return self.id.group

    def start(self) -> None:
        """Begin supervising: spawn now, and again whenever the process dies."""
        self._task = asyncio.create_task(self._supervise(), name=f"supervise-{self.name}")

    def adopt(self, pid: int) -> None:
        """Begin supervising a process already running as ``pid`` (started by this
        supervisor before it re-executed itself, so still its child); when it dies it is
        restarted like any other."""
        self._task = asyncio.create_task(
            self._supervise(AdoptedProcess(pid)), name=f"supervise-{self.name}"
        )

    async def wait_ready(self) -> bool:
        """Until the child is first ready (True) or supervision ended (False)."""
        assert self._task is not None
        ready = asyncio.create_task(self._ready.wait())
        await asyncio.wait({ready, self._task}, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        return self._ready.is_set()

    async def _supervise(self, adopted: AdoptedProcess | None = None) -> None:
        boot_failures = 0
        backoff = self.settings.restart_backoff_initial
        while not self._stopping.is_set():
            started = time.monotonic()
            if await self._run_once(adopted):
                boot_failures = 0
            elif self._stopping.is_set():
                break
            else:
                boot_failures += 1
                if boot_failures >= self.settings.boot_failures:
                    message = (
                        f"{self.name} failed {boot_failures} times in a row before "
                        f"becoming ready (last: {self.last_exit})"
                    )
                    if not self._ready.is_set():  # it never ran: a start that can't work
                        self.state = State.FAILED
                        self.on_give_up(self, message)
                        return
                    if boot_failures == self.settings.boot_failures:
                        log.error(
                            "%s; it served before, so it is still restarted, every %.0fs "
                            "at the most",
                            message,
                            self.settings.restart_backoff_max,
                        )
            if self._stopping.is_set():
                break
            if time.monotonic() - started >= self.settings.stable_after:
                backoff = self.settings.restart_backoff_initial
            self.state = State.BACKOFF
            log.info("restarting %s in %.2fs", self.name, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, self.settings.restart_backoff_max)
            if not self._stopping.is_set():
                self.restarts += 1
                self.on_restart(self)
            adopted = None
        self.state = State.STOPPED

    async def _run_once(self, adopted: AdoptedProcess | None = None) -> bool:
        """Run the process (or watch the ``adopted`` one) until it exits; whether it
        became ready first."""
        self.state = State.STARTING
        process: Process
        if adopted is not None:
            process = adopted
        else:
            spawned = await self._spawn()
            if spawned is None:
                return False
            process, self.started_at = spawned, time.time()
        self._process, self.pid = process, process.pid
        exited = asyncio.create_task(process.wait())
        ready = await self._await_ready(exited)
        if ready:
            self.state = State.READY
            self._ready.set()
            log.info("%s ready (pid %d)", self.name, process.pid)
            watchdog = asyncio.create_task(self._watch_liveness(process))
            await asyncio.wait({exited})
            watchdog.cancel()
        elif not exited.done():
            log.error(
                "%s not ready within %.1fs; killing it", self.name, self.settings.ready_timeout
            )
            _kill(process, signal.SIGKILL)
            await exited
        self.last_exit = _describe_exit(exited.result())
        self.pid = None
        # What it left behind in its session goes with it (gunicorn workers of a killed
        # master would hold its socket, and the next start would find it taken).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if self._stopping.is_set():
            log.info("%s stopped (%s)", self.name, self.last_exit)
        else:
            log.error("%s died: %s", self.name, self.last_exit)
        return ready

    async def _spawn(self) -> asyncio.subprocess.Process | None:
        try:
            launch = self.launch()
        except SocketError as exc:  # e.g. a leftover of the last run still holds it
            self.last_exit = f"could not start: {exc}"
            log.error("%s: %s", self.name, self.last_exit)
            return None
        try:
            return await asyncio.create_subprocess_exec(
                *launch.argv,
                env=launch.env,
                pass_fds=launch.pass_fds,
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches the supervisor only
                preexec_fn=launch.preexec_fn,
            )
        except OSError as exc:
            self.last_exit = f"could not start {launch.argv[0]!r}: {exc.strerror}"
            log.error("%s: %s", self.name, self.last_exit)
            return None

    async def _await_ready(self, exited: asyncio.Task[int]) -> bool:
        address, path = self.ready_check
        deadline = time.monotonic() + self.settings.ready_timeout
        while time.monotonic() < deadline and not exited.done():
            if self._stopping.is_set():
                return False
            if await probe(address, path, timeout=min(1.0, self.settings.ready_timeout)):
                return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(exited), READY_POLL)
        return False

    async def _watch_liveness(self, process: Process) -> None:
        """A live PID is not enough: a child that stops answering is killed and restarted.

        One kept-alive session per child: with 64 servers, a new connection per probe
        was a measurable share of the stack's CPU.
        """
        failures = 0
        client: aiohttp.ClientSession | None = None
        target: Address | None = None
        try:
            while True:
                await asyncio.sleep(LIVENESS_INTERVAL)
                # Read each time: a handover moves a child's admin socket.
                address, path = self.ready_check
                if self.admin is not None:
                    address, path = self.admin, "/healthz"
                if client is None or address != target:
                    if client is not None:
                        await client.close()
                    client, target = session(address, LIVENESS_TIMEOUT), address
                if await answers(client, path):
                    failures = 0
                    continue
                failures += 1
                if failures >= LIVENESS_FAILURES and not self._stopping.is_set():
                    log.error(
                        "%s did not answer %s %d times; killing it", self.name, path, failures
                    )
                    _kill(process, signal.SIGKILL)
                    return
        finally:
            if client is not None:
                await client.close()

    async def stop(self, timeout: float) -> None:
        """SIGTERM, up to ``timeout`` to finish in-flight work, then SIGKILL."""
        self._stopping.set()
        process = self._process
        if process is not None and process.returncode is None:
            self.state = State.STOPPING
            _kill(process, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), timeout)
            except TimeoutError:
                log.error("%s did not stop within %.1fs; sending SIGKILL", self.name, timeout)
                _kill(process, signal.SIGKILL)
                await process.wait()
        if self._task is not None:
            await self._task
        self.state = State.STOPPED

    def status(self) -> dict[str, object]:
        return {
            "name": self.name,
            "role": self.role,
            "group": self.id.group_name,
            "pid": self.pid,
            "state": "draining" if self.draining and self.state == State.READY else str(self.state),
            "restarts": self.restarts,
            "listen": [str(a) for a in self.listen],
            "admin": None if self.admin is None else str(self.admin),
            "started_at": self.started_at,
            "last_exit": self.last_exit,
        }


def _kill(process: Process, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


def python_argv() -> list[str]:
    """The command line that runs a built-in child (balancer, proxy, simulated server)."""
    return [sys.executable, "-m", "lbstack.worker"]
