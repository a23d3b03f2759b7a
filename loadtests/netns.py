"""Several "hosts" on one machine, for tests of a stack over a network: each host is a
network namespace with one veth on a bridge that lives in a namespace of its own.

Addresses come from 198.18.0.0/15, the range reserved for benchmark networks; nothing
routes them anywhere: the namespaces have no default route and the machine's own
namespace is never touched. ``hosts()`` removes every namespace it made, whatever the
test did, and a namespace's removal takes its veths with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "198.18.0"  # /24, inside 198.18.0.0/15 (RFC 2544)
PREFIX = 24


def unprivileged() -> str | None:
    """Why namespaces can't be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Host:
    """One namespace with an address on the shared bridge."""

    name: str
    number: int
    switch: str
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{SUBNET}.{self.number}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside this host (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def link(self, *, up: bool) -> None:
        """Take the host's link to the bridge down (a cable pulled) or up again."""
        _ip("-n", self.name, "link", "set", "eth0", "up" if up else "down")

    async def start(self, argv: Sequence[str], **kwargs: object) -> asyncio.subprocess.Process:
        """A process inside this host, stopped (SIGTERM, then SIGKILL) when the hosts go."""
        process = await asyncio.create_subprocess_exec(*self.command(argv), **kwargs)  # type: ignore[arg-type]
        self.processes.append(process)
        return process


class Network:
    """A bridge and the hosts on it; ``tag`` keeps two test runs' namespaces apart."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.switch = f"lbsw{tag}"
        self.hosts: dict[int, Host] = {}

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add(self, number: int) -> Host:
        """Host ``number``, at 198.18.0.<number>."""
        name = f"lbh{number}{self.tag}"
        _ip("netns", "add", name)
        host = self.hosts[number] = Host(name, number, self.switch)
        port = f"v{number}{self.tag}"[:15]
        _ip(
            "-n",
            self.switch,
            "link",
            "add",
            port,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            name,
        )
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", name, "addr", "add", f"{host.address}/{PREFIX}", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return host

    async def remove(self) -> None:
        for host in self.hosts.values():
            for process in host.processes:
                await _stop(process)
        for name in [*(h.name for h in self.hosts.values()), self.switch]:
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", name)


async def _stop(process: asyncio.subprocess.Process, timeout: float = 30.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def hosts(*numbers: int) -> AsyncIterator[Network]:
    """A bridge with hosts ``numbers`` on it, all gone at the end."""
    network = Network(f"{os.getpid() % 100000}")
    try:
        network.create()
        for number in numbers:
            network.add(number)
        yield network
    finally:
        await network.remove()


class Dnsmasq:
    """dnsmasq on ``host``, answering from ``records`` (a hosts file it re-reads on
    SIGHUP) and ``srv`` (name, target, port; read at start); every TTL 1 s."""

    def __init__(self, host: Host, work: Path, zone: str = "lbstack.test") -> None:
        self.host = host
        self.zone = zone
        self.hosts_file = work / "zone.hosts"
        self.process: asyncio.subprocess.Process | None = None
        self.records: dict[str, list[str]] = {}
        self.srv: list[tuple[str, str, int]] = []

    def write(self) -> None:
        lines = [
            f"{address} {name}" for name, addresses in self.records.items() for address in addresses
        ]
        self.hosts_file.write_text("\n".join(lines) + "\n")

    async def start(self) -> None:
        self.write()
        self.process = await self.host.start(
            [
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                f"--local=/{self.zone}/",  # answered here only: NODATA, never REFUSED
                f"--addn-hosts={self.hosts_file}",
                f"--listen-address={self.host.address}",
                "--bind-interfaces",
                "--port=53",
                "--local-ttl=1",
                "--log-facility=-",
                "--pid-file=",
                "--user=root",
                *(f"--srv-host={name},{target},{port}" for name, target, port in self.srv),
            ],
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        await self._read_zone()

    async def _read_zone(self) -> None:
        """Until dnsmasq says it read the hosts file (it does at start and on SIGHUP)."""
        assert self.process is not None and self.process.stderr is not None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(self.process.stderr.readline(), 10)
            if not line:
                raise AssertionError("dnsmasq exited")
            if f"read {self.hosts_file}".encode() in line:
                return
        raise AssertionError("dnsmasq did not read its zone")

    async def set(self, name: str, addresses: list[str]) -> None:
        self.records[name] = addresses
        self.write()
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)
        await self._read_zone()

    async def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        await self.process.wait()


def namespaces() -> set[str]:
    """Every namespace on the machine (to check a test left none behind)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
