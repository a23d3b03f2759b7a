"""The autoscaler: sizes each server group from the load its servers and proxy report.

Kubernetes' HPA rule: ``desired = ceil(current × observed / target)``, skipped while
``observed / target`` is within the tolerance, clamped to ``min``/``max`` and to the step
limits. Against flapping, a scale-down goes only to the *highest* recommendation of the
last ``scale_down_window`` (and a scale-up to the lowest of ``scale_up_window``). The
signal is averaged over ``window``; no data (every server silent) holds the group as it
is — missing data never scales down. After a manual ``lbstack scale`` the group is left
alone for ``hold``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from app.client import fetch
from app.config import Autoscale, GroupLayout
from app.errors import ControlError
from app.log import get_logger
from app.metrics import histogram_quantile, parse

if TYPE_CHECKING:
    from app.supervisor.arbiter import Supervisor
    from app.supervisor.child import Child

log = get_logger("autoscaler")
SCRAPE_TIMEOUT = 1.0


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
    """The decision rule for one group, with its recommendation history (pure logic)."""

    def __init__(self, policy: Autoscale) -> None:
        self.policy = policy
        self._history: deque[tuple[float, int]] = deque()

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
        recommendation = min(max(recommendation, p.min), p.max)
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


class Signal:
    """The group's load signal, sampled every interval and averaged over the window."""

    def __init__(self, policy: Autoscale, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque()
        self._last: dict[str, tuple[float, float]] = {}  # server -> (time, cpu seconds)
        self._buckets: dict[float, float] | None = None

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

    def sample(self, servers: dict[str, str], proxy: str | None) -> float | None:
        """One reading from the servers' (name -> /metrics text) and the proxy's text."""
        signal = self.policy.signal
        if signal == "p99":
            return None if proxy is None else self._p99(proxy)
        values = []
        now = self._clock()
        for name, text in servers.items():
            for metric, _, value in parse(text):
                if signal == "in_flight" and metric == "lbstack_in_flight_requests":
                    values.append(value)
                elif signal == "cpu" and metric == "lbstack_process_cpu_seconds_total":
                    last = self._last.get(name)
                    self._last[name] = (now, value)
                    if last is not None and now > last[0]:
                        values.append(max(value - last[1], 0.0) / (now - last[0]))
        return sum(values) / len(values) if values else None

    def _p99(self, proxy: str) -> float | None:
        buckets: dict[float, float] = {}
        for metric, labels, value in parse(proxy):
            if metric == "lbstack_upstream_duration_seconds_bucket":
                le = float(labels["le"])
                buckets[le] = buckets.get(le, 0.0) + value
        previous, self._buckets = self._buckets, buckets
        if previous is None:
            return None
        delta = {le: count - previous.get(le, 0.0) for le, count in buckets.items()}
        if not delta or max(delta.values()) <= 0:
            return None  # no request in the interval: no latency to speak of
        return histogram_quantile(0.99, delta)


class Autoscaler:
    """One loop per group with autoscaling on, inside the supervisor."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        self._tasks: list[asyncio.Task[None]] = []
        self.last: dict[str, Decision] = {}

    def start(self) -> None:
        for layout in self._supervisor.config.layouts():
            if layout.autoscale.enabled and layout.server.kind != "address":
                self._tasks.append(asyncio.create_task(self._run(layout), name=layout.name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _run(self, layout: GroupLayout) -> None:
        policy = layout.autoscale
        recommender, signal = Recommender(policy), Signal(policy)
        gauge = self._supervisor.metrics.desired_servers.labels(
            "supervisor", "supervisor", layout.name
        )
        while True:
            await asyncio.sleep(policy.interval)
            servers = self._supervisor.servers_in(layout.index)
            signal.add(signal.sample(*await self._read(servers, layout.index)))
            if self._supervisor.scaler.held(layout.name, policy.hold):
                continue
            decision = recommender.decide(time.monotonic(), len(servers), signal.observed())
            self.last[layout.name] = decision
            gauge.set(decision.desired)
            if decision.desired == decision.current:
                continue
            log.info(
                "%s: %s (%s %.3f, target %g): %d -> %d servers",
                layout.name,
                decision.reason,
                policy.signal,
                decision.observed or 0.0,
                policy.target,
                decision.current,
                decision.desired,
            )
            try:
                await self._supervisor.scaler.scale(layout.name, decision.desired, manual=False)
            except ControlError as exc:
                log.error("%s: scaling to %d failed: %s", layout.name, decision.desired, exc)

    async def _read(self, servers: list[Child], group: int) -> tuple[dict[str, str], str | None]:
        async def text(child: Child) -> str | None:
            if child.admin is None or child.state != "ready":
                return None
            try:
                status, body = await fetch(child.admin, "/metrics", timeout=SCRAPE_TIMEOUT)
            except (aiohttp.ClientError, OSError, TimeoutError):
                return None
            return body.decode() if status == 200 else None

        proxy = self._supervisor.children.get(f"proxy-{group}")
        texts = await asyncio.gather(*(text(c) for c in servers))
        proxy_text = None if proxy is None else await text(proxy)
        return {c.name: t for c, t in zip(servers, texts, strict=True) if t is not None}, proxy_text

    def status(self) -> dict[str, Any]:
        return {group: decision.as_dict() for group, decision in self.last.items()}
