"""Locust load tests of a running lbstack, with pass/fail thresholds.

Run from the repository root, headless and bounded, e.g.::

    .venv/bin/locust -f loadtests/locustfile.py --headless -u 20 -r 10 --run-time 30s \\
        --scenario steady --lbstack-run-dir /tmp/lbstack-0

The users talk to the balancer over its unix socket (``HttpUser`` with
requests-unixsocket's adapter mounted on its session: ``FastHttpUser`` cannot use unix
sockets) or, given ``--host http://127.0.0.1:8080``, over a TCP listener. Every
request is an echo whose answer is checked: a wrong answer is a failure, not only a
non-2xx status. ``--scenario`` picks the load over time (a ``LoadTestShape``) and what
is done to the stack meanwhile through its control and admin sockets:

* ``steady``: ``-u`` users for the whole run.
* ``spike``: a fifth of ``-u`` users, a sudden jump to ``-u`` for the middle third,
  then back.
* ``degraded``: steady load; from a third of the run until its end ``--fault-server``
  answers ``--fault-latency`` late (cleared when the test stops).
* ``failover``: steady load; ``--fault-server`` is SIGKILLed at a third of the run,
  ``--fault-proxy`` at two thirds, and each must come back (the supervisor restarts it).

Every run is bounded: by ``--run-time``, else by ``DEFAULT_RUN_TIME``. When the run ends,
the exit status is 1 if the error ratio exceeds ``--max-error-ratio`` (by default 0 for
steady, 0.01 otherwise), the 95th percentile exceeds ``--max-p95-ms``, no request was
made, or a disruption could not be carried out; else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import logging
import os
import random
import signal
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import gevent
import gevent.lock
from locust import HttpUser, LoadTestShape, events, task
from locust.argument_parser import LocustArgumentParser
from locust.clients import ResponseContextManager
from locust.env import Environment
from locust.runners import WorkerRunner
from requests_unixsocket import UnixAdapter

from lbstack.api import ComponentStatus
from lbstack.client import AdminClient, ControlClient
from lbstack.config import default_run_dir
from lbstack.errors import LbstackError
from lbstack.rundir import RunDir

log = logging.getLogger("lbstack.loadtest")
T = TypeVar("T")
UNIX_SCHEME = "http+unix://"

DEFAULT_RUN_TIME = 60  # seconds, when --run-time is not given
REQUEST_TIMEOUT = 30.0  # seconds, per request
RESTART_TIMEOUT = 30.0  # seconds a killed component has to be ready again
BODY_SIZES = (0, 64, 1024, 16 * 1024, 64 * 1024)
BODY_SOURCE = random.randbytes(2 * max(BODY_SIZES))
SERVED_BY = "X-Served-By"
REQUEST_ID = "X-Request-Id"

# (seconds since start, run duration, -u users, -r spawn rate) -> (users, spawn rate)
Load = Callable[[float, float, int, float], tuple[int, float]]


def steady_load(elapsed: float, duration: float, users: int, rate: float) -> tuple[int, float]:
    return users, rate


def spike_load(elapsed: float, duration: float, users: int, rate: float) -> tuple[int, float]:
    """A fifth of the users, all of them (started at once) for the middle third, then back."""
    low = max(1, users // 5)
    if elapsed < duration / 3:
        return low, rate
    if elapsed < 2 * duration / 3:
        return users, float(users)
    return low, float(users)


@dataclass(frozen=True)
class Scenario:
    """A load over time, the disruptions at fractions of the run, the default error bar."""

    load: Load
    max_error_ratio: float
    disruptions: tuple[tuple[float, str], ...] = ()  # (fraction of the run, action name)


SCENARIOS: dict[str, Scenario] = {
    "steady": Scenario(steady_load, 0.0),
    "spike": Scenario(spike_load, 0.01),
    "degraded": Scenario(steady_load, 0.01, ((1 / 3, "inject_latency"),)),
    "failover": Scenario(steady_load, 0.01, ((1 / 3, "kill_server"), (2 / 3, "kill_proxy"))),
}


def add_options(parser: LocustArgumentParser, **_: Any) -> None:
    group = parser.add_argument_group("lbstack")
    group.add_argument(
        "--scenario", choices=sorted(SCENARIOS), default="steady", help="default steady"
    )
    group.add_argument(
        "--lbstack-run-dir",
        default=None,
        help="the stack's run dir (default: as lbstack up); its balancer.sock is the target "
        "unless --host or --lbstack-socket is given, its control and admin sockets are used "
        "by the degraded and failover scenarios",
    )
    group.add_argument(
        "--lbstack-socket", default=None, help="the balancer's unix socket (overrides run dir)"
    )
    group.add_argument(
        "--max-error-ratio",
        type=float,
        default=None,
        help="fail the run above this share of failed requests (default 0 for steady, 0.01 else)",
    )
    group.add_argument(
        "--max-p95-ms", type=float, default=500.0, help="fail the run above this p95 (ms)"
    )
    group.add_argument(
        "--think-time-ms",
        type=float,
        default=100.0,
        help="mean pause of a user between requests, uniform on [0, 2×mean] (0: none)",
    )
    group.add_argument(
        "--fault-server", default="server-0-1", help="server slowed (degraded) or killed"
    )
    group.add_argument("--fault-proxy", default="proxy-1", help="proxy killed (failover)")
    group.add_argument(
        "--fault-latency", default="200ms", help="latency injected by degraded (default 200ms)"
    )


class DisruptionError(Exception):
    """A disruption of the stack could not be carried out."""


class StackControl:
    """The stack's control and admin APIs through lbstack's own clients (the ones
    ``lbstack.testing`` and the CLI use).

    The clients are asyncio: a greenlet runs each call to the end in an event loop of
    its own, whose waits gevent makes cooperative; one call at a time, as a thread runs
    one event loop at a time.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.control = ControlClient(run_dir)
        self._one_loop = gevent.lock.Semaphore()

    def _call(self, call: Coroutine[Any, Any, T]) -> T:
        with self._one_loop:
            try:
                return asyncio.run(call)
            except LbstackError as exc:
                raise DisruptionError(str(exc)) from exc

    def fault(self, server: str, changes: dict[str, Any]) -> None:
        """POST ``changes`` to a simulated server's ``/fault`` (what ``lbstack fault`` sends)."""
        self._call(AdminClient(RunDir(self.run_dir).admin(server)).fault(changes))

    def component(self, name: str) -> ComponentStatus:
        status = self._call(self.control.status())
        try:
            return status.component(name)
        except KeyError:
            raise DisruptionError(f"no component {name!r} in {self.run_dir}") from None


def run_dir(options: argparse.Namespace) -> Path:
    return Path(options.lbstack_run_dir) if options.lbstack_run_dir else default_run_dir()


def balancer_host(options: argparse.Namespace) -> str:
    """The base URL: ``--host`` as given, else the balancer's unix socket."""
    if options.host:
        return str(options.host)
    socket = options.lbstack_socket or run_dir(options) / "balancer.sock"
    return f"{UNIX_SCHEME}{quote(str(socket), safe='')}"


def run_duration(options: argparse.Namespace) -> float:
    return float(options.run_time or DEFAULT_RUN_TIME)


def echo_problem(
    response: ResponseContextManager,
    method: str,
    path: str,
    body: bytes,
    request_id: str | None,
) -> str | None:
    """What is wrong with the simulated server's echo of a request, or None."""
    if response.status_code != 200:
        return f"status {response.status_code}: {response.text[:200]!r}"
    served_by = response.headers.get(SERVED_BY)
    answered_id = response.headers.get(REQUEST_ID)
    if not served_by or not answered_id:
        return f"missing {SERVED_BY} ({served_by!r}) or {REQUEST_ID} ({answered_id!r})"
    if request_id is not None and answered_id != request_id:
        return f"{REQUEST_ID}: sent {request_id!r}, got {answered_id!r}"
    try:
        echo = response.json()
    except ValueError:
        return f"not JSON: {response.text[:200]!r}"
    expected = {
        "server": served_by,
        "method": method,
        "path": path,
        "body_bytes": len(body),
        "body_sha256": hashlib.sha256(body).hexdigest(),
    }
    found = {key: echo.get(key) for key in expected} if isinstance(echo, dict) else {}
    if found != expected:
        return f"echo: expected {expected}, found {found}"
    return None


class BalancerUser(HttpUser):
    """A client of the balancer: GETs and POSTs with bodies, each answer checked."""

    def on_start(self) -> None:
        if self.host and self.host.startswith(UNIX_SCHEME):
            self.client.mount(UNIX_SCHEME, UnixAdapter())
        self.think_time = self.environment.parsed_options.think_time_ms / 1000.0
        self.counter = itertools.count()

    def wait_time(self) -> float:
        return random.uniform(0.0, 2.0 * self.think_time)

    def _check(
        self, response: ResponseContextManager, path: str, body: bytes, request_id: str | None
    ) -> None:
        problem = echo_problem(response, response.request.method or "", path, body, request_id)
        if problem is None:
            response.success()
        else:
            response.failure(problem)

    @task(3)
    def get_echo(self) -> None:
        path = "/echo"
        with self.client.get(
            f"{path}?n={next(self.counter)}",
            name="GET /echo",
            timeout=REQUEST_TIMEOUT,
            catch_response=True,
        ) as response:
            self._check(response, path, b"", None)

    @task(2)
    def post_upload(self) -> None:
        path = "/upload"
        size = random.choice(BODY_SIZES)
        start = random.randrange(len(BODY_SOURCE) - size + 1)
        body = BODY_SOURCE[start : start + size]
        request_id = uuid.uuid4().hex
        with self.client.post(
            path,
            data=body,
            headers={REQUEST_ID: request_id, "Content-Type": "application/octet-stream"},
            name="POST /upload",
            timeout=REQUEST_TIMEOUT,
            catch_response=True,
        ) as response:
            self._check(response, path, body, request_id)


class ScenarioShape(LoadTestShape):
    """The chosen scenario's users over time; ends the run after its duration."""

    use_common_options = True

    def tick(self) -> tuple[int, float] | None:
        assert self.runner is not None
        options = self.runner.environment.parsed_options
        assert options is not None
        duration = run_duration(options)
        elapsed = time.perf_counter() - self.start_time  # reset when the shape starts
        if elapsed >= duration:
            return None
        users = options.num_users or 1
        rate = options.spawn_rate or float(users)
        return SCENARIOS[options.scenario].load(elapsed, duration, users, rate)


class ScenarioRun:
    """One run's disruptions of the stack and its verdict against the thresholds."""

    def __init__(self, environment: Environment, options: argparse.Namespace) -> None:
        self.environment = environment
        self.options = options
        self.scenario = SCENARIOS[options.scenario]
        self.control = StackControl(run_dir(options))
        self.problems: list[str] = []
        self.greenlets: list[gevent.Greenlet[..., None]] = []
        self.degraded = False
        self.sigterm: gevent.signal_handler[[]] | None = None
        self.actions: dict[str, Callable[[], None]] = {
            "inject_latency": self.inject_latency,
            "kill_server": lambda: self.kill(self.options.fault_server),
            "kill_proxy": lambda: self.kill(self.options.fault_proxy),
        }

    def watch_sigterm(self) -> None:
        """Stop the test on SIGTERM, so its disruptions are undone and it is judged.

        Headless Locust installs its own SIGTERM handler only once a shape has finished;
        until then SIGTERM would kill it outright and leave a fault injected.
        """
        self.sigterm = gevent.signal_handler(signal.SIGTERM, self.on_sigterm)

    def on_sigterm(self) -> None:
        log.warning("SIGTERM: stopping the test")
        if self.environment.runner is not None:
            self.environment.runner.quit()

    def on_test_start(self, **_: Any) -> None:
        duration = run_duration(self.options)
        for fraction, action in self.scenario.disruptions:
            self.greenlets.append(
                gevent.spawn_later(fraction * duration, self.disrupt, action, self.actions[action])
            )

    def disrupt(self, name: str, action: Callable[[], None]) -> None:
        try:
            action()
        except DisruptionError as exc:
            self.problems.append(f"{name}: {exc}")
            log.error("%s failed: %s", name, exc)

    def inject_latency(self) -> None:
        server, latency = self.options.fault_server, self.options.fault_latency
        self.degraded = True
        self.control.fault(server, {"latency": latency})
        log.warning("degraded: %s now answers %s late", server, latency)

    def kill(self, name: str) -> None:
        """SIGKILL the child ``name``; it must be ready again, with a new pid, in time."""
        killed = self.control.component(name)
        if killed.pid is None or killed.role == "supervisor":
            raise DisruptionError(f"{name} has no child process to kill: {killed}")
        try:
            os.kill(killed.pid, signal.SIGKILL)
        except ProcessLookupError as exc:
            raise DisruptionError(f"{name} (pid {killed.pid}) was already gone") from exc
        log.warning("failover: SIGKILLed %s (pid %d)", name, killed.pid)
        killed_at = time.monotonic()
        while (now := self.control.component(name)).state != "ready" or now.pid == killed.pid:
            if time.monotonic() - killed_at >= RESTART_TIMEOUT:
                raise DisruptionError(f"{name} not ready within {RESTART_TIMEOUT:g} s: {now}")
            gevent.sleep(0.1)  # polling with a deadline
        took = time.monotonic() - killed_at
        log.warning("failover: %s ready again as pid %s after %.2f s", name, now.pid, took)

    def on_test_stop(self, **_: Any) -> None:
        if self.sigterm is not None:  # Locust's own handler takes over from here
            self.sigterm.cancel()
            self.sigterm = None
        gevent.killall(self.greenlets)
        self.greenlets.clear()
        if self.degraded:
            self.degraded = False
            self.disrupt("clear_fault", self.clear_fault)

    def clear_fault(self) -> None:
        self.control.fault(self.options.fault_server, {"clear": True})
        log.warning("degraded: %s cleared", self.options.fault_server)

    def on_quitting(self, environment: Environment, **_: Any) -> None:
        self.on_test_stop()
        failures = self.verdict()
        for failure in failures:
            log.error("run failed: %s", failure)
        environment.process_exit_code = 1 if failures else 0

    def verdict(self) -> list[str]:
        """Every reason the run failed; empty if it passed."""
        total = self.environment.stats.total
        max_ratio = self.options.max_error_ratio
        if max_ratio is None:
            max_ratio = self.scenario.max_error_ratio
        p95 = total.get_response_time_percentile(0.95)
        log.info(
            "%s: %d requests, %d failures (ratio %.4f, max %g), p95 %s ms (max %g)",
            self.options.scenario,
            total.num_requests,
            total.num_failures,
            total.fail_ratio,
            max_ratio,
            p95,
            self.options.max_p95_ms,
        )
        failures = list(self.problems)
        if total.num_requests == 0:
            failures.append("no request was made")
        if total.fail_ratio > max_ratio:
            failures.append(f"error ratio {total.fail_ratio:.4f} above {max_ratio:g}")
        if total.num_requests and p95 > self.options.max_p95_ms:
            failures.append(f"p95 {p95} ms above {self.options.max_p95_ms:g} ms")
        if self.environment.runner is not None and self.environment.runner.exceptions:
            failures.append(f"{len(self.environment.runner.exceptions)} errors in the locustfile")
        return failures


def on_init(environment: Environment, **_: Any) -> None:
    options = environment.parsed_options
    if options is None:  # used as a library, without Locust's command line
        return
    if not environment.host:
        environment.host = balancer_host(options)
    if isinstance(environment.runner, WorkerRunner):
        return  # the master disrupts and judges
    run = ScenarioRun(environment, options)
    if options.headless:
        run.watch_sigterm()
    environment.events.test_start.add_listener(run.on_test_start)
    environment.events.test_stop.add_listener(run.on_test_stop)
    environment.events.quitting.add_listener(run.on_quitting)


events.init_command_line_parser.add_listener(add_options)
events.init.add_listener(on_init)
