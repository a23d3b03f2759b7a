"""The autoscaler: sizes each server group from the load its proxy and processes show.

Kubernetes' HPA rule: ``desired = ceil(current × observed / target)``, skipped while
``observed / target`` is within the tolerance, clamped to ``min``/``max`` and to the step
limits. Against flapping, a scale-down goes only to the *highest* recommendation of the
last ``scale_down_window`` (and a scale-up to the lowest of ``scale_up_window``); like the
HPA, the history starts with the group's size at start, so a stack that has just come up
is not shrunk before its load arrives. The signal is averaged over ``window``; no data
holds the group as it is — missing data never scales down. After a manual
``lbstack scale`` the group is left alone for ``hold``.

The signals come from sources that every kind of server has, so a group of the user's
own command-run servers (no admin socket, no ``/metrics``) scales like the simulated
ones: ``in_flight`` and ``p99`` from the proxy's per-upstream figures (what it has sent
each server and not yet had answered, and how long the answers took), ``cpu`` from
``/proc`` for each server's process tree (the supervisor started it, so it has the pid).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from logging import DEBUG, INFO
from typing import TYPE_CHECKING, Any

import aiohttp

from lbstack.client import fetch
from lbstack.config import Autoscale, GroupLayout
from lbstack.errors import ControlError
from lbstack.log import get_logger
from lbstack.metrics import histogram_quantile, parse
from lbstack.supervisor.telemetry import INSTANCE, ROLE, tree_cpu_seconds

if TYPE_CHECKING:
    from lbstack.supervisor.child import Child
    from lbstack.supervisor.membership import Membership
    from lbstack.supervisor.scaling import Scaler
    from lbstack.supervisor.telemetry import SupervisorMetrics
    from lbstack.supervisor.topology import Topology

log = get_logger("autoscaler")
SCRAPE_TIMEOUT = 2.0
FAILED_STEP_MAX_WAIT = 300.0  # the longest wait before a step is tried again


@dataclass(frozen=True)
class Decision:
    """One evaluation: its inputs, what it recommends, and what it decided."""

    current: int
    observed: float | None
    target: float
    recommendation: int
    desired: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "current": self.current,
            "observed": None if self.observed is None else round(self.observed, 4),
            "target": self.target,
            "recommendation": self.recommendation,
            "desired": self.desired,
            "reason": self.reason,
        }


class Recommender:
    """The decision rule for one group, with its recommendation history (pure logic).

    ``seed``: (time, servers) to start the history with, as the HPA does with the
    group's size when it first sees it.
    """

    def __init__(self, policy: Autoscale, seed: tuple[float, int] | None = None) -> None:
        self.policy = policy
        self._history: deque[tuple[float, int]] = deque([seed] if seed else [])

    def decide(self, now: float, current: int, observed: float | None) -> Decision:
        p = self.policy
        if observed is None:
            desired = min(max(current, p.min), p.max)
            return Decision(current, None, p.target, current, desired, "no data: holding")
        ratio = observed / p.target
        if abs(ratio - 1.0) <= p.tolerance:
            recommendation, reason = current, "within tolerance"
        else:
            recommendation = math.ceil(current * ratio)
            reason = "load above target" if ratio > 1 else "load below target"
        if recommendation > p.max:
            recommendation, reason = p.max, f"{reason}, capped at max {p.max}"
        elif recommendation < p.min:
            recommendation, reason = p.min, f"{reason}, floored at min {p.min}"
        self._history.append((now, recommendation))
        horizon = max(p.scale_up_window, p.scale_down_window)
        while self._history and now - self._history[0][0] > horizon:
            self._history.popleft()
        desired = current
        if recommendation > current:
            lowest = min(r for t, r in self._history if now - t <= p.scale_up_window)
            desired = min(max(lowest, current), current + p.max_step_up)
            if desired == current:
                reason += ", held by the scale-up window"
        elif recommendation < current:
            highest = max(r for t, r in self._history if now - t <= p.scale_down_window)
            desired = max(min(highest, current), current - p.max_step_down)
            if desired == current:
                reason += ", held by the scale-down window"
        desired = min(max(desired, p.min), p.max)
        return Decision(current, observed, p.target, recommendation, desired, reason)


@dataclass(frozen=True)
class Reading:
    """What one evaluation read: the proxy's ``/metrics`` text (None: no answer) and the
    CPU seconds of each server's process tree so far (name -> (pid, seconds)); when
    nothing could be read, why."""

    proxy: str | None = None
    cpu: Mapping[str, tuple[int, float]] | None = None
    problem: str | None = None


class Signal:
    """The group's load signal, sampled every interval and averaged over the window."""

    def __init__(self, policy: Autoscale, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        # server -> (pid, time, cpu seconds) at the previous reading
        self._cpu: dict[str, tuple[int, float, float]] = {}
        # (upstream, le) -> cumulative count at the previous reading
        self._buckets: dict[tuple[str, float], float] | None = None

    def add(self, value: float | None) -> None:
        now = self._clock()
        if value is not None:
            self._samples.append((now, value))
        while self._samples and now - self._samples[0][0] > self.policy.window:
            self._samples.popleft()

    def observed(self) -> float | None:
        if not self._samples:
            return None
        return sum(v for _, v in self._samples) / len(self._samples)

    def sample(self, servers: Collection[str], reading: Reading) -> float | None:
        """One value of the signal for the group's ``servers`` from ``reading``."""
        signal = self.policy.signal
        if signal == "cpu":
            return None if reading.cpu is None else self._cpu_cores(servers, reading.cpu)
        if reading.proxy is None:
            return None
        if signal == "p99":
            return self._p99(servers, reading.proxy)
        # The proxy's own count per upstream: exact, and there for every kind of server.
        values = [
            value
            for metric, labels, value in parse(reading.proxy)
            if metric == "lbstack_upstream_in_flight_requests" and labels.get("upstream") in servers
        ]
        return sum(values) / len(values) if values else None

    def _cpu_cores(
        self, servers: Collection[str], cpu: Mapping[str, tuple[int, float]]
    ) -> float | None:
        now = self._clock()
        values = []
        for name in servers:
            if name not in cpu:
                continue
            pid, seconds = cpu[name]
            last = self._cpu.get(name)
            self._cpu[name] = (pid, now, seconds)
            # A restarted server is a new process: its first reading is only a baseline.
            if last is not None and last[0] == pid and now > last[1]:
                values.append(max(seconds - last[2], 0.0) / (now - last[1]))
        for gone in set(self._cpu) - set(servers):
            del self._cpu[gone]
        return sum(values) / len(values) if values else None

    def _p99(self, servers: Collection[str], proxy: str) -> float | None:
        counts: dict[tuple[str, float], float] = {}
        for metric, labels, value in parse(proxy):
            if (
                metric == "lbstack_upstream_duration_seconds_bucket"
                and labels.get("upstream") in servers
            ):
                counts[(labels["upstream"], float(labels["le"]))] = value
        previous, self._buckets = self._buckets, counts
        if previous is None:
            return None
        # Per upstream, so a server that joined or left between two readings neither
        # adds its whole history nor takes it away; a count that went down is a counter
        # that started over (a restarted proxy).
        delta: dict[float, float] = {}
        for key, count in counts.items():
            before = previous.get(key, 0.0)
            delta[key[1]] = delta.get(key[1], 0.0) + (count - before if count >= before else count)
        if not delta or max(delta.values()) <= 0:
            # The proxy answered and sent nothing: an idle group, which no one waits on.
            # (None here would hold an idle group at its size for ever.)
            return 0.0
        return histogram_quantile(0.99, delta)


@dataclass
class _Group:
    """One autoscaled group's loop state."""

    layout: GroupLayout
    recommender: Recommender
    signal: Signal
    evaluations: int = 0
    last: Decision | None = None
    logged: tuple[str, int, int] | None = None
    retired: bool = False  # a reload changed or ended its policy: the loop stops
    problem: str | None = None  # why the last reading failed, if it did
    failures: int = 0  # scale steps failed in a row (a new server that can't start)
    retry_at: float = -math.inf  # no step before this, after a failed one


class Autoscaler:
    """One loop per group with autoscaling on, inside the supervisor."""

    def __init__(
        self,
        topology: Topology,
        membership: Membership,
        scaler: Scaler,
        metrics: SupervisorMetrics,
    ) -> None:
        self._topology = topology
        self._membership = membership
        self._scaler = scaler
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._groups: dict[str, _Group] = {}

    def start(self) -> None:
        for layout in self._autoscaled():
            self._start(layout)

    def reconfigure(self) -> None:
        """After a reload: a group whose policy (or server kind) changed starts over with
        the new one, a group no longer autoscaled is left to the config's size, a newly
        autoscaled one starts; the others go on with their history."""
        layouts = {layout.name: layout for layout in self._autoscaled()}
        for name, group in list(self._groups.items()):
            new = layouts.get(name)
            if new is not None and (new.autoscale, new.server.kind) == (
                group.layout.autoscale,
                group.layout.server.kind,
            ):
                group.layout = new
                continue
            # Not cancelled: it may be halfway through a step. It ends at its next turn.
            group.retired = True
            del self._groups[name]
            log.info("%s: autoscaling %s", name, "policy changed" if new else "turned off")
        for name, layout in layouts.items():
            if name not in self._groups:
                self._start(layout)

    def _autoscaled(self) -> list[GroupLayout]:
        return [
            layout for layout in self._topology.placement.local_groups() if layout.autoscale.enabled
        ]

    def _start(self, layout: GroupLayout) -> None:
        policy = layout.autoscale
        seed = (time.monotonic(), len(self._topology.servers_in(layout.index)))
        group = _Group(layout, Recommender(policy, seed), Signal(policy))
        self._groups[layout.name] = group
        self._tasks = [t for t in self._tasks if not t.done()]
        self._tasks.append(asyncio.create_task(self._run(group), name=layout.name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, group: _Group) -> None:
        while True:
            await asyncio.sleep(group.layout.autoscale.interval)
            if group.retired:
                return
            try:
                await self.evaluate(group)
            except Exception:  # a bug or an odd reading must not end the group's scaling
                log.exception("%s: evaluation failed", group.layout.name)

    async def evaluate(self, group: _Group) -> None:
        """Read the group's signal, decide, log the decision if it is news, and act."""
        layout, policy = group.layout, group.layout.autoscale
        servers = self._topology.servers_in(layout.index)
        reading = await self._read(layout, servers)
        if (reading.problem is None) != (group.problem is None):  # once each way
            if reading.problem is not None:
                log.warning("%s: no reading of its load: %s", layout.name, reading.problem)
            else:
                log.info("%s: its load can be read again", layout.name)
            group.problem = reading.problem
        group.signal.add(group.signal.sample({c.name for c in servers}, reading))
        observed = group.signal.observed()
        held = self._held(group)
        if held is not None:
            current = len(servers)
            decision = Decision(current, observed, policy.target, current, current, held)
        else:
            decision = group.recommender.decide(time.monotonic(), len(servers), observed)
        group.evaluations += 1
        group.last = decision
        metrics = self._metrics
        metrics.evaluations.labels(ROLE, INSTANCE, layout.name).inc()
        metrics.observed.labels(ROLE, INSTANCE, layout.name, policy.signal).set(
            float("nan") if observed is None else observed
        )
        metrics.desired_servers.labels(ROLE, INSTANCE, layout.name).set(decision.desired)
        self._log(group, decision)
        if decision.desired != decision.current:
            await self._step(group, decision)

    def _held(self, group: _Group) -> str | None:
        """Why the group must not change now, if it must not."""
        if self._membership.busy:
            # A scale, drain, reload or restart is under way: the group is not what this
            # reading saw.
            return "held while another membership change runs"
        if self._scaler.held(group.layout.name, group.layout.autoscale.hold):
            return "held after a manual scale"  # the user's size stands for ``hold``
        if time.monotonic() < group.retry_at:
            # A step just failed: trying again each interval would spawn servers that
            # can't start over and over. The wait doubles with each failure.
            return f"held after {group.failures} failed step(s), next try in " + (
                f"{group.retry_at - time.monotonic():.1f}s"
            )
        return None

    async def _step(self, group: _Group, decision: Decision) -> None:
        """Set the group's size to the decision's, unless the group changed meanwhile."""
        layout, policy = group.layout, group.layout.autoscale
        async with self._membership.change(f"autoscale {layout.name}"):
            # Another change may have got the lock first: act only on the group as seen.
            now = len(self._topology.servers_in(layout.index))
            if group.retired:
                return  # a reload changed the policy while this one waited
            if now != decision.current or self._scaler.held(layout.name, policy.hold):
                log.info(
                    "%s: not scaling to %d: the group changed meanwhile",
                    layout.name,
                    decision.desired,
                )
                return
            try:
                await self._scaler.converge(layout, decision.desired)
            except ControlError as exc:
                group.failures += 1
                delay = min(policy.interval * 2**group.failures, FAILED_STEP_MAX_WAIT)
                group.retry_at = time.monotonic() + delay
                log.error(
                    "%s: scaling to %d failed (%s); next try in %.1fs",
                    layout.name,
                    decision.desired,
                    exc,
                    delay,
                )
            else:
                group.failures = 0

    def _log(self, group: _Group, decision: Decision) -> None:
        """Each decision once: at info when its outcome differs from the previous one,
        so a steady group logs one line, not one per interval."""
        layout, policy = group.layout, group.layout.autoscale
        outcome = (decision.reason, decision.current, decision.desired)
        news = outcome != group.logged or decision.desired != decision.current
        group.logged = outcome
        if decision.desired != decision.current:
            change = f"{decision.current} -> {decision.desired} servers"
        else:
            change = f"stays at {decision.current} servers"
        observed = "none" if decision.observed is None else f"{decision.observed:.3f}"
        log.log(
            INFO if news else DEBUG,
            "%s: %s (%s %s, target %g): %s",
            layout.name,
            decision.reason,
            policy.signal,
            observed,
            policy.target,
            change,
        )

    async def _read(self, layout: GroupLayout, servers: list[Child]) -> Reading:
        if layout.autoscale.signal == "cpu":
            pids = {c.name: c.pid for c in servers if c.pid is not None and c.state == "ready"}
            seconds = await asyncio.to_thread(tree_cpu_seconds, list(pids.values()))
            cpu = {name: (pid, seconds[pid]) for name, pid in pids.items() if pid in seconds}
            return Reading(cpu=cpu, problem=None if cpu else "no server process found")
        proxy = self._topology.children.get(layout.name)
        if proxy is None or proxy.admin is None or proxy.state != "ready":
            return Reading(problem=f"{layout.name} is not ready")
        try:
            status, body = await fetch(proxy.admin, "/metrics", timeout=SCRAPE_TIMEOUT)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Reading(problem=f"{layout.name} did not answer GET /metrics: {exc!r}")
        if status != 200:
            return Reading(problem=f"{layout.name} answered GET /metrics with {status}")
        return Reading(proxy=body.decode())

    def status(self) -> dict[str, Any]:
        """Per autoscaled group: its signal, how many evaluations so far, the last decision."""
        answer: dict[str, Any] = {}
        for name, group in self._groups.items():
            policy = group.layout.autoscale
            entry: dict[str, Any] = {
                "signal": policy.signal,
                "target": policy.target,
                "tolerance": policy.tolerance,
                "min": policy.min,
                "max": policy.max,
                "evaluations": group.evaluations,
                "problem": group.problem,
            }
            if group.last is not None:
                entry.update(group.last.as_dict())
            answer[name] = entry
        return answer
