"""Metric definitions shared by every component, and Prometheus text parsing.

Each process has its own registry. Every series carries ``role`` and ``instance``
(the component's name), and per-upstream series also ``upstream``: the names are a
contract with deploy/ and with the routers that scrape each other.

Multiprocess mode (a tier under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` set, read at
import as prometheus_client itself does): every worker writes its values to files in
that directory and each worker's ``/metrics`` answers the sum over all of them
(``MultiProcessCollector``). Counters and histograms add up; each gauge says how it
combines (``multiprocess_mode``: in-flight and queue lengths add up over live workers,
health takes the worst worker's view, cost the highest). Gauges read by a function at
scrape time (``set_function``) are sampled into the files every ``SAMPLE_INTERVAL``
(``sample_functions``) and on each scrape, so a worker's figures are at most that old
in another worker's answer. The process CPU and memory series are per worker and carry
a ``pid`` label. A removed upstream's series stay in the files, at their last value
(gauges at 0), until the worker exits. Without the variable nothing of this applies:
the classes and the hot path are prometheus_client's own.

A ``SampledCollector`` (the forwarder's per-request figures, ``lbstack.forwarding.stats``)
keeps its figures in plain Python and yields them at scrape time; in multiprocess mode
it is sampled into the files like a function gauge instead of being collected.
"""

from __future__ import annotations

import logging
import math
import os
import resource
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector
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

MULTIPROC_DIR_VAR = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROCESS = bool(os.environ.get(MULTIPROC_DIR_VAR))
# How stale a worker's function gauges may be in another worker's answer.
SAMPLE_INTERVAL = 0.5


class ProcessCollector(Collector):
    """CPU seconds and resident memory of this process, labelled like everything else.

    ``pid``: label the series with the process id too (a worker among several).
    """

    def __init__(self, role: str, instance: str, *, pid: int | None = None) -> None:
        self._labels = [role, instance] if pid is None else [role, instance, str(pid)]
        self._names = BASE if pid is None else (*BASE, "pid")

    def collect(self) -> Iterable[Metric]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        cpu = CounterMetricFamily(
            "lbstack_process_cpu_seconds", "CPU time used by the process.", labels=self._names
        )
        cpu.add_metric(self._labels, usage.ru_utime + usage.ru_stime)
        yield cpu
        rss = GaugeMetricFamily(
            "lbstack_process_resident_memory_bytes",
            "Resident memory of the process.",
            labels=self._names,
        )
        rss.add_metric(self._labels, _rss_bytes())
        yield rss


class CertificateCollector(Collector):
    """When each certificate a balancer serves expires, read at scrape time (a reload
    changes them): ``certificates()`` gives ``(cert path, notAfter)`` pairs."""

    def __init__(
        self, role: str, instance: str, certificates: Callable[[], Iterable[tuple[str, float]]]
    ) -> None:
        self._labels = [role, instance]
        self._certificates = certificates

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "lbstack_tls_certificate_expiry_timestamp_seconds",
            "When each certificate served expires (its notAfter, unix time).",
            labels=(*BASE, "certificate"),
        )
        for certificate, not_after in self._certificates():
            family.add_metric([*self._labels, certificate], not_after)
        yield family


def _rss_bytes() -> float:
    try:
        with open(f"/proc/{os.getpid()}/statm", "rb") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def _quiet_remove(remove: Callable[..., None], *labelvalues: Any) -> None:
    # prometheus_client warns that multiprocess mode cannot drop a series from its
    # files; that is known and documented above, not worth a line per removal.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        remove(*labelvalues)


class _MultiProcessCounter(Counter):
    def remove(self, *labelvalues: Any) -> None:
        _quiet_remove(super().remove, *labelvalues)


class _MultiProcessHistogram(Histogram):
    def remove(self, *labelvalues: Any) -> None:
        _quiet_remove(super().remove, *labelvalues)


class Sampled(Protocol):
    def sample(self) -> None:
        """Write this process's current figures to its multiprocess files."""


class SampledCollector(Collector):
    """A collector of this process's own figures, which it yields at scrape time.

    In multiprocess mode, registered into a component's registry, it is not collected
    (another worker's ``/metrics`` could not see what it yields) but sampled: every
    ``SAMPLE_INTERVAL`` and on each scrape, ``sample`` writes its figures to this
    process's files, which the aggregate over all workers reads. The registry keeps it.
    """

    def sample(self) -> None:
        raise NotImplementedError


# Function gauges and sampled collectors of this process, sampled into its files.
_sampled: weakref.WeakSet[Sampled] = weakref.WeakSet()


class _MultiProcessGauge(Gauge):
    """A gauge whose ``set_function`` reaches the multiprocess files, sampled."""

    _function: Callable[[], float] | None = None

    def set_function(self, f: Callable[[], float]) -> None:
        self._raise_if_not_observable()  # type: ignore[no-untyped-call]
        self._function = f
        _sampled.add(self)

    def sample(self) -> None:
        if self._function is not None:
            self.set(float(self._function()))

    def remove(self, *labelvalues: Any) -> None:
        child = self._metrics.get(tuple(str(value) for value in labelvalues))
        # Its file entry outlives it: leave 0 there, not a stale value.
        if isinstance(child, _MultiProcessGauge):
            child._function = None
            child.set(0.0)
        _quiet_remove(super().remove, *labelvalues)


# The sampling failures already logged.
_failed_samples: set[tuple[str, str]] = set()


def sample_functions() -> None:
    """Write the current value of every function gauge of this process to its file, and
    the figures of every ``SampledCollector`` registered into a component's registry.

    Under gunicorn each worker calls this every ``SAMPLE_INTERVAL``; every scrape also
    does, so the scraped worker's own figures are exact. A no-op outside multiprocess mode.
    """
    for gauge in list(_sampled):
        try:
            gauge.sample()
        except Exception as exc:  # a bad reading must not cost the others theirs
            key = (type(gauge).__name__, repr(exc))
            if key not in _failed_samples:  # said once, not every interval
                _failed_samples.add(key)
                logging.getLogger("lbstack.metrics").exception("sampling %s failed", key[0])


class _Aggregate(MultiProcessCollector):
    """Every worker's series, summed; always collected, whatever the names asked for."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        sample_functions()
        return super().collect()  # type: ignore[no-any-return,no-untyped-call]


class _MultiProcessRegistry(CollectorRegistry):
    """The registry a worker exposes: the aggregate over all workers' files.

    Metrics registered into it are not collected themselves (their values are in
    this process's file, which the aggregate reads), so nothing is counted twice; nor
    are sampled collectors, which it keeps and which write to that file when sampled.
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=True, support_collectors_without_names=True)
        self._sampled_collectors: list[SampledCollector] = []
        _Aggregate(self)  # type: ignore[no-untyped-call]

    def register(self, collector: Collector) -> None:
        if isinstance(collector, MetricWrapperBase):
            return
        if isinstance(collector, SampledCollector):
            self._sampled_collectors.append(collector)
            _sampled.add(collector)
            return
        super().register(collector)


if MULTIPROCESS:
    _COUNTER: type[Counter] = _MultiProcessCounter
    _GAUGE: type[Gauge] = _MultiProcessGauge
    _HISTOGRAM: type[Histogram] = _MultiProcessHistogram
else:
    _COUNTER, _GAUGE, _HISTOGRAM = Counter, Gauge, Histogram


def _registry(role: str, instance: str) -> CollectorRegistry:
    if MULTIPROCESS:
        registry: CollectorRegistry = _MultiProcessRegistry()
        registry.register(ProcessCollector(role, instance, pid=os.getpid()))
        return registry
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ProcessCollector(role, instance))
    return registry


class ComponentMetrics:
    """A component's registry, which every other series of it goes into, and its labels.

    Alone, what a router needs: its per-request series come from a collector
    (``lbstack.forwarding.stats``), the rest from ``RouterMetrics``.
    """

    def __init__(self, role: str, instance: str) -> None:
        self.role = role
        self.instance = instance
        self.registry = _registry(role, instance)


class Metrics(ComponentMetrics):
    """The series every HTTP-serving component exports."""

    def __init__(self, role: str, instance: str) -> None:
        super().__init__(role, instance)
        labels = (role, instance)
        self._requests = _COUNTER(
            "lbstack_requests",
            "Requests answered, by status code.",
            (*BASE, "code"),
            registry=self.registry,
        )
        self._codes: dict[int, Counter] = {}
        self._labels = labels
        self.latency = _HISTOGRAM(
            "lbstack_request_duration_seconds",
            "Time from request received to response sent.",
            BASE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(*labels)
        self.in_flight = _GAUGE(
            "lbstack_in_flight_requests",
            "Requests being handled now.",
            BASE,
            registry=self.registry,
            multiprocess_mode="livesum",
        ).labels(*labels)
        self.client_disconnects = _COUNTER(
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


class RouterMetrics:
    """The per-upstream series of a router that no request touches.

    Ejections, failed scrapes and panic mode. The per-request ones (requests, errors,
    latency, retries, in-flight, health, cost, queue, retry budget) are a collector's,
    ``lbstack.forwarding.stats.ForwardingCollector``.
    """

    def __init__(self, metrics: ComponentMetrics) -> None:
        registry = metrics.registry
        self._base = (metrics.role, metrics.instance)
        self.ejections = _COUNTER(
            "lbstack_upstream_ejections",
            "Times each upstream was taken out after consecutive failed requests.",
            UPSTREAM,
            registry=registry,
        )
        self.panic = _GAUGE(
            "lbstack_panic_mode",
            "1 while too few upstreams are healthy, so health is ignored and all take traffic.",
            BASE,
            registry=registry,
            multiprocess_mode="livemax",
        ).labels(*self._base)
        self.scrape_errors = _COUNTER(
            "lbstack_scrape_errors",
            "Failed reads of each upstream's /metrics (the routing feedback).",
            UPSTREAM,
            registry=registry,
        )

    def labels(self, upstream: str) -> tuple[str, str, str]:
        return (*self._base, upstream)


class UpstreamMetrics(RouterMetrics):
    """Per-upstream series of a router (balancer or proxy), per-request ones included:
    the old forwarder's (a new one takes ``RouterMetrics`` and ``lbstack.forwarding.stats``)."""

    def __init__(self, metrics: ComponentMetrics) -> None:
        super().__init__(metrics)
        registry = metrics.registry
        self.requests = _COUNTER(
            "lbstack_upstream_requests",
            "Requests sent to each upstream, by status code.",
            (*UPSTREAM, "code"),
            registry=registry,
        )
        self.errors = _COUNTER(
            "lbstack_upstream_errors",
            "Failures talking to each upstream, by kind (connect, timeout, reset, protocol).",
            (*UPSTREAM, "kind"),
            registry=registry,
        )
        self.latency = _HISTOGRAM(
            "lbstack_upstream_duration_seconds",
            "Time from request sent upstream to its response headers.",
            UPSTREAM,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = _GAUGE(
            "lbstack_upstream_in_flight_requests",
            "Requests in flight to each upstream.",
            UPSTREAM,
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.healthy = _GAUGE(
            "lbstack_upstream_healthy",
            "1 when the upstream takes traffic, 0 when it is out.",
            UPSTREAM,
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.retries = _COUNTER(
            "lbstack_upstream_retries",
            "Requests sent again elsewhere after this upstream failed them before answering.",
            UPSTREAM,
            registry=registry,
        )
        self.cost = _GAUGE(
            "lbstack_upstream_cost",
            "Routing cost of each upstream now (p2c_ewma: latency × load / weight); lower wins.",
            UPSTREAM,
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_length = _GAUGE(
            "lbstack_queue_length",
            "Requests waiting for a free upstream slot (every upstream at its limit).",
            BASE,
            registry=registry,
            multiprocess_mode="livesum",
        ).labels(*self._base)
        self.budget = _GAUGE(
            "lbstack_retry_budget",
            "Retries the retry budget would allow now.",
            BASE,
            registry=registry,
            multiprocess_mode="livesum",
        ).labels(*self._base)
        self.budget_exhausted = _COUNTER(
            "lbstack_retry_budget_exhausted",
            "Retries refused because the retry budget was spent.",
            BASE,
            registry=registry,
        ).labels(*self._base)


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
