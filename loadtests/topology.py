"""The stacks a benchmark compares, started and stopped as real processes.

``LbstackStack`` runs ``lbstack up`` in a short temporary run dir with a TCP listener
on a free loopback port. ``NginxTopology`` builds the same shape out of nginx over the
*same* server processes: one front nginx on a loopback TCP port, two nginx proxies on
unix sockets, each proxy in front of its group's ``server-<p>-<s>.sock``;
``HaproxyTopology`` builds it out of HAProxy the same way. All wait for readiness by
polling with a deadline. ``post_fault`` talks to a simulated server's admin socket,
the request ``lbstack fault`` sends.

Everything binds 127.0.0.1 or unix sockets in the temporary directory only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Self

import aiohttp

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107
READY_MARK = "stop:"  # the last line of `lbstack up`'s banner
POLL_INTERVAL = 0.05
NginxMethod = Literal["round_robin", "least_conn"]
NGINX_METHODS: tuple[NginxMethod, ...] = ("round_robin", "least_conn")
HaproxyMethod = Literal["roundrobin", "leastconn"]
_SERVER_SOCKET = re.compile(r"^server-(\d+)-(\d+)\.sock$")


class TopologyError(Exception):
    """A stack could not be started, checked or stopped."""


def make_workdir(prefix: str = "lbb-") -> Path:
    """A fresh, short temporary directory under /tmp (unix socket paths must stay short)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def check_unix_path(path: Path) -> Path:
    """``path``, refused if it is too long to be a unix socket address."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise TopologyError(f"unix socket path longer than {UNIX_PATH_MAX} bytes: {path}")
    return path


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


async def poll_until(
    check: Callable[[], Awaitable[bool]],
    *,
    timeout: float,
    what: str,
    alive: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` s or once ``alive`` says why."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await check():
            return
        problem = alive()
        if problem is not None:
            raise TopologyError(f"{what}: {problem}")
        if loop.time() >= deadline:
            raise TopologyError(f"{what}: not ready after {timeout:g} s")
        await asyncio.sleep(POLL_INTERVAL)


async def http_ok(url: str, *, unix: Path | None = None, timeout: float = 2.0) -> bool:
    """Whether GET ``url`` (over the unix socket ``unix`` if given) answers 2xx."""
    connector = aiohttp.UnixConnector(path=str(unix)) if unix else aiohttp.TCPConnector()
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as client,
            client.get(url, ssl=False) as response,  # benches use self-signed certificates
        ):
            await response.read()
            return 200 <= response.status < 300
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


async def post_fault(admin_socket: Path, body: dict[str, Any], timeout: float = 5.0) -> Any:
    """POST ``body`` to a simulated server's ``/fault`` (what ``lbstack fault`` sends).

    Returns the server's JSON answer (its fault state). Used where the CLI's start-up
    time (about a second of Python imports) would blur the timing, as in a stall timer.
    """
    connector = aiohttp.UnixConnector(path=str(admin_socket))
    try:
        async with (
            aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as client,
            client.post("http://localhost/fault", json=body) as response,
        ):
            answer = await response.json(content_type=None)
            if response.status >= 400:
                raise TopologyError(f"{admin_socket} refused fault {body}: {answer}")
            return answer
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise TopologyError(f"fault {body} on {admin_socket} failed: {exc!r}") from exc


async def stop_process(
    process: asyncio.subprocess.Process, sig: signal.Signals, timeout: float
) -> int:
    """Send ``sig`` to ``process`` (ours, by pid), then SIGKILL it after ``timeout`` s."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode


class LbstackStack:
    """One ``lbstack up`` with a TCP listener on a free loopback port, for a benchmark.

    ``config_text`` is the TOML config; run dir, listener and metrics endpoint (off)
    are given as flags. Use as ``async with LbstackStack(dir, text) as stack:``.
    """

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        *,
        lbstack: Path | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 30.0,
        https: bool = False,
    ) -> None:
        self.workdir = workdir
        self.config_text = config_text
        # https: the listener terminates TLS (the config must give [tls] cert and key).
        self.scheme = "https" if https else "http"
        self.lbstack = lbstack if lbstack is not None else Path(sys.executable).with_name("lbstack")
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.run_dir = workdir / "run"
        self.config_file = workdir / "lbstack.toml"
        self.log_file = workdir / "lbstack.log"
        self.port = 0
        self.banner = ""
        self._process: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The balancer's TCP listener."""
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    async def start(self) -> None:
        """Start the stack and return once its banner says it is ready."""
        if not self.lbstack.exists():
            raise TopologyError(f"lbstack executable not found: {self.lbstack}")
        check_unix_path(self.run_dir / "server-000-000.admin.sock")
        self.config_file.write_text(self.config_text)
        self.port = free_port()
        with self.log_file.open("ab") as log:
            self._process = await asyncio.create_subprocess_exec(
                str(self.lbstack),
                "up",
                "--run-dir",
                str(self.run_dir),
                "--listen",
                f"{'https' if self.scheme == 'https' else 'tcp'}://127.0.0.1:{self.port}",
                "--metrics-listen",
                "off",
                "--config",
                str(self.config_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        try:
            try:
                await asyncio.wait_for(self._read_banner(), self.ready_timeout)
            except TimeoutError:
                raise TopologyError(
                    f"lbstack up: no banner after {self.ready_timeout:g} s; "
                    f"log {self.log_file}:\n{tail(self.log_file)}"
                ) from None
            self._drain = asyncio.create_task(self._drain_stdout())
            # The banner says every tier is ready; one answer through all of them says
            # the data plane works (a stack that answers only errors is no use to bench).
            try:
                await poll_until(
                    lambda: http_ok(self.url), timeout=10.0, what=f"lbstack at {self.url}"
                )
            except TopologyError as exc:
                raise TopologyError(f"{exc}; log {self.log_file}:\n{tail(self.log_file)}") from None
        except BaseException:
            await self.stop()
            raise

    async def _read_banner(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        lines: list[str] = []
        while True:
            raw = await self._process.stdout.readline()
            if not raw:
                status = await self._process.wait()
                raise TopologyError(
                    f"lbstack up exited with status {status} before it was ready; "
                    f"log {self.log_file}:\n{tail(self.log_file)}"
                )
            lines.append(raw.decode(errors="replace").rstrip())
            if READY_MARK in lines[-1]:
                self.banner = "\n".join(lines)
                return

    async def _drain_stdout(self) -> None:
        """Keep reading stdout after the banner so the supervisor never blocks on it."""
        assert self._process is not None and self._process.stdout is not None
        with self.log_file.open("ab") as log:
            while raw := await self._process.stdout.readline():
                log.write(raw)

    @property
    def pid(self) -> int | None:
        """The supervisor's pid, once started."""
        return self._process.pid if self._process is not None else None

    async def status(self, timeout: float = 30.0) -> dict[str, Any]:
        """``lbstack status --json`` for this stack: every component with role and pid."""
        process = await asyncio.create_subprocess_exec(
            str(self.lbstack),
            "status",
            "--json",
            "--run-dir",
            str(self.run_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            await stop_process(process, signal.SIGKILL, 1.0)
            raise TopologyError("lbstack status --json: timed out") from None
        if process.returncode != 0:
            raise TopologyError(f"lbstack status --json: {err.decode(errors='replace').strip()}")
        try:
            answer = json.loads(out)
        except ValueError as exc:
            raise TopologyError(f"lbstack status --json printed no JSON: {exc}") from exc
        if not isinstance(answer, dict) or not isinstance(answer.get("components"), list):
            raise TopologyError(f"lbstack status --json: unexpected shape {answer!r:.200}")
        return answer

    def server_groups(self) -> list[list[Path]]:
        """Each proxy's server data sockets, in order: ``[[server-0-0.sock, ...], ...]``."""
        found: dict[int, dict[int, Path]] = {}
        for path in self.run_dir.iterdir():
            match = _SERVER_SOCKET.match(path.name)
            if match:
                found.setdefault(int(match[1]), {})[int(match[2])] = path
        if not found:
            raise TopologyError(f"no server sockets in {self.run_dir}")
        return [[group[s] for s in sorted(group)] for _, group in sorted(found.items())]

    def admin_socket(self, server: str) -> Path:
        """A component's admin socket, e.g. ``server-0-2`` → ``<run dir>/server-0-2.admin.sock``."""
        return self.run_dir / f"{server}.admin.sock"

    async def fault(self, server: str, *changes: str, timeout: float = 30.0) -> str:
        """Run ``lbstack fault SERVER CHANGES... --run-dir DIR``; returns its output."""
        process = await asyncio.create_subprocess_exec(
            str(self.lbstack),
            "fault",
            server,
            *changes,
            "--run-dir",
            str(self.run_dir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), timeout)
        except TimeoutError:
            await stop_process(process, signal.SIGKILL, 1.0)
            raise TopologyError(f"lbstack fault {server} {' '.join(changes)}: timed out") from None
        text = out.decode(errors="replace").strip()
        if process.returncode != 0:
            raise TopologyError(f"lbstack fault {server} {' '.join(changes)}: {text}")
        return text

    async def stop(self) -> int | None:
        """SIGTERM the supervisor (it stops every child in order); its exit status."""
        if self._process is None:
            return None
        status = await stop_process(self._process, signal.SIGTERM, self.stop_timeout)
        if self._drain is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 5.0)
        return status

    def log_problems(self) -> list[str]:
        """Warning, error and traceback lines of the stack's log, fault injection aside."""
        try:
            lines = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [
            line
            for line in lines
            if any(mark in line for mark in (" WARNING ", " ERROR ", " CRITICAL ", "Traceback"))
            and "fault injected" not in line
        ]

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def _nginx_conf(
    *,
    prefix: Path,
    listen: str,
    upstreams: Sequence[str],
    method: NginxMethod,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """One nginx instance: ``listen`` → the ``upstreams``, keep-alive both ways; with
    ``tls`` (certificate, key) it terminates TLS 1.2/1.3 on ``listen``."""
    ssl = ""
    if tls is not None:
        listen += " ssl"
        ssl = (
            f"ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};\n"
            "        ssl_protocols TLSv1.2 TLSv1.3;"
        )
    # nginx started as root would switch its worker to `nobody`, which may not reach
    # the 0660 server sockets: keep the worker as the user running the benchmark.
    user = ""
    if os.geteuid() == 0:
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};"
    servers = "\n".join(f"        server {u};" for u in upstreams)
    balance = "least_conn;" if method == "least_conn" else "# round robin (nginx's default)"
    return f"""\
# Generated by loadtests.topology. One worker per instance, as lbstack runs one
# process per tier, so both stacks get the same number of processes per hop.
worker_processes 1;
{user}
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;

events {{
    worker_connections 1024;
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

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


class _Instance:
    """One nginx or HAProxy process of a tier, with its own prefix directory.

    Its config is written to the prefix; whatever it prints goes to ``error_log``.
    """

    name: ClassVar[str]  # the program, in messages and file names
    conf_name: ClassVar[str]

    def __init__(self, executable: str, prefix: Path, conf: str) -> None:
        self.executable = executable
        self.prefix = prefix
        self.conf = conf
        self.process: asyncio.subprocess.Process | None = None

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    @property
    def pid_file(self) -> Path:
        """Where this instance writes its (master's) pid."""
        return self.prefix / f"{self.name}.pid"

    def command(self, conf_file: Path) -> list[str]:
        """The command line that runs this instance in the foreground."""
        raise NotImplementedError

    async def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf_file = self.prefix / self.conf_name
        conf_file.write_text(self.conf)
        with self.error_log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self.command(conf_file),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=log,
            )

    def exited(self) -> str | None:
        """Why this instance is not running, or None while it runs."""
        if self.process is None or self.process.returncode is None:
            return None
        return (
            f"{self.name} exited with status {self.process.returncode}; {self.error_log}:\n"
            f"{tail(self.error_log)}"
        )

    async def stop(self, timeout: float) -> None:
        if self.process is not None:
            # SIGTERM is nginx's fast shutdown and HAProxy's hard stop: the load is
            # over, nothing is in flight.
            await stop_process(self.process, signal.SIGTERM, timeout)


class _NginxInstance(_Instance):
    """One nginx master (plus its single worker)."""

    name = "nginx"
    conf_name = "nginx.conf"

    def command(self, conf_file: Path) -> list[str]:
        return [
            self.executable,
            "-p",
            str(self.prefix),
            "-c",
            str(conf_file),
            "-e",
            str(self.error_log),
            "-g",
            "daemon off;",
        ]


class _HaproxyInstance(_Instance):
    """One HAProxy process (one thread), in the foreground."""

    name = "haproxy"
    conf_name = "haproxy.cfg"

    def command(self, conf_file: Path) -> list[str]:
        return [self.executable, "-db", "-f", str(conf_file)]

    async def start(self) -> None:
        await super().start()
        # In the foreground (-db) HAProxy writes no pid file: the process is its own pid.
        assert self.process is not None
        self.pid_file.write_text(f"{self.process.pid}\n")


class _TieredTopology:
    """Another proxy in lbstack's shape, in front of an lbstack stack's own server sockets.

    ``groups`` are each proxy's server sockets (``LbstackStack.server_groups()``). A
    front instance on 127.0.0.1:<free port> → one proxy instance per group on
    ``<workdir>/proxy-<p>/proxy.sock`` → the group's servers. Subclasses say which
    program runs and how it is configured (``_instance``).
    """

    def __init__(
        self, workdir: Path, groups: Sequence[Sequence[Path]], *, ready_timeout: float
    ) -> None:
        self.workdir = workdir
        self.groups = groups
        self.ready_timeout = ready_timeout
        self.port = 0
        self._proxies: list[tuple[Path, _Instance]] = []
        self._front: _Instance | None = None

    def _instance(self, prefix: Path, listen: Path | int, upstreams: Sequence[Path]) -> _Instance:
        """One instance listening on a unix socket (a Path) or a loopback TCP port."""
        raise NotImplementedError

    @property
    def url(self) -> str:
        """The front instance's TCP listener."""
        scheme = "https" if getattr(self, "tls", None) else "http"
        return f"{scheme}://127.0.0.1:{self.port}/"

    @property
    def instances(self) -> list[_Instance]:
        front = [self._front] if self._front is not None else []
        return [*front, *(instance for _, instance in self._proxies)]

    def pid_files(self) -> dict[str, Path]:
        """Each instance's pid file by name: ``front``, ``proxy-0``, ``proxy-1`` ..."""
        named = {"front": self._front} if self._front is not None else {}
        named.update({f"proxy-{i}": instance for i, (_, instance) in enumerate(self._proxies)})
        return {name: instance.pid_file for name, instance in named.items()}

    def _why_down(self) -> str | None:
        for instance in self.instances:
            problem = instance.exited()
            if problem is not None:
                return problem
        return None

    async def start(self) -> None:
        """Start the proxies, then the front; return once each answers through to a server."""
        for index, servers in enumerate(self.groups):
            prefix = self.workdir / f"proxy-{index}"
            listen = check_unix_path(prefix / "proxy.sock")
            instance = self._instance(prefix, listen, [check_unix_path(s) for s in servers])
            self._proxies.append((listen, instance))
        self.port = free_port()
        self._front = self._instance(
            self.workdir / "front", self.port, [listen for listen, _ in self._proxies]
        )
        try:
            for listen, instance in self._proxies:
                await instance.start()
                await poll_until(
                    functools.partial(http_ok, "http://localhost/", unix=listen),
                    timeout=self.ready_timeout,
                    what=f"{instance.name} proxy {listen}",
                    alive=self._why_down,
                )
            await self._front.start()
            await poll_until(
                lambda: http_ok(self.url),
                timeout=self.ready_timeout,
                what=f"{self._front.name} front {self.url}",
                alive=self._why_down,
            )
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop the front first, then the proxies."""
        for instance in self.instances:
            await instance.stop(timeout=10.0)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


class NginxTopology(_TieredTopology):
    """nginx in lbstack's shape, in front of an lbstack stack's own server sockets.

    Front nginx on 127.0.0.1:<free port> → ``nginx-<method>/proxy-<p>/proxy.sock`` →
    the group's servers; every hop HTTP/1.1 with an upstream keep-alive pool of 64.
    ``method`` is the balancing method of every tier: nginx's round robin or
    ``least_conn``.
    """

    def __init__(
        self,
        workdir: Path,
        groups: Sequence[Sequence[Path]],
        *,
        method: NginxMethod = "round_robin",
        nginx: str = "nginx",
        ready_timeout: float = 15.0,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        super().__init__(workdir / f"nginx-{method}", groups, ready_timeout=ready_timeout)
        self.method = method
        self.nginx = nginx
        self.tls = tls  # (certificate, key): the front terminates TLS

    def _instance(self, prefix: Path, listen: Path | int, upstreams: Sequence[Path]) -> _Instance:
        front = not isinstance(listen, Path)
        conf = _nginx_conf(
            prefix=prefix,
            listen=f"unix:{listen}" if isinstance(listen, Path) else f"127.0.0.1:{listen}",
            upstreams=[f"unix:{u}" for u in upstreams],
            method=self.method,
            tls=self.tls if front else None,
        )
        return _NginxInstance(self.nginx, prefix, conf)


def _haproxy_conf(*, listen: str, upstreams: Sequence[str], method: HaproxyMethod) -> str:
    """One HAProxy instance: ``listen`` → the ``upstreams``, keep-alive both ways."""
    servers = "\n".join(f"    server s{i} {u}" for i, u in enumerate(upstreams))
    return f"""\
# Generated by loadtests.topology. One thread per instance, as lbstack runs one
# process per tier (and nginx one worker). No health checks, no logs.
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


class HaproxyTopology(_TieredTopology):
    """HAProxy in lbstack's shape, in front of an lbstack stack's own server sockets.

    Front HAProxy on 127.0.0.1:<free port> → ``haproxy-<method>/proxy-<p>/proxy.sock``
    → the group's servers; one thread per instance, HTTP keep-alive on every hop with
    ``http-reuse always`` to the backends. ``method`` is every tier's ``balance``.
    """

    def __init__(
        self,
        workdir: Path,
        groups: Sequence[Sequence[Path]],
        *,
        method: HaproxyMethod = "leastconn",
        haproxy: str = "haproxy",
        ready_timeout: float = 15.0,
    ) -> None:
        super().__init__(workdir / f"haproxy-{method}", groups, ready_timeout=ready_timeout)
        self.method = method
        self.haproxy = haproxy

    def _instance(self, prefix: Path, listen: Path | int, upstreams: Sequence[Path]) -> _Instance:
        conf = _haproxy_conf(
            listen=f"unix@{listen}" if isinstance(listen, Path) else f"127.0.0.1:{listen}",
            upstreams=[f"unix@{u}" for u in upstreams],
            method=self.method,
        )
        return _HaproxyInstance(self.haproxy, prefix, conf)


def find_nginx() -> str | None:
    """The nginx executable (also looked for in /usr/sbin, often off a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin:/sbin")


def nginx_version(nginx: str) -> str:
    """``nginx/1.22.1``: what ``nginx -v`` says."""
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (done.stderr or done.stdout).strip().removeprefix("nginx version: ")


def remove_workdir(path: Path) -> None:
    """Remove a benchmark's temporary directory and everything in it."""
    shutil.rmtree(path, ignore_errors=True)


def find_haproxy() -> str | None:
    """The haproxy executable (also looked for in /usr/sbin, often off a user's PATH)."""
    return shutil.which("haproxy") or shutil.which(
        "haproxy", path="/usr/sbin:/usr/local/sbin:/sbin"
    )


def haproxy_version(haproxy: str) -> str:
    """``HAProxy 2.6.12-1+deb12u4``: the first line of ``haproxy -v``, shortened."""
    done = subprocess.run([haproxy, "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()[:1]
    return first[0].split(" - ")[0].replace(" version ", " ") if first else "haproxy"
