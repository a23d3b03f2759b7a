"""Metric definitions shared by every component, and Prometheus text parsing.

Each process has its own registry. Every series carries ``role`` and ``instance``
(the component's name), and per-upstream series also ``upstream``: the names are a
contract with deploy/ and with the routers that scrape each other.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

# No ``*_created`` series: they double what every scrape carries and nothing reads them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Buckets from 250 µs to 30 s: a proxy hop is sub-millisecond, a slow upstream seconds.
LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BASE = ("role", "instance")
UPSTREAM = (*BASE, "upstream")


class ProcessCollector(Collector):
    """CPU seconds and resident memory of this process, labelled like everything else."""

    def __init__(self, role: str, instance: str) -> None:
        self._labels = [role, instance]

    def collect(self) -> Iterable[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily(
            "lbstack_process_cpu_seconds", "CPU time used by the process.", labels=BASE
        )
        cpu.add_metric(self._labels, usage.ru_utime + usage.ru_stime)
        yield cpu
        rss = GaugeMetricFamily(
            "lbstack_process_resident_memory_bytes", "Resident memory of the process.", labels=BASE
        )
        rss.add_metric(self._labels, _rss_bytes())
        yield rss


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm", "rb") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class Metrics:
    """The series every HTTP-serving component exports."""

    def __init__(self, role: str, instance: str) -> None:
        self.role = role
        self.instance = instance
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(ProcessCollector(role, instance))
        labels = (role, instance)
        self._requests = Counter(
            "lbstack_requests",
            "Requests answered, by status code.",
            (*BASE, "code"),
            registry=self.registry,
        )
        self._codes: dict[int, Counter] = {}
        self._labels = labels
        self.latency = Histogram(
            "lbstack_request_duration_seconds",
            "Time from request received to response sent.",
            BASE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(*labels)
        self.in_flight = Gauge(
            "lbstack_in_flight_requests",
            "Requests being handled now.",
            BASE,
            registry=self.registry,
        ).labels(*labels)
        self.client_disconnects = Counter(
            "lbstack_client_disconnects",
            "Clients that went away before their answer was sent.",
            BASE,
            registry=self.registry,
        ).labels(*labels)

    def count(self, status: int) -> None:
        child = self._codes.get(status)
        if child is None:
            child = self._codes[status] = self._requests.labels(*self._labels, str(status))
        child.inc()


class UpstreamMetrics:
    """Per-upstream series of a router (balancer or proxy)."""

    def __init__(self, metrics: Metrics) -> None:
        registry = metrics.registry
        self._base = (metrics.role, metrics.instance)
        self.requests = Counter(
            "lbstack_upstream_requests",
            "Requests sent to each upstream, by status code.",
            (*UPSTREAM, "code"),
            registry=registry,
        )
        self.errors = Counter(
            "lbstack_upstream_errors",
            "Failures talking to each upstream, by kind (connect, timeout, reset, protocol).",
            (*UPSTREAM, "kind"),
            registry=registry,
        )
        self.latency = Histogram(
            "lbstack_upstream_duration_seconds",
            "Time from request sent upstream to its response headers.",
            UPSTREAM,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "lbstack_upstream_in_flight_requests",
            "Requests in flight to each upstream.",
            UPSTREAM,
            registry=registry,
        )
        self.healthy = Gauge(
            "lbstack_upstream_healthy",
            "1 when the upstream takes traffic, 0 when it is out.",
            UPSTREAM,
            registry=registry,
        )
        self.retries = Counter(
            "lbstack_upstream_retries",
            "Requests sent again elsewhere after this upstream failed them before answering.",
            UPSTREAM,
            registry=registry,
        )
        self.ejections = Counter(
            "lbstack_upstream_ejections",
            "Times each upstream was taken out after consecutive failed requests.",
            UPSTREAM,
            registry=registry,
        )
        self.panic = Gauge(
            "lbstack_panic_mode",
            "1 while too few upstreams are healthy, so health is ignored and all take traffic.",
            BASE,
            registry=registry,
        ).labels(*self._base)
        self.scrape_errors = Counter(
            "lbstack_scrape_errors",
            "Failed reads of each upstream's /metrics (the routing feedback).",
            UPSTREAM,
            registry=registry,
        )

        self.cost = Gauge(
            "lbstack_upstream_cost",
            "Routing cost of each upstream now (p2c_ewma: latency × load / weight); lower wins.",
            UPSTREAM,
            registry=registry,
        )
        self.queue_length = Gauge(
            "lbstack_queue_length",
            "Requests waiting for a free upstream slot (every upstream at its limit).",
            BASE,
            registry=registry,
        ).labels(*self._base)
        self.budget = Gauge(
            "lbstack_retry_budget",
            "Retries the retry budget would allow now.",
            BASE,
            registry=registry,
        ).labels(*self._base)
        self.budget_exhausted = Counter(
            "lbstack_retry_budget_exhausted",
            "Retries refused because the retry budget was spent.",
            BASE,
            registry=registry,
        ).labels(*self._base)

    def labels(self, upstream: str) -> tuple[str, str, str]:
        return (*self._base, upstream)


def parse(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """Every sample in a Prometheus text exposition: (name, labels, value)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, sample.labels, sample.value


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's histogram_quantile over cumulative ``buckets`` (le -> count)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    rank = q * ordered[-1][1]
    lower_le, lower_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return lower_le
            if count == lower_count:
                return le
            return lower_le + (le - lower_le) * (rank - lower_count) / (count - lower_count)
        lower_le, lower_count = le, count
    return ordered[-1][0]
