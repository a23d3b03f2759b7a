"""The systems a benchmark loads, started and stopped as real processes.

``lbstack_up`` starts ``lbstack up`` through ``lbstack.testing.running_stack`` (as the
tests do) with a TCP listener on a free loopback port. ``other_up`` builds the same
shape out of nginx or HAProxy over the *same* server processes: a front on a loopback
TCP port, one proxy per group on a unix socket, each in front of its group's
``server-<p>-<s>.sock``; one worker or thread each, as lbstack runs one process per
tier. Each gives a ``System``: its URL and its processes by tier (psutil), for CPU and
memory figures. Readiness is polled with a deadline; everything binds 127.0.0.1 or unix
sockets in the benchmark's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import psutil

from lbstack.testing import RunningStack, running_stack, short_tmpdir
from loadtests.report import BenchError, Report, say
from loadtests.scenarios import Tables, Topology

POLL_INTERVAL = 0.05
TIER_OF_ROLE = {"balancer": "front", "proxy": "proxies", "server": "servers"}
_SERVER_SOCKET = re.compile(r"^server-(\d+)-(\d+)\.sock$")


class TopologyError(BenchError):
    """A system could not be started or checked."""


Processes = dict[str, psutil.Process]  # by a readable name: "proxy-0", "front worker" ...


@dataclass
class System:
    """One system under load: the URL to load and its processes by tier."""

    name: str
    url: str
    tiers: dict[str, Processes]

    def cpu(self) -> dict[str, float | None]:
        """CPU seconds (user + system) each tier has used so far; None once one is gone."""
        used: dict[str, float | None] = {}
        for tier, processes in self.tiers.items():
            try:
                used[tier] = sum(sum(p.cpu_times()[:2]) for p in processes.values())
            except psutil.Error:
                used[tier] = None
        return used

    def peak_rss_mib(self) -> dict[str, float]:
        """Each process's peak resident memory, MiB (every tier's but shared servers')."""
        return {
            name: peak_rss_kib(process.pid) / 1024
            for tier, processes in self.tiers.items()
            if tier != "servers" or not self.name.startswith(("nginx", "haproxy"))
            for name, process in processes.items()
        }


def cpu_per_request(
    before: dict[str, float | None], after: dict[str, float | None], requests: int
) -> dict[str, float | None]:
    """CPU µs per request of each tier between two readings, and their total."""
    per: dict[str, float | None] = {}
    for tier, start in before.items():
        end = after.get(tier)
        used = None if start is None or end is None else end - start
        per[f"cpu_us_{tier}"] = None if used is None else used / max(requests, 1) * 1e6
    known = [v for v in per.values() if v is not None]
    per["cpu_us_total"] = sum(known) if len(known) == len(per) else None
    return per


def peak_rss_kib(pid: int) -> int:
    """The most resident memory the process ever had (``VmHWM``; psutil has no peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise TopologyError(f"process {pid} has no VmHWM (a zombie?)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def find_program(name: str) -> str | None:
    """An executable, also looked for in /usr/sbin (often off a user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


def missing(*programs: str) -> str | None:
    """An error message naming the programs that are not installed, or None."""
    lacking = [p for p in programs if find_program(p) is None]
    if not lacking:
        return None
    names = " and ".join(lacking)
    return f"error: {names} required but not found (Debian: apt-get install {' '.join(lacking)})"


def version(program: str) -> str:
    """What ``PROGRAM -v`` says first: ``nginx/1.22.1``, ``HAProxy 2.6.12``, ``wrk 4.1.0``."""
    path = find_program(program)
    if path is None:
        return f"no {program}"
    done = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = ((done.stdout or done.stderr).strip().splitlines() or [program])[0]
    return re.split(r" Copyright| - ", first.removeprefix("nginx version: "))[0]


async def run_program(*argv: str, timeout: float, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run a program to its end, killed if it outlives ``timeout`` s (or we are cancelled);
    its exit status, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        raise BenchError(f"{' '.join(argv[:4])} ... still running after {timeout:g} s") from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def poll_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    down: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll ``check`` until true; fail after ``timeout`` s or once ``down`` says why."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        problem = down()
        if problem is not None:
            raise TopologyError(f"{what}: {problem}")
        if asyncio.get_running_loop().time() >= deadline:
            raise TopologyError(f"{what}: not ready after {timeout:g} s")
        await asyncio.sleep(POLL_INTERVAL)  # polling with a deadline


async def http_ok(url: str, unix: Path | None = None) -> bool:
    """Whether GET ``url`` (over the unix socket ``unix``) answers 2xx; TLS unverified."""
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else aiohttp.TCPConnector(ssl=False)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(2)) as client,
            client.get(url) as response,
        ):
            await response.read()
            return 200 <= response.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


@dataclass
class Lbstack:
    """A running lbstack with a loopback TCP listener, as a benchmark sees it."""

    stack: RunningStack
    url: str

    async def system(self, name: str = "lbstack") -> System:
        """The stack as a ``System``: balancer(s), proxies, servers and supervisor."""
        tiers: dict[str, Processes] = {}
        for component in (await self.stack.status()).components:
            if component.pid is not None:
                tier = TIER_OF_ROLE.get(component.role, "supervisor")
                tiers.setdefault(tier, {})[component.name] = psutil.Process(component.pid)
        return System(name, self.url, tiers)

    def server_groups(self) -> list[list[Path]]:
        """Each proxy's server sockets, in order: ``[[server-0-0.sock, ...], ...]``."""
        found: dict[int, dict[int, Path]] = {}
        for path in self.stack.run_dir.iterdir():
            if match := _SERVER_SOCKET.match(path.name):
                found.setdefault(int(match[1]), {})[int(match[2])] = path
        return [[group[s] for s in sorted(group)] for _, group in sorted(found.items())]


@contextlib.asynccontextmanager
async def lbstack_up(
    topology: Topology,
    workdir: Path,
    report: Report,
    *,
    label: str = "lbstack",
    tls: tuple[Path, Path] | None = None,
    start_timeout: float = 60.0,
) -> AsyncIterator[Lbstack]:
    """``lbstack up`` in ``topology``'s shape in ``workdir/label``; with ``tls`` (certificate,
    key) its listener terminates TLS. Its log's warnings go to ``report.log_problems``."""
    port = free_port()
    more: Tables = {"tls": {"cert": str(tls[0]), "key": str(tls[1])}} if tls else {}
    scheme = "https" if tls else "http"
    base = workdir / label.replace(" ", "-")
    base.mkdir()
    async with running_stack(
        "--listen",
        f"{'https' if tls else 'tcp'}://127.0.0.1:{port}",
        config=topology.toml(more),
        workdir=base,
        metrics_listen="off",
        start_timeout=start_timeout,
    ) as stack:
        url = f"{scheme}://127.0.0.1:{port}/"
        try:
            # The banner says every tier is ready; one answer through all of them says
            # the data plane works (a stack that answers only errors is no use to bench).
            await poll_until(partial(http_ok, url), timeout=10.0, what=f"lbstack at {url}")
            yield Lbstack(stack, url)
        finally:
            await stack.stop()
            if problems := stack.log_problems():
                report.log_problems[label] = problems


def nginx_conf(
    prefix: Path, listen: str, upstreams: Sequence[str], method: str, tls: tuple[Path, Path] | None
) -> str:
    """One nginx instance: ``listen`` -> ``upstreams``, HTTP/1.1 keep-alive both ways."""
    ssl = ""
    if tls is not None:
        listen += " ssl"
        ssl = f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]}; "
        ssl += "ssl_protocols TLSv1.2 TLSv1.3;"
    # nginx started as root would switch its worker to `nobody`, which may not reach
    # the 0660 server sockets: keep the worker as the user running the benchmark.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    servers = "\n".join(f"        server {u};" for u in upstreams)
    balance = "least_conn;" if method == "least_conn" else "# round robin (nginx's default)"
    temp = "\n".join(
        f"    {kind}_temp_path {prefix}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temp}
    upstream backends {{
        {balance}
{servers}
        keepalive 64;
    }}
    server {{
        listen {listen};
        {ssl}
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""


def haproxy_conf(listen: str, upstreams: Sequence[str], method: str) -> str:
    """One HAProxy instance (one thread, no checks, no logs), keep-alive both ways."""
    servers = "\n".join(f"    server s{i} {u}" for i, u in enumerate(upstreams))
    return f"""\
global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 75s
    timeout server 75s
    timeout http-keep-alive 75s
    timeout http-request 10s
frontend in
    bind {listen}
    option forwardfor
    default_backend servers
backend servers
    balance {method}
    http-reuse always
{servers}
"""


def _command(
    program: str,
    method: str,
    prefix: Path,
    listen: Path | int,
    upstreams: Sequence[Path],
    tls: tuple[Path, Path] | None,
) -> list[str]:
    """Write one nginx or HAProxy instance's config in ``prefix``; its command line."""
    executable = find_program(program)
    if executable is None:
        raise TopologyError(f"{program} not found (Debian: apt-get install {program})")
    prefix.mkdir(parents=True)
    unix, conf = isinstance(listen, Path), prefix / f"{program}.conf"
    if program == "nginx":
        where = f"unix:{listen}" if unix else f"127.0.0.1:{listen}"
        conf.write_text(nginx_conf(prefix, where, [f"unix:{u}" for u in upstreams], method, tls))
        log = str(prefix / "error.log")
        return [executable, "-p", str(prefix), "-c", str(conf), "-e", log, "-g", "daemon off;"]
    where = f"unix@{listen}" if unix else f"127.0.0.1:{listen}"
    conf.write_text(haproxy_conf(where, [f"unix@{u}" for u in upstreams], method))
    return [executable, "-db", "-f", str(conf)]


async def _instance(
    stop: contextlib.AsyncExitStack,
    program: str,
    method: str,
    prefix: Path,
    listen: Path | int,
    upstreams: Sequence[Path],
    tls: tuple[Path, Path] | None = None,
) -> Processes:
    """Start one nginx or HAProxy instance, stopped by ``stop``; once it answers, its
    processes (an nginx master and its worker)."""
    command = _command(program, method, prefix, listen, upstreams, tls)
    unix = listen if isinstance(listen, Path) else None
    url = "http://localhost/" if unix else f"{'https' if tls else 'http'}://127.0.0.1:{listen}/"
    master = await start_process(stop, command, prefix / "error.log", url, unix)
    return {prefix.name: master} | {
        f"{prefix.name} worker {n}": child for n, child in enumerate(master.children())
    }


async def start_process(
    stop: contextlib.AsyncExitStack,
    argv: Sequence[str],
    log: Path,
    url: str,
    unix: Path | None = None,
    timeout: float = 15.0,
) -> psutil.Process:
    """Start a server process, its output to ``log``; once ``url`` answers, the process.

    ``stop`` stops it: SIGTERM (nginx's fast shutdown, HAProxy's hard stop: the load is
    over), SIGKILL after 10 s.
    """
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )

    async def terminate() -> None:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10.0)
            except TimeoutError:
                process.kill()
                await process.wait()

    stop.push_async_callback(terminate)

    def down() -> str | None:
        if process.returncode is None:
            return None
        return f"{argv[0]} exited ({process.returncode}); {log}:\n{log.read_text()[-2000:]}"

    await poll_until(partial(http_ok, url, unix), timeout=timeout, what=url, down=down)
    return psutil.Process(process.pid)


@contextlib.asynccontextmanager
async def other_up(
    name: str,
    groups: Sequence[Sequence[Path]],
    workdir: Path,
    *,
    tls: tuple[Path, Path] | None = None,
) -> AsyncIterator[System]:
    """``name`` ("nginx least_conn", "haproxy leastconn" ...) in lbstack's shape over the
    server sockets ``groups``: the proxies, then the front (which stops first)."""
    program, _, method = name.partition(" ")
    base = workdir / name.replace(" ", "-")
    async with contextlib.AsyncExitStack() as stop:
        proxies: Processes = {}
        sockets = [base / f"proxy-{i}" / "proxy.sock" for i in range(len(groups))]
        for listen, servers in zip(sockets, groups, strict=True):
            proxies |= await _instance(stop, program, method, listen.parent, listen, servers)
        port = free_port()
        front = await _instance(stop, program, method, base / "front", port, sockets, tls)
        scheme = "https" if tls else "http"
        yield System(name, f"{scheme}://127.0.0.1:{port}/", {"front": front, "proxies": proxies})


@contextlib.contextmanager
def kept(prefix: str, keep: bool) -> Iterator[Path]:
    """A short temp dir for one step, removed afterwards unless ``keep`` or the step
    failed (its configs and logs are then worth reading); Ctrl-C leaves nothing."""
    path = short_tmpdir(prefix)
    try:
        yield path
    except Exception:
        keep = True
        raise
    finally:
        if keep:
            say(f"  kept {path} (configs and logs)")
        else:
            shutil.rmtree(path, ignore_errors=True)
