"""What the supervisor knows of its children: its own metrics (restarts, children up,
servers per group, the autoscaler's figures) and the CPU each child's process tree uses."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lbstack.metrics import ProcessCollector

if TYPE_CHECKING:
    from lbstack.address import Address
    from lbstack.config import Config
    from lbstack.supervisor.child import Child

ROLE = "supervisor"
INSTANCE = "supervisor"


class _TopologyCollector(Collector):
    """Derived at scrape time from the children, so it can never drift from them."""

    def __init__(self, children: Callable[[], Iterable[Child]]) -> None:
        self._children = children

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily(
            "lbstack_child_up",
            "1 when the child is running and ready.",
            labels=["role", "instance", "child", "child_role"],
        )
        servers = GaugeMetricFamily(
            "lbstack_group_servers",
            "Servers currently in each proxy group.",
            labels=["role", "instance", "group"],
        )
        per_group: dict[str, int] = {}
        for child in self._children():
            up.add_metric(
                [ROLE, INSTANCE, child.name, child.role], 1.0 if child.state == "ready" else 0.0
            )
            if child.role == "server" and child.id.group_name is not None:
                key = child.id.group_name
                per_group[key] = per_group.get(key, 0) + 1
        for group, count in sorted(per_group.items()):
            servers.add_metric([ROLE, INSTANCE, group], count)
        yield up
        yield servers


class SupervisorMetrics:
    """Registry of the supervisor's series."""

    def __init__(self, config: Config, children: Callable[[], Iterable[Child]]) -> None:
        """``children``: the stack's children as they are at each scrape."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ProcessCollector(ROLE, INSTANCE))
        self.registry.register(_TopologyCollector(children))
        # Every group and direction is exported from the start (at 0), so dashboards and
        # alerts see the series before the first scale event.
        self.scale_events = Counter(
            "lbstack_scale_events",
            "Servers added to or removed from each group.",
            ["role", "instance", "group", "direction"],
            registry=self.registry,
        )
        self.desired_servers = Gauge(
            "lbstack_group_servers_desired",
            "Servers the autoscaler wants in each group (its last decision).",
            ["role", "instance", "group"],
            registry=self.registry,
        )
        self.evaluations = Counter(
            "lbstack_autoscale_evaluations",
            "Times the autoscaler read each group's signal and decided (a step or none).",
            ["role", "instance", "group"],
            registry=self.registry,
        )
        self.observed = Gauge(
            "lbstack_autoscale_observed",
            "Each group's load signal, averaged over its window, as the last decision saw it "
            "(NaN: no data).",
            ["role", "instance", "group", "signal"],
            registry=self.registry,
        )
        for layout in config.layouts():
            for direction in ("up", "down"):
                self.scale_events.labels(ROLE, INSTANCE, layout.name, direction)
            if layout.autoscale.enabled:
                self.desired_servers.labels(ROLE, INSTANCE, layout.name).set(layout.servers)
                self.evaluations.labels(ROLE, INSTANCE, layout.name)
                self.observed.labels(ROLE, INSTANCE, layout.name, layout.autoscale.signal).set(
                    float("nan")
                )
        self._restarts = Counter(
            "lbstack_child_restarts",
            "Children restarted after they died.",
            ["role", "instance", "child", "child_role"],
            registry=self.registry,
        )

        self._replacements = Counter(
            "lbstack_child_replacements",
            "Children replaced on purpose, new before old (reload, rolling restart).",
            ["role", "instance", "child", "child_role"],
            registry=self.registry,
        )

    def track(self, child: Child) -> None:
        """Export the child's restart and replacement counts (0) from the start."""
        self._restarts.labels(ROLE, INSTANCE, child.name, child.role)
        self._replacements.labels(ROLE, INSTANCE, child.name, child.role)

    def replaced(self, child: Child) -> None:
        self._replacements.labels(ROLE, INSTANCE, child.name, child.role).inc()

    def restarted(self, child: Child) -> None:
        self._restarts.labels(ROLE, INSTANCE, child.name, child.role).inc()


def target_names(children: Iterable[Child]) -> list[str]:
    """What the exporter's ``/metrics?target=`` serves: the supervisor, and every child
    with an admin API."""
    return ["supervisor", *(c.name for c in children if c.admin is not None)]


def target_groups(host: str, children: Iterable[Child]) -> list[dict[str, Any]]:
    """Prometheus's service-discovery groups (file_sd and http_sd alike): one target per
    component, all at the exporter ``host``, told apart by ``lbstack_target``."""
    return [
        {"targets": [host], "labels": {"lbstack_target": name}} for name in target_names(children)
    ]


def write_targets(path: Path, exporter: Address, children: Iterable[Child]) -> None:
    """The file_sd targets file Prometheus reads to scrape every component through the
    supervisor's ``exporter`` (``/metrics?target=<name>``), replaced atomically."""
    groups = target_groups(f"{exporter.host}:{exporter.port}", children)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(groups, indent=2))
    tmp.replace(path)


def tree_cpu_seconds(roots: Collection[int], proc: str = "/proc") -> dict[int, float]:
    """CPU seconds (user + system) used so far by each root pid and its descendants.

    A gunicorn master does little; its workers, its children, do the work. Each process
    counts its own time and that of the children it has reaped, so a worker that exits
    moves its time into its parent's figure instead of losing it. A root that is gone is
    left out. One pass over ``/proc``, so the cost does not grow with the roots.
    """
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    own: dict[int, float] = {}
    try:
        entries = os.listdir(proc)
    except OSError:
        return {}
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"{proc}/{entry}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue  # it exited while we looked
        # "pid (comm) state ppid ..." where comm may hold spaces and parentheses.
        fields = raw[raw.rfind(b")") + 2 :].split()
        if len(fields) < 15:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
        own[pid] = (utime + stime + cutime + cstime) / tick
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    totals: dict[int, float] = {}
    for root in roots:
        if root not in own:
            continue
        total, stack, seen = 0.0, [root], set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += own.get(pid, 0.0)
            stack.extend(children.get(pid, ()))
        totals[root] = total
    return totals
