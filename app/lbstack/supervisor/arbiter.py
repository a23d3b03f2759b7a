"""The supervisor's arbiter: binds the sockets, starts the stack tier by tier, and runs
the signal loop until told to stop.

Like gunicorn's Arbiter: signal handlers only queue the signal and the main loop
dispatches it; one graceful timeout, then SIGKILL. Everything else is wiring: the
stack's model is the ``Topology``, its changes go through one ``Membership``, and
scaling, reload, the autoscaler, the upgrade and the control API each get the narrow
pieces they act on. The supervisor knows its children only through their sockets, their
admin HTTP API and the config: it imports no data-plane module.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from aiohttp import web

from lbstack import sockets
from lbstack.address import Address, parse_address
from lbstack.config import Config
from lbstack.errors import ControlError, LbstackError, StartupError
from lbstack.identity import Role
from lbstack.log import get_logger
from lbstack.rundir import RunDir
from lbstack.supervisor.autoscaler import Autoscaler
from lbstack.supervisor.child import Child
from lbstack.supervisor.control import (
    Answer,
    ControlPlane,
    create_control_app,
    create_metrics_app,
)
from lbstack.supervisor.membership import Membership
from lbstack.supervisor.reload import Reloader
from lbstack.supervisor.scaling import Scaler
from lbstack.supervisor.telemetry import INSTANCE, ROLE, SupervisorMetrics, write_targets
from lbstack.supervisor.topology import Hooks, Topology
from lbstack.supervisor.upgrade import (
    HANDLED_SIGNALS,
    STATE_FILE,
    Resume,
    adopt,
    state_of,
    upgrade,
)

log = get_logger("supervisor")
BOOT_CONCURRENCY = 2  # children booting at once, per CPU


class Arbiter:
    """Runs one stack described by a Config until told to stop."""

    def __init__(
        self,
        config: Config,
        out: TextIO = sys.stdout,
        source: Callable[[], Config] | None = None,
        resume: Resume | None = None,
    ) -> None:
        """``source`` re-reads the config (file and flags) for a reload; ``resume`` is
        what the image before an upgrade left to take over."""
        self.out = out
        self.started_at = resume.started_at if resume else time.time()
        self.upgrades = resume.upgrades if resume else 0
        self._resume = resume
        self.stopping = False
        self.topology = Topology(
            config,
            RunDir(config.resolved_run_dir()),
            Hooks(
                on_give_up=self._on_give_up,
                on_restart=self._on_restart,
                on_added=self._on_added,
                on_changed=self._write_targets,
            ),
        )
        self.metrics = SupervisorMetrics(config, lambda: self.topology)
        self.metrics_address: Address | None = None
        self.membership = Membership()
        self.scaler = Scaler(self.topology, self.membership, self._scale_step)
        self.reloader = Reloader(
            self.topology,
            self.membership,
            self.scaler,
            source,
            on_replaced=self.metrics.replaced,
            on_config=self._config_changed,
        )
        self.autoscaler = Autoscaler(self.topology, self.membership, self.scaler, self.metrics)
        self._reloading: asyncio.Task[Any] | None = None
        self._runners: list[web.BaseRunner] = []
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._fatal: str | None = None
        self._fatal_event = asyncio.Event()
        # Set once every tier was ready: from then on a child that can't start fails
        # only what started it, never the stack.
        self._booted = False

    @property
    def run_dir(self) -> RunDir:
        return self.topology.run_dir

    @property
    def config(self) -> Config:
        return self.topology.config

    # ---- the main loop -------------------------------------------------------------

    async def run(self) -> int:
        """Start the stack, serve until a stop signal or a fatal failure; the exit status."""
        try:
            self._take_sockets()
            await self._serve_control()
            self._install_signals()
            if self._resume is None:
                self.topology.plan()
                started = await self._start_tiers()
            else:
                self.topology.plan(c.name for c in self._resume.children)
                started = await adopt(self.topology, self._resume) and self._fatal is None
            if started:
                self._booted = True
                self._announce()
                self.autoscaler.start()
                await self._loop()
        finally:
            self.stopping = True
            if self._reloading is not None:
                self._reloading.cancel()
            await self.autoscaler.stop()
            await self._shutdown()
        if self._fatal is not None:
            raise StartupError(self._fatal)
        return 0

    async def _loop(self) -> None:
        handlers: dict[signal.Signals, Callable[[], bool]] = {
            signal.SIGTERM: self.handle_term,
            signal.SIGINT: self.handle_int,
            signal.SIGHUP: self.handle_hup,
        }
        fatal = asyncio.create_task(self._fatal_event.wait())
        try:
            while True:
                received = asyncio.create_task(self._signals.get())
                await asyncio.wait({received, fatal}, return_when=asyncio.FIRST_COMPLETED)
                if fatal.done():
                    received.cancel()
                    return
                if handlers[received.result()]():
                    return
        finally:
            fatal.cancel()

    def handle_term(self) -> bool:
        log.info("SIGTERM: stopping the stack")
        return True

    def handle_int(self) -> bool:
        log.info("SIGINT: stopping the stack")
        return True

    def handle_hup(self) -> bool:
        """Reload in the background: the loop must stay free for SIGTERM."""
        if self._reloading is not None and not self._reloading.done():
            log.warning("SIGHUP: a reload is already running; ignored")
            return False
        log.info("SIGHUP: reloading the configuration")
        self._reloading = asyncio.create_task(self._reload_logged(), name="reload")
        return False

    async def _reload_logged(self) -> None:
        try:
            await self.reloader.reload()
        except LbstackError as exc:  # ConfigError or ControlError: the stack is unchanged
            log.error("reload rejected, the stack keeps running as it was: %s", exc)

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in HANDLED_SIGNALS:
            loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        # An upgrade blocks them across the exec (upgrade.py): what arrived meanwhile is
        # pending, and is handled now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        for number in self._resume.signals if self._resume is not None else ():
            self._signals.put_nowait(signal.Signals(number))  # received before the exec

    def _on_give_up(self, child: Child, message: str) -> None:
        """A child could not be started. While the stack boots that stops the stack;
        later it fails only what started the child (a scale step or a replacement),
        which reports it and leaves the stack as it was."""
        if self._booted:
            log.error("%s: given up", message)
            return
        if self._fatal is None:
            self._fatal = message
            log.error("giving up: %s", message)
        self._fatal_event.set()

    def _on_restart(self, child: Child) -> None:
        self.metrics.restarted(child)

    def _on_added(self, child: Child) -> None:
        self.metrics.track(child)

    def _scale_step(self, group: str, direction: str) -> None:
        self.metrics.scale_events.labels(ROLE, INSTANCE, group, direction).inc()

    def _config_changed(self) -> None:
        """After a reload: what is derived from the config follows it."""
        self._write_targets()
        self.autoscaler.reconfigure()

    # ---- starting and stopping -------------------------------------------------------

    def _take_sockets(self) -> None:
        """Bind every socket of the stack's own, or take the previous image's."""
        held = self.topology.sockets
        if self._resume is not None:
            held.take(self._resume.sockets)
            if self._resume.metrics_address is not None:
                self.metrics_address = parse_address(self._resume.metrics_address)
            return
        self.topology.prepare()
        held.bind(self.run_dir.control, sockets.ADMIN_MODE)
        if self.config.metrics_listen is not None:
            sock = held.bind(self.config.metrics_listen, sockets.ADMIN_MODE)
            self.metrics_address = sockets.bound_address(self.config.metrics_listen, sock)

    async def _start_tiers(self) -> bool:
        """Servers, then proxies, then balancers, each tier ready before the next.

        At most ``BOOT_CONCURRENCY`` per CPU boot at once: a Python child's boot is
        CPU-bound imports, and 64 of them at once on 2 cores would miss their
        ready timeout and be killed and restarted.
        """
        booting = asyncio.Semaphore(BOOT_CONCURRENCY * (os.cpu_count() or 1))

        async def boot(child: Child) -> bool:
            async with booting:
                child.start()
                return await child.wait_ready()

        for tier in self.topology.tiers():
            results = await asyncio.gather(*(boot(c) for c in tier))
            if not all(results) or self._fatal is not None:
                return False
        return True

    async def _shutdown(self) -> None:
        """Balancers first, servers last; then sockets and files."""
        timeout = self.config.supervisor.graceful_timeout + 1.0
        await asyncio.gather(*(child.stop(timeout) for child in self.topology.retiring))
        for tier in reversed(self.topology.tiers()):
            await asyncio.gather(*(child.stop(timeout) for child in tier))
        for runner in reversed(self._runners):
            await runner.cleanup()
        self.topology.close()
        self.run_dir.targets_file.unlink(missing_ok=True)
        log.info("stack stopped")

    # ---- upgrade: the supervisor re-executes itself (upgrade.py) ----------------------

    def snapshot(self) -> Resume:
        """What a re-executed supervisor needs to take over from this one."""
        return state_of(
            self.topology,
            metrics_address=self.metrics_address,
            started_at=self.started_at,
            upgrades=self.upgrades + 1,
            signals=_pending(self._signals, self._reloading),
        )

    async def upgrade(self, answer: Answer) -> None:
        """Re-execute the supervisor (see upgrade.py): ``answer`` tells the client it
        goes ahead, then this image ends; ControlError if it can't, nothing changed."""
        async with self.membership.change("upgrade"):  # released only if it fails
            if self.topology.retiring:
                raise ControlError("a replacement is still draining; try again in a moment")
            await upgrade(
                self.snapshot,
                self.run_dir.path / STATE_FILE,
                lambda: self.stopping,
                lambda: answer({"upgrading": os.getpid()}),
            )

    # ---- control plane -------------------------------------------------------------

    async def _serve_control(self) -> None:
        plane = ControlPlane(
            topology=self.topology,
            scaler=self.scaler,
            reloader=self.reloader,
            registry=self.metrics.registry,
            status=self.status,
            upgrade=self.upgrade,
        )
        sites = [(create_control_app(plane), self.run_dir.control)]
        if self.config.metrics_listen is not None:  # held under the address configured
            sites.append((create_metrics_app(plane), self.config.metrics_listen))
        for app, address in sites:
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            self._runners.append(runner)
            await web.SockSite(runner, self.topology.sockets.get(address)).start()

    def status(self) -> dict[str, Any]:
        """The stack as ``lbstack status --json`` prints it (a contract)."""
        supervisor = {
            "name": "supervisor",
            "role": "supervisor",
            "group": None,
            "pid": os.getpid(),
            "state": "stopping" if self._fatal_event.is_set() else "ready",
            "restarts": 0,
            "listen": [str(self.run_dir.control)],
            "admin": str(self.run_dir.control),
            "started_at": self.started_at,
            "last_exit": None,
            "upgrades": self.upgrades,
        }
        return {
            "run_dir": str(self.run_dir.path),
            "balancer": [str(self.run_dir.balancer), *(str(a) for a in self.config.listen)],
            "metrics": None if self.metrics_address is None else str(self.metrics_address),
            "components": [supervisor, *(c.status() for c in self.topology)],
            "autoscale": self.autoscaler.status(),
        }

    def _write_targets(self) -> None:
        if self.metrics_address is not None:
            write_targets(self.run_dir.targets_file, self.metrics_address, self.topology)

    def _announce(self) -> None:
        if self._resume is not None:
            line = f"{len(self.topology.children)} children adopted"
            print(
                f"lbstack upgraded: supervisor pid {os.getpid()} re-executed, {line}",
                file=self.out,
                flush=True,
            )
            return
        print(banner(self.topology, self.metrics_address), file=self.out, flush=True)


def _pending(
    signals: asyncio.Queue[signal.Signals], reloading: asyncio.Task[Any] | None
) -> tuple[int, ...]:
    """Signals received and not acted on yet: queued ones, and a SIGHUP whose reload
    waits for the membership lock."""
    queued = []
    while not signals.empty():
        queued.append(signals.get_nowait())
    for sig in queued:  # looked at, not taken
        signals.put_nowait(sig)
    if reloading is not None and not reloading.done():
        queued.append(signal.SIGHUP)
    return tuple(int(s) for s in queued)


def banner(topology: Topology, metrics: Address | None) -> str:
    """What ``lbstack up`` prints once the stack is ready (tests wait for its lines)."""
    config, run_dir = topology.config, topology.run_dir
    plural = {Role.BALANCER: "balancers", Role.PROXY: "proxies", Role.SERVER: "servers"}
    counts = ", ".join(
        f"{n} {role if n == 1 else plural[role]}"
        for role in reversed(Role)
        if topology.placement.runs(role)
        for n in [len(topology.of_role(role))]
    )
    tier = "" if config.tier == "all" else f"tier {config.tier}, "
    lines = [f"lbstack up: {tier}{counts}; run dir {run_dir.path}"]
    if topology.placement.runs(Role.BALANCER):
        lines.append(f"  balancer: {run_dir.balancer}")
        lines += [f"            {a}" for a in config.listen]
    else:
        listening = [str(a) for c in topology for a in c.listen if not a.is_unix]
        lines += [f"  listen:   {a}" for a in listening]
    if metrics is not None:
        lines.append(f"  metrics:  {metrics.http_base}/metrics")
    if topology.placement.runs(Role.BALANCER):
        lines.append(f"  try:      curl --unix-socket {run_dir.balancer.path} http://localhost/")
    lines += [
        f"  status:   lbstack status --run-dir {run_dir.path}",
        "  stop:     Ctrl-C",
    ]
    return "\n".join(lines)
