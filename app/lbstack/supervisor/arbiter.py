"""The supervisor: binds every socket, spawns the stack tier by tier, keeps it running.

Like gunicorn's Arbiter: signal handlers only queue the signal and the main loop
dispatches it; sockets are bound once here and inherited by every (re)started child;
one graceful timeout, then SIGKILL. The supervisor knows its children only through
their sockets, their admin HTTP API and the config: it imports no data-plane module.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import shlex
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TextIO

from aiohttp import web

from lbstack import sockets
from lbstack.address import Address, parse_address
from lbstack.component import (
    ChildSpec,
    UpstreamSpec,
    balancer_name,
    proxy_name,
    server_name,
)
from lbstack.config import Config, GroupLayout
from lbstack.errors import ControlError, LbstackError, StartupError
from lbstack.log import get_logger
from lbstack.rundir import RunDir
from lbstack.supervisor.autoscaler import Autoscaler
from lbstack.supervisor.child import Child, Launch, python_argv
from lbstack.supervisor.control import create_control_app, create_metrics_app
from lbstack.supervisor.reload import Reloader
from lbstack.supervisor.scaling import Scaler, upstream_body
from lbstack.supervisor.telemetry import SupervisorMetrics
from lbstack.supervisor.upgrade import HANDLED_SIGNALS, ChildState, Resume, upgrade

log = get_logger("supervisor")
PR_SET_PDEATHSIG = 1
BOOT_CONCURRENCY = 2  # children booting at once, per CPU


class Supervisor:
    """Runs one stack described by a Config until told to stop."""

    def __init__(
        self,
        config: Config,
        out: TextIO = sys.stdout,
        source: Callable[[], Config] | None = None,
        resume: Resume | None = None,
    ) -> None:
        """``source`` re-reads the config (file and flags) for a reload."""
        self.config = config
        self.run_dir = RunDir(config.resolved_run_dir())
        self.out = out
        self.children: dict[str, Child] = {}
        self.started_at = resume.started_at if resume else time.time()
        self.upgrades = resume.upgrades if resume else 0
        self._resume = resume  # a re-executed supervisor takes over sockets and children
        self.stopping = False
        self.metrics = SupervisorMetrics(self)
        self.metrics_address: Address | None = None
        self.scaler = Scaler(self)
        self.autoscaler = Autoscaler(self)
        self.reloader = Reloader(self, source)
        self._reloading: asyncio.Task[Any] | None = None
        self._sockets: dict[Address, socket.socket] = {}
        self._foreign_paths: list[Address] = []  # sockets our command-run servers create
        self._runners: list[web.BaseRunner] = []
        self.retiring: list[Child] = []  # replaced children still draining
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._fatal: str | None = None
        self._fatal_event = asyncio.Event()
        # Set once every tier was ready: from then on a child that can't start fails
        # only what started it, never the stack.
        self._booted = False

    # ---- the main loop -------------------------------------------------------------

    async def run(self) -> int:
        """Start the stack, serve until a stop signal or a fatal failure; the exit status."""
        try:
            if self._resume is None:
                self._prepare()
            else:
                self._take_sockets(self._resume)
            await self._serve_control()
            self._install_signals()
            self._plan_children()
            if self._resume is None:
                started = await self._start_tiers()
            else:
                started = await self._adopt_children(self._resume)
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

    # ---- sockets -------------------------------------------------------------------

    def _prepare(self) -> None:
        layouts = self.config.layouts()
        longest = max(
            [balancer_name(self.config.balancers - 1)]
            + [server_name(g.index, g.servers - 1) for g in layouts],
            key=len,
        )
        self.run_dir.check_length(longest)
        self.run_dir.prepare()
        self._bind(self.run_dir.balancer, sockets.DATA_MODE)
        for address in self.config.listen:
            self._bind(address, sockets.DATA_MODE)
        self._bind(self.run_dir.control, sockets.ADMIN_MODE)
        if self.config.metrics_listen is not None:
            sock = self._bind(self.config.metrics_listen, sockets.ADMIN_MODE)
            self.metrics_address = _bound_address(self.config.metrics_listen, sock)

    def _bind(self, address: Address, mode: int) -> socket.socket:
        sock = self._sockets.get(address)
        if sock is None:
            sock = self._sockets[address] = sockets.bind(address, mode)
        return sock

    def _fds(self, addresses: Iterable[Address]) -> tuple[int, ...]:
        return tuple(self._sockets[a].fileno() for a in addresses)

    # ---- children ------------------------------------------------------------------

    def _plan_children(self) -> None:
        layouts = self.config.layouts()
        for layout in layouts:
            for index in self._server_indices(layout):
                self._add(self._plan_server(layout, index))
        for layout in layouts:
            self._add(self._plan_proxy(layout))
        for index in range(self.config.balancers):
            self._add(self._plan_balancer(index))
        self._write_targets()

    def _server_indices(self, layout: GroupLayout) -> list[int]:
        """The group's servers: as the config says, or as they run when resuming (scale
        steps and surges change both count and names)."""
        if self._resume is None:
            return list(range(layout.servers))
        prefix = server_name(layout.index, 0).rsplit("-", 1)[0] + "-"
        return [
            int(c.name[len(prefix) :]) for c in self._resume.children if c.name.startswith(prefix)
        ]

    def _add(self, child: Child | None) -> None:
        if child is not None:
            self.children[child.name] = child
            self.metrics.track(child)

    def _child(
        self,
        name: str,
        role: str,
        group: int | None,
        listen: list[Address],
        admin: Address | None,
        launch: Callable[[], Launch],
        ready_check: tuple[Address, str],
    ) -> Child:
        return Child(
            name=name,
            role=role,
            group=group,
            listen=listen,
            admin=admin,
            launch=launch,
            ready_check=ready_check,
            settings=self.config.supervisor,
            on_give_up=self._on_give_up,
            on_restart=self._on_restart,
        )

    def _builtin(
        self,
        name: str,
        role: str,
        group: int | None,
        listen: list[Address],
        upstreams: Callable[[], tuple[UpstreamSpec, ...]] = tuple,
        admin: Address | None = None,
        peers: Callable[[], tuple[Address, ...]] = tuple,
    ) -> Child:
        """A child running our own code (``python -m lbstack.worker``) on bound sockets.

        Its admin socket is ``admin`` (default: its own name's); every (re)start
        inherits whatever socket ``child.admin`` names then, which a handover changes.
        """
        for address in listen:
            self._bind(address, sockets.DATA_MODE)
        admin = admin or self.run_dir.admin(name)
        self._bind(admin, sockets.ADMIN_MODE)
        itself: list[Child] = []

        def launch() -> Launch:
            admin_fd = self._fds([itself[0].admin or admin])[0]
            spec = ChildSpec(
                name=name,
                role=role,
                group=group,
                listen_fds=self._fds(listen),
                tls_fds=self._fds(a for a in listen if a.is_tls),
                admin_fd=admin_fd,
                upstreams=upstreams(),
                peers=peers(),
                parent_pid=os.getpid(),
                config=self.config,
            )
            return Launch(
                argv=python_argv(),
                env={**os.environ, **spec.to_env()},
                pass_fds=(*spec.listen_fds, spec.admin_fd),
            )

        child = self._child(name, role, group, listen, admin, launch, (admin, "/readyz"))
        itself.append(child)
        return child

    def _plan_server(
        self, layout: GroupLayout, index: int, admin: Address | None = None
    ) -> Child | None:
        name = server_name(layout.index, index)
        server = layout.server
        if server.kind == "simulated":
            listen = [self.run_dir.data(name)]
            return self._builtin(name, "server", layout.index, listen, admin=admin)
        if server.kind == "address":
            return None
        data = self.run_dir.data(name)
        self._foreign_paths.append(data)  # its command binds it; launch clears a stale one
        argv = [
            part.replace("{socket}", data.path).replace("{name}", name)
            for part in shlex.split(server.command)
        ]

        def launch() -> Launch:
            sockets.clear_stale(data.path)
            return Launch(argv=argv, env=dict(os.environ), preexec_fn=die_with_parent)

        return self._child(
            name, "server", layout.index, [data], None, launch, (data, server.health_path)
        )

    def _servers_of(self, layout: GroupLayout) -> tuple[UpstreamSpec, ...]:
        server = layout.server
        if server.kind == "address":
            return tuple(
                UpstreamSpec(
                    name=server_name(layout.index, i),
                    address=address,
                    health_path=server.health_path,
                )
                for i, address in enumerate(server.addresses)
            )
        names = [
            n for n, c in self.children.items() if c.role == "server" and c.group == layout.index
        ]
        return tuple(
            UpstreamSpec(
                name=n,
                address=self.children[n].listen[0],
                admin=self.children[n].admin,
                health_path=server.health_path,
                draining=self.children[n].draining,
            )
            for n in names
        )

    def _plan_proxy(self, layout: GroupLayout, admin: Address | None = None) -> Child:
        name = proxy_name(layout.index)
        return self._builtin(
            name,
            "proxy",
            layout.index,
            [self.run_dir.data(name)],
            upstreams=lambda: self._servers_of(self.config.group(layout.index)),
            admin=admin,
        )

    def _plan_balancer(self, index: int, admin: Address | None = None) -> Child:
        def proxies() -> tuple[UpstreamSpec, ...]:
            return tuple(
                UpstreamSpec(name=c.name, address=c.listen[0], admin=c.admin, draining=c.draining)
                for c in self.children.values()
                if c.role == "proxy"
            )

        def peers() -> tuple[Address, ...]:
            # The other balancers' admin sockets, whose load views this one folds in.
            count = self.config.balancers
            return tuple(self.run_dir.admin(balancer_name(i)) for i in range(count) if i != index)

        listen = [self.run_dir.balancer, *self.config.listen]
        return self._builtin(
            balancer_name(index), "balancer", None, listen, proxies, admin, peers=peers
        )

    # ---- membership at runtime (see scaling.py) --------------------------------------

    def servers_in(self, group: int) -> list[Child]:
        """Group ``group``'s server children, in index order."""
        servers = [c for c in self.children.values() if c.role == "server" and c.group == group]
        return sorted(servers, key=lambda c: int(c.name.rsplit("-", 1)[1]))

    def add_server(self, group: int) -> Child:
        """Bind and register (not start) the next server of ``group``."""
        existing = self.servers_in(group)
        index = 1 + max((int(c.name.rsplit("-", 1)[1]) for c in existing), default=-1)
        name = server_name(group, index)
        self.run_dir.check_length(name)
        child = self._plan_server(self.config.group(group), index)
        assert child is not None  # address groups are refused before this
        self._add(child)
        self._write_targets()
        return child

    async def remove_server(self, child: Child) -> None:
        """Stop a server child and release its sockets."""
        await child.stop(self.config.supervisor.graceful_timeout + 1.0)
        del self.children[child.name]
        for address in (*child.listen, *([child.admin] if child.admin else [])):
            sock = self._sockets.pop(address, None)
            if sock is not None:
                sock.close()
                sockets.unlink(address)
        self._write_targets()

    async def start_balancer(self, index: int) -> Child:
        """Start one more balancer on the shared listeners (a reload's ``balancers``)."""
        child = self._plan_balancer(index)
        self._add(child)
        child.start()
        if not await child.wait_ready():
            await self.stop_balancer(child)
            raise ControlError(f"{child.name} did not become ready: {child.last_exit}")
        self._write_targets()
        return child

    async def stop_balancer(self, child: Child) -> None:
        """Stop a balancer for good; the shared listeners stay with the others."""
        await child.stop(self.config.supervisor.graceful_timeout + 1.0)
        self.children.pop(child.name, None)
        self.release(child)
        self._write_targets()

    def config_changed(self) -> None:
        """After a reload: what is derived from the config follows it."""
        self._write_targets()
        self.autoscaler.reconfigure()

    # ---- handover: a child replaced by a successor on the same sockets (reload.py) -----

    def plan_successor(self, old: Child) -> Child:
        """Bind a successor admin socket and plan (not start) ``old``'s successor.

        It shares ``old``'s data sockets and gets the config as it is now.
        """
        admin = self.run_dir.successor_admin(old.name)
        sockets.clear_stale(admin.path)  # a leftover of an interrupted reload
        self._sockets.pop(admin, None)
        if old.role == "balancer":
            index = int(old.name.rsplit("-", 1)[1])
            return self._plan_balancer(index, admin)
        assert old.group is not None
        layout = self.config.group(old.group)
        if old.role == "proxy":
            return self._plan_proxy(layout, admin)
        child = self._plan_server(layout, int(old.name.rsplit("-", 1)[1]), admin)
        assert child is not None
        return child

    def take_over(self, new: Child, old: Child) -> None:
        """Point ``old``'s admin path at ``new``; ``old`` stays reachable at its retiring
        path while it drains. The path never stops answering: a hard link keeps the old
        socket there until the rename puts the new one in its place, atomically."""
        assert new.admin is not None and old.admin is not None
        canonical, successor = old.admin, new.admin
        retiring = self.run_dir.retiring_admin(old.name)
        sockets.clear_stale(retiring.path)
        os.link(canonical.path, retiring.path)
        os.rename(successor.path, canonical.path)
        self._sockets[retiring] = self._sockets.pop(canonical)
        self._sockets[canonical] = self._sockets.pop(successor)
        old.admin, old.ready_check = retiring, (retiring, "/readyz")
        new.admin, new.ready_check = canonical, (canonical, "/readyz")
        new.draining = old.draining  # the routers' drain is by name: it still stands
        self.children[new.name] = new
        self.retiring.append(old)

    def release(self, child: Child) -> None:
        """Forget a stopped handover party (a drained predecessor, or a successor that never
        took over): close and remove the admin socket it was left with."""
        self.retiring = [c for c in self.retiring if c is not child]
        if child.admin is not None:
            sock = self._sockets.pop(child.admin, None)
            if sock is not None:
                sock.close()
                sockets.unlink(child.admin)

    def upstream_spec(self, child: Child) -> dict[str, Any]:
        """What a router's POST /upstreams takes for ``child``."""
        assert child.group is not None
        health_path = self.config.group(child.group).server.health_path
        return upstream_body(child.name, child.listen[0], child.admin, health_path)

    def _tiers(self) -> list[list[Child]]:
        by_role: dict[str, list[Child]] = {"server": [], "proxy": [], "balancer": []}
        for child in self.children.values():
            by_role[child.role].append(child)
        return [by_role["server"], by_role["proxy"], by_role["balancer"]]

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

        for tier in self._tiers():
            results = await asyncio.gather(*(boot(c) for c in tier))
            if not all(results) or self._fatal is not None:
                return False
        return True

    # ---- upgrade: the supervisor re-executes itself (upgrade.py) ----------------------

    def snapshot(self) -> Resume:
        """What a re-executed supervisor needs to take over from this one."""
        return Resume(
            config=self.config,
            sockets={str(address): sock.fileno() for address, sock in self._sockets.items()},
            metrics_address=None if self.metrics_address is None else str(self.metrics_address),
            children=tuple(
                ChildState(
                    name=c.name,
                    pid=c.pid,
                    restarts=c.restarts,
                    draining=c.draining,
                    started_at=c.started_at,
                )
                for c in self.children.values()
            ),
            started_at=self.started_at,
            upgrades=self.upgrades + 1,
            signals=self._unhandled_signals(),
        )

    def _unhandled_signals(self) -> tuple[int, ...]:
        """Signals received and not acted on yet: queued ones, and a SIGHUP whose reload
        waits for the membership lock."""
        queued = []
        while not self._signals.empty():
            queued.append(self._signals.get_nowait())
        for sig in queued:  # looked at, not taken
            self._signals.put_nowait(sig)
        if self._reloading is not None and not self._reloading.done():
            queued.append(signal.SIGHUP)
        return tuple(int(s) for s in queued)

    async def upgrade(self, answer: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        """Re-execute the supervisor (see upgrade.py): ``answer`` tells the client it
        goes ahead, then this image ends; ControlError if it can't, nothing changed."""
        async with self.scaler.lock:  # released only if the upgrade fails
            if self.retiring:
                raise ControlError("a replacement is still draining; try again in a moment")
            await upgrade(self, lambda: answer({"upgrading": os.getpid()}))

    def _take_sockets(self, resume: Resume) -> None:
        """The sockets the previous image bound, by their inherited descriptors."""
        for text, descriptor in resume.sockets.items():
            sock = socket.socket(fileno=descriptor)
            sock.set_inheritable(False)  # children get theirs through pass_fds
            self._sockets[parse_address(text)] = sock
        if resume.metrics_address is not None:
            self.metrics_address = parse_address(resume.metrics_address)

    async def _adopt_children(self, resume: Resume) -> bool:
        """Watch the children the previous image started; start any that was between two
        runs. Whether every one is ready."""
        states = {c.name: c for c in resume.children}
        adopted = 0
        for child in self.children.values():
            state = states.get(child.name)
            if state is not None:
                child.restarts, child.draining = state.restarts, state.draining
                child.started_at = state.started_at
            if state is not None and state.pid is not None:
                child.adopt(state.pid)
                adopted += 1
            else:
                child.start()
        results = await asyncio.gather(*(c.wait_ready() for c in self.children.values()))
        log.info(
            "upgrade %d: supervisor re-executed (pid %d), %d children adopted, %d started",
            self.upgrades,
            os.getpid(),
            adopted,
            len(self.children) - adopted,
        )
        return all(results) and self._fatal is None

    async def _shutdown(self) -> None:
        """Balancers first, servers last; then sockets and files."""
        timeout = self.config.supervisor.graceful_timeout + 1.0
        await asyncio.gather(*(child.stop(timeout) for child in self.retiring))
        for tier in reversed(self._tiers()):
            await asyncio.gather(*(child.stop(timeout) for child in tier))
        for runner in reversed(self._runners):
            await runner.cleanup()
        for address, sock in self._sockets.items():
            sock.close()
            sockets.unlink(address)
        for address in self._foreign_paths:
            with contextlib.suppress(LbstackError):
                sockets.clear_stale(address.path)
        with contextlib.suppress(FileNotFoundError):
            self.run_dir.targets_file.unlink()
        log.info("stack stopped")

    # ---- control plane -------------------------------------------------------------

    async def _serve_control(self) -> None:
        control = web.AppRunner(create_control_app(self), access_log=None)
        await control.setup()
        self._runners.append(control)
        await web.SockSite(control, self._sockets[self.run_dir.control]).start()
        if self.config.metrics_listen is not None:
            exporter = web.AppRunner(create_metrics_app(self), access_log=None)
            await exporter.setup()
            self._runners.append(exporter)
            await web.SockSite(exporter, self._sockets[self.config.metrics_listen]).start()

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
            "components": [supervisor, *(c.status() for c in self.children.values())],
            "autoscale": self.autoscaler.status(),
        }

    def _write_targets(self) -> None:
        """The file_sd targets file Prometheus reads to scrape every component."""
        if self.metrics_address is None:
            return
        host = f"{self.metrics_address.host}:{self.metrics_address.port}"
        groups = [{"targets": [host], "labels": {"lbstack_target": "supervisor"}}]
        groups += [
            {"targets": [host], "labels": {"lbstack_target": name}}
            for name, child in self.children.items()
            if child.admin is not None
        ]
        tmp = self.run_dir.targets_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups, indent=2))
        tmp.replace(self.run_dir.targets_file)

    def _announce(self) -> None:
        if self._resume is not None:
            print(
                f"lbstack upgraded: supervisor pid {os.getpid()} re-executed, "
                f"{len(self.children)} children adopted",
                file=self.out,
                flush=True,
            )
            return
        servers = sum(layout.servers for layout in self.config.layouts())
        socket_path = self.run_dir.balancer.path
        lines = [
            f"lbstack up: {self.config.balancers} balancer(s), {self.config.proxies} proxies, "
            f"{servers} servers; run dir {self.run_dir.path}",
            f"  balancer: {self.run_dir.balancer}",
            *(f"            {a}" for a in self.config.listen),
        ]
        if self.metrics_address is not None:
            lines.append(f"  metrics:  {self.metrics_address.http_base}/metrics")
        lines += [
            f"  try:      curl --unix-socket {socket_path} http://localhost/",
            f"  status:   lbstack status --run-dir {self.run_dir.path}",
            "  stop:     Ctrl-C",
        ]
        print("\n".join(lines), file=self.out, flush=True)


def _bound_address(address: Address, sock: socket.socket) -> Address:
    """The address actually bound (a tcp port 0 becomes the port the kernel chose)."""
    if address.is_unix:
        return address
    return Address("tcp", host=address.host, port=sock.getsockname()[1])


def die_with_parent() -> None:
    """preexec hook: SIGTERM this child when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
