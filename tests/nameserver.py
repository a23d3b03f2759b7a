"""A real nameserver for the discovery tests: dnsmasq on 127.0.0.1 at a free port,
answering for ``.test`` from files the test writes; and upstreams on loopback TCP
addresses (127.0.0.2, 127.0.0.3, ...: all of 127/8 is loopback on Linux) for the
records to name.

dnsmasq re-reads its hosts file on SIGHUP (``set_hosts`` waits for the line that says
so); anything else in its config (SRV and TXT records) takes a ``restart``.
Readiness is a query it answers, never a sleep.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

from aiohttp import web

from lbstack.config import Discovery, parse_dns_name
from lbstack.discovery import DiscoveryError, Resolver
from tests.conftest import SHUTDOWN_TIMEOUT, UnixServers
from tests.harness import tool

WAIT: Final = 10.0
READY_NAME: Final = "ready.test"


def dnsmasq_binary() -> str:
    """dnsmasq's path (it lives in /usr/sbin, often not on a user's PATH)."""
    return tool("dnsmasq", Path("/usr/sbin/dnsmasq"), package="dnsmasq-base")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on at ``host`` now, UDP and TCP."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((host, 0))
        port: int = udp.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind((host, port))
    return port


async def until_true(check: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Poll ``check`` until it returns true, failing after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)  # wait-ok: polling with a deadline


class Dnsmasq:
    """One dnsmasq process; ``hosts`` maps each name to its addresses, ``conf`` holds
    other lines (``srv-host=...``, ``txt-record=...``)."""

    def __init__(self, directory: Path, *, local_ttl: int = 1) -> None:
        self.directory = directory
        self.local_ttl = local_ttl
        self.port = 0
        self.hosts_file = directory / "hosts"
        self.conf_file = directory / "dnsmasq.conf"
        self.log_file = directory / "dnsmasq.log"
        self.hosts: dict[str, list[str]] = {}
        self.conf: list[str] = []
        self._process: asyncio.subprocess.Process | None = None

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def _write(self) -> None:
        lines = [f"127.0.0.1 {READY_NAME}"]
        lines += [f"{ip} {name}" for name, ips in self.hosts.items() for ip in ips]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        self.conf_file.write_text("\n".join(["local=/test/", *self.conf]) + "\n")

    async def start(self) -> None:
        """Start on a free port (the same one again after a stop) and wait until it
        answers."""
        self._write()
        for _ in range(3):
            self.port = self.port or free_port()
            if await self._spawn():
                return
            self.port = 0  # taken meanwhile: another one
        raise AssertionError(f"dnsmasq would not start:\n{self.log}")

    async def _spawn(self) -> bool:
        # As root it would switch to nobody, who can't read the test's files on SIGHUP.
        user = ["--user=root"] if os.geteuid() == 0 else []
        log = self.log_file.open("ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                dnsmasq_binary(),
                *user,
                "--no-daemon",
                f"--port={self.port}",
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                f"--addn-hosts={self.hosts_file}",
                f"--local-ttl={self.local_ttl}",
                f"--conf-file={self.conf_file}",
                "--pid-file=",  # none: not /run/dnsmasq.pid
                "--log-queries",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        finally:
            log.close()
        resolver = Resolver(Discovery(nameservers=(self.nameserver,), timeout=0.5))
        deadline = asyncio.get_running_loop().time() + WAIT
        while self._process.returncode is None:
            try:
                await resolver.resolve(parse_dns_name(f"dns://{READY_NAME}:1"))
                return True
            except DiscoveryError:
                assert asyncio.get_running_loop().time() < deadline, self.log
                await asyncio.sleep(0.02)  # wait-ok: polling with a deadline
        await self._process.wait()
        return False

    async def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.returncode is None:
            process.terminate()
            async with asyncio.timeout(WAIT):
                await process.wait()

    async def restart(self) -> None:
        """Stop, then start again on the same port with ``hosts`` and ``conf`` as now."""
        await self.stop()
        await self.start()

    async def set_hosts(self, hosts: Mapping[str, Sequence[str]]) -> None:
        """Answer ``hosts`` from now on: rewritten, SIGHUP, and read back."""
        assert self._process is not None
        self.hosts = {name: list(ips) for name, ips in hosts.items()}
        marker = f"read {self.hosts_file}"
        before = self.log.count(marker)
        self._write()
        self._process.send_signal(signal.SIGHUP)
        await until_true(lambda: self.log.count(marker) > before, "dnsmasq to re-read its hosts")


class Nameservers:
    """The dnsmasqs of one test, each in a directory of its own, all stopped at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._started: list[Dnsmasq] = []

    async def start(
        self,
        hosts: Mapping[str, Sequence[str]] | None = None,
        conf: Sequence[str] = (),
        *,
        local_ttl: int = 1,
    ) -> Dnsmasq:
        where = self.directory / f"dns{len(self._started)}"
        where.mkdir()
        server = Dnsmasq(where, local_ttl=local_ttl)
        server.hosts = {name: list(ips) for name, ips in (hosts or {}).items()}
        server.conf = list(conf)
        self._started.append(server)
        await server.start()
        return server

    async def close(self) -> None:
        await asyncio.gather(*(server.stop() for server in self._started))


def nameservers(servers: UnixServers) -> Nameservers:
    """The dnsmasqs of a test, in its socket dir, stopped with its ``unix_servers``."""
    found = Nameservers(servers.directory)
    servers.stack.push_async_callback(found.close)
    return found


class Backend:
    """An upstream on a loopback TCP address: answers its address; ``/hold`` waits for
    ``release`` when ``holds``; counts what it serves and the headers it saw."""

    def __init__(self, host: str, port: int, *, holds: bool = False) -> None:
        self.host = host
        self.port = port
        self.holds = holds
        self.served = 0
        self.held = 0
        self.authorized = 0  # requests that carried an Authorization header
        self.release = asyncio.Event()

    @property
    def name(self) -> str:
        return f"{self.host}-{self.port}"

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.served += 1
        if "Authorization" in request.headers:
            self.authorized += 1
        if request.path == "/hold" and self.holds:
            self.held += 1
            await self.release.wait()
        return web.Response(text=self.name)


async def serve_tcp(
    stack: AsyncExitStack, handler: web.Server | web.Application, host: str, port: int
) -> None:
    """Serve ``handler`` at ``host:port`` until ``stack`` closes."""
    runner: web.BaseRunner
    if isinstance(handler, web.Application):
        runner = web.AppRunner(handler, shutdown_timeout=SHUTDOWN_TIMEOUT)
    else:
        runner = web.ServerRunner(handler, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, host, port).start()


async def backends(
    stack: AsyncExitStack, hosts: Sequence[str], *, holds: bool = False
) -> dict[str, Backend]:
    """A backend on each of ``hosts`` (loopback addresses), all at one free port."""
    for _ in range(5):
        port = free_port(hosts[0])
        found = {host: Backend(host, port, holds=holds) for host in hosts}
        try:
            for backend in found.values():
                server = web.Server(backend.handle, handler_cancellation=True)
                await serve_tcp(stack, server, backend.host, port)
        except OSError:
            continue  # that port is taken on another of the hosts: try another
        return found
    raise AssertionError(f"no port free on all of {hosts}")
