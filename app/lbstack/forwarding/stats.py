"""Per-request bookkeeping of a forwarder, off the hot path.

A request costs a few dict and list updates on plain Python objects: ``TierStats`` for
the component, ``UpstreamStats`` per upstream link, each latency a ``Histogram`` of
fixed buckets. No lock, no prometheus_client call. ``ForwardingCollector`` turns them
into the documented series at scrape time, the same names, labels, help texts and
buckets the prometheus_client objects of ``lbstack.metrics`` give:

- ``lbstack_requests_total{role,instance,code}``,
  ``lbstack_request_duration_seconds{role,instance}``,
  ``lbstack_in_flight_requests{role,instance}``,
  ``lbstack_client_disconnects_total{role,instance}``;
- per current upstream (a removed one's series go with it):
  ``lbstack_upstream_requests_total{...,upstream,code}``,
  ``lbstack_upstream_errors_total{...,upstream,kind}`` (every kind of ``ERROR_KINDS``
  from the start, at 0), ``lbstack_upstream_duration_seconds``,
  ``lbstack_upstream_in_flight_requests``, ``lbstack_upstream_healthy``,
  ``lbstack_upstream_retries_total``, ``lbstack_upstream_cost``;
- ``lbstack_queue_length``, ``lbstack_retry_budget``,
  ``lbstack_retry_budget_exhausted_total`` (``role``, ``instance``).

Multiprocess mode (``lbstack.metrics``): the collector is a ``SampledCollector``. Registered
into the component's registry it is sampled, not collected: each sample adds what the
stats grew by since the last one to prometheus_client's file-backed series of the same
names (counters and histograms) and sets the gauges, so every worker's ``/metrics``
holds this worker's figures, at most ``SAMPLE_INTERVAL`` old (exact for the scraped
worker, which samples first). A removed upstream's last growth is written, its gauges
set to 0; its counters stay in the files, as ``lbstack.metrics`` says.

Everything runs on the event loop's thread, as the forwarder does.
"""

from __future__ import annotations

import warnings
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

import prometheus_client
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.utils import floatToGoString

from lbstack.metrics import BASE, LATENCY_BUCKETS, UPSTREAM, SampledCollector

ERROR_KINDS: Final = ("connect", "timeout", "reset", "protocol")

_BOUNDS: Final = tuple(float(bound) for bound in LATENCY_BUCKETS)
# The ``le`` label of each bucket, +Inf last, as prometheus_client writes it.
_LE: Final[tuple[str, ...]] = (
    *(floatToGoString(bound) for bound in _BOUNDS),  # type: ignore[no-untyped-call]
    "+Inf",
)

# name, help, label names (without role, instance and upstream), type; the gauges'
# multiprocess_mode. The same as lbstack.metrics's Metrics and UpstreamMetrics.
_REQUESTS = ("lbstack_requests", "Requests answered, by status code.")
_DURATION = (
    "lbstack_request_duration_seconds",
    "Time from request received to response sent.",
)
_IN_FLIGHT = ("lbstack_in_flight_requests", "Requests being handled now.")
_DISCONNECTS = (
    "lbstack_client_disconnects",
    "Clients that went away before their answer was sent.",
)
_UP_REQUESTS = (
    "lbstack_upstream_requests",
    "Requests sent to each upstream, by status code.",
)
_UP_ERRORS = (
    "lbstack_upstream_errors",
    "Failures talking to each upstream, by kind (connect, timeout, reset, protocol).",
)
_UP_DURATION = (
    "lbstack_upstream_duration_seconds",
    "Time from request sent upstream to its response headers.",
)
_UP_IN_FLIGHT = ("lbstack_upstream_in_flight_requests", "Requests in flight to each upstream.")
_UP_HEALTHY = ("lbstack_upstream_healthy", "1 when the upstream takes traffic, 0 when it is out.")
_UP_RETRIES = (
    "lbstack_upstream_retries",
    "Requests sent again elsewhere after this upstream failed them before answering.",
)
_UP_COST = (
    "lbstack_upstream_cost",
    "Routing cost of each upstream now (p2c_ewma: latency × load / weight); lower wins.",
)
_QUEUE = (
    "lbstack_queue_length",
    "Requests waiting for a free upstream slot (every upstream at its limit).",
)
_BUDGET = ("lbstack_retry_budget", "Retries the retry budget would allow now.")
_EXHAUSTED = (
    "lbstack_retry_budget_exhausted",
    "Retries refused because the retry budget was spent.",
)
_TUNNELS_OPEN = ("lbstack_tunnels_open", "Upgraded connections (WebSocket) tunnelled now.")
_TUNNELS = (
    "lbstack_tunnels",
    "Upgrade requests by result: opened (101), rejected (the upstream answered "
    "otherwise), refused (over tunnels.max: 503).",
)
_TUNNEL_BYTES = (
    "lbstack_tunnel_bytes",
    "Bytes carried by tunnels, by direction: up (client to upstream) or down.",
)
TUNNEL_RESULTS: Final = ("opened", "rejected", "refused")


class Histogram:
    """Latencies in the buckets of ``LATENCY_BUCKETS``: ``counts[i]`` values in bucket i
    (not cumulative; ``+Inf`` last), ``sum`` their total in seconds."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        # The first bound >= seconds: a value on a bound is in that bucket (``le``).
        self.counts[bisect_left(_BOUNDS, seconds)] += 1
        self.sum += seconds


class UpstreamStats:
    """What the requests to one upstream link did. A new link, a new one: requests
    still in flight to a removed upstream never count into a newcomer of its name."""

    __slots__ = ("codes", "errors", "latency", "name", "retries")

    def __init__(self, name: str) -> None:
        self.name = name
        self.codes: dict[int, int] = {}
        # Every kind exported at 0 from the start, so "no errors" is a 0, not no data.
        self.errors: dict[str, int] = dict.fromkeys(ERROR_KINDS, 0)
        self.retries = 0
        self.latency = Histogram()

    def count(self, status: int) -> None:
        """A response of the upstream, by status code."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1

    def error(self, kind: str) -> None:
        """A failure talking to the upstream: connect, timeout, reset or protocol."""
        errors = self.errors
        errors[kind] = errors.get(kind, 0) + 1


class TierStats:
    """What the component's own requests did."""

    __slots__ = (
        "budget_exhausted",
        "client_disconnects",
        "codes",
        "latency",
        "tunnel_bytes",
        "tunnels",
        "tunnels_open",
    )

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.latency = Histogram()
        self.client_disconnects = 0
        self.budget_exhausted = 0
        self.tunnels_open = 0
        self.tunnels: dict[str, int] = dict.fromkeys(TUNNEL_RESULTS, 0)
        self.tunnel_bytes: dict[str, int] = {"up": 0, "down": 0}

    def count(self, status: int) -> None:
        """A response answered, by status code."""
        codes = self.codes
        codes[status] = codes.get(status, 0) + 1


# One current upstream as the collector reads it: its stats, requests in flight to it,
# whether it is in (healthy, not ejected, not draining) and its routing cost.
UpstreamReading = tuple[UpstreamStats, int, bool, float]


class ForwardingCollector(SampledCollector):
    """The forwarding series of one component, read from its stats at scrape time.

    ``upstreams`` gives the current upstreams only; ``in_flight``, ``queue_length`` and
    ``budget`` the component's requests being handled, waiting for a slot, and the
    retries its budget allows. Register it into the component's registry (both modes).
    """

    def __init__(
        self,
        role: str,
        instance: str,
        tier: TierStats,
        upstreams: Callable[[], Iterable[UpstreamReading]],
        in_flight: Callable[[], int],
        queue_length: Callable[[], int],
        budget: Callable[[], float],
    ) -> None:
        self.role = role
        self.instance = instance
        self.tier = tier
        self._base = [role, instance]
        self._upstreams = upstreams
        self._in_flight = in_flight
        self._queue_length = queue_length
        self._budget = budget
        # Multiprocess mode: what of each stats object is in the files already.
        self._written_tier = _Written()
        self._written: dict[UpstreamStats, _Written] = {}

    def describe(self) -> Iterable[Metric]:
        """The families, without samples: what the registry checks names against."""
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        tier, base = self.tier, self._base
        readings = list(self._upstreams())
        out = _Families()
        for code, number in tier.codes.copy().items():
            out.requests.add_metric([*base, str(code)], float(number))
        out.duration.add_metric(base, *_cumulative(tier.latency))
        out.in_flight.add_metric(base, float(self._in_flight()))
        out.disconnects.add_metric(base, float(tier.client_disconnects))
        for stats, requests_in_flight, healthy, cost in readings:
            labels = [*base, stats.name]
            for code, number in stats.codes.copy().items():
                out.up_requests.add_metric([*labels, str(code)], float(number))
            for kind, number in stats.errors.copy().items():
                out.up_errors.add_metric([*labels, kind], float(number))
            out.up_duration.add_metric(labels, *_cumulative(stats.latency))
            out.up_in_flight.add_metric(labels, float(requests_in_flight))
            out.up_healthy.add_metric(labels, 1.0 if healthy else 0.0)
            out.up_retries.add_metric(labels, float(stats.retries))
            out.up_cost.add_metric(labels, float(cost))
        out.queue.add_metric(base, float(self._queue_length()))
        out.budget.add_metric(base, float(self._budget()))
        out.exhausted.add_metric(base, float(tier.budget_exhausted))
        out.tunnels_open.add_metric(base, float(tier.tunnels_open))
        for result, number in tier.tunnels.copy().items():
            out.tunnels.add_metric([*base, result], float(number))
        for direction, number in tier.tunnel_bytes.copy().items():
            out.tunnel_bytes.add_metric([*base, direction], float(number))
        return iter(out.all())

    def sample(self) -> None:
        """Write what the stats grew by since the last sample, and the gauges, to
        prometheus_client's file-backed series (multiprocess mode)."""
        files = _FileSeries.of(self.role, self.instance)
        tier, done, base = self.tier, self._written_tier, tuple(self._base)
        _add_codes(files.requests, base, tier.codes, done.codes)
        done.latency = _add_latency(files.duration.labels(*base), tier.latency, done.latency)
        files.in_flight.labels(*base).set(self._in_flight())
        done.count = _add(files.disconnects.labels(*base), tier.client_disconnects, done.count)
        done.other = _add(files.exhausted.labels(*base), tier.budget_exhausted, done.other)
        files.queue.labels(*base).set(self._queue_length())
        files.budget.labels(*base).set(self._budget())
        files.tunnels_open.labels(*base).set(tier.tunnels_open)
        _add_codes(files.tunnels, base, tier.tunnels, done.tunnels)
        _add_codes(files.tunnel_bytes, base, tier.tunnel_bytes, done.tunnel_bytes)

        readings = list(self._upstreams())
        current = {stats for stats, *_ in readings}
        for stats in [stats for stats in self._written if stats not in current]:
            # Gone: its last growth, then its gauges at 0 (its file entries stay).
            labels = (*base, stats.name)
            files.add_upstream(labels, stats, self._written.pop(stats))
            files.remove_upstream(labels, stats)
        for stats, requests_in_flight, healthy, cost in readings:
            labels = (*base, stats.name)
            written = self._written.get(stats)
            if written is None:
                written = self._written[stats] = _Written()
            files.add_upstream(labels, stats, written)
            files.up_in_flight.labels(*labels).set(requests_in_flight)
            files.up_healthy.labels(*labels).set(1.0 if healthy else 0.0)
            files.up_cost.labels(*labels).set(cost)


class _Families:
    """The families of the collector, empty, in the order prometheus_client's objects
    of ``lbstack.metrics`` are registered."""

    def __init__(self) -> None:
        code, kind = (*UPSTREAM, "code"), (*UPSTREAM, "kind")
        self.requests = CounterMetricFamily(*_REQUESTS, labels=(*BASE, "code"))
        self.duration = HistogramMetricFamily(*_DURATION, labels=BASE)
        self.in_flight = GaugeMetricFamily(*_IN_FLIGHT, labels=BASE)
        self.disconnects = CounterMetricFamily(*_DISCONNECTS, labels=BASE)
        self.up_requests = CounterMetricFamily(*_UP_REQUESTS, labels=code)
        self.up_errors = CounterMetricFamily(*_UP_ERRORS, labels=kind)
        self.up_duration = HistogramMetricFamily(*_UP_DURATION, labels=UPSTREAM)
        self.up_in_flight = GaugeMetricFamily(*_UP_IN_FLIGHT, labels=UPSTREAM)
        self.up_healthy = GaugeMetricFamily(*_UP_HEALTHY, labels=UPSTREAM)
        self.up_retries = CounterMetricFamily(*_UP_RETRIES, labels=UPSTREAM)
        self.up_cost = GaugeMetricFamily(*_UP_COST, labels=UPSTREAM)
        self.queue = GaugeMetricFamily(*_QUEUE, labels=BASE)
        self.budget = GaugeMetricFamily(*_BUDGET, labels=BASE)
        self.exhausted = CounterMetricFamily(*_EXHAUSTED, labels=BASE)
        self.tunnels_open = GaugeMetricFamily(*_TUNNELS_OPEN, labels=BASE)
        self.tunnels = CounterMetricFamily(*_TUNNELS, labels=(*BASE, "result"))
        self.tunnel_bytes = CounterMetricFamily(*_TUNNEL_BYTES, labels=(*BASE, "direction"))

    def all(self) -> list[Metric]:
        return [
            self.requests,
            self.duration,
            self.in_flight,
            self.disconnects,
            self.up_requests,
            self.up_errors,
            self.up_duration,
            self.up_in_flight,
            self.up_healthy,
            self.up_retries,
            self.up_cost,
            self.queue,
            self.budget,
            self.exhausted,
            self.tunnels_open,
            self.tunnels,
            self.tunnel_bytes,
        ]


def _cumulative(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    """The ``le`` buckets, cumulative, and the sum of ``histogram``."""
    total = histogram.sum
    buckets, running = [], 0
    for le, number in zip(_LE, histogram.counts.copy(), strict=True):
        running += number
        buckets.append((le, float(running)))
    return buckets, total


# Multiprocess mode ------------------------------------------------------------------


class _Written:
    """What of one stats object is in the files already."""

    __slots__ = ("codes", "count", "errors", "latency", "other", "tunnel_bytes", "tunnels")

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.errors: dict[str, int] = {}
        self.tunnels: dict[str, int] = {}
        self.tunnel_bytes: dict[str, int] = {}
        self.count = 0  # client disconnects, or an upstream's retries
        self.other = 0  # retry budget exhausted
        self.latency: tuple[list[int], float] = ([0] * len(_LE), 0.0)


class _FileSeries:
    """prometheus_client's series of one component's forwarding figures (file-backed in
    multiprocess mode). One per role and instance in a process: two value objects of
    one series would each write their own total to its file entry."""

    _instances: dict[tuple[str, str], _FileSeries] = {}

    @classmethod
    def of(cls, role: str, instance: str) -> _FileSeries:
        series = cls._instances.get((role, instance))
        if series is None:
            series = cls._instances[role, instance] = cls()
        return series

    def __init__(self) -> None:
        counter, gauge, histogram = (
            prometheus_client.Counter,
            prometheus_client.Gauge,
            prometheus_client.Histogram,
        )
        code, kind = (*UPSTREAM, "code"), (*UPSTREAM, "kind")
        buckets = LATENCY_BUCKETS
        self.requests = counter(*_REQUESTS, (*BASE, "code"), registry=None)
        self.duration = histogram(*_DURATION, BASE, registry=None, buckets=buckets)
        self.in_flight = gauge(*_IN_FLIGHT, BASE, registry=None, multiprocess_mode="livesum")
        self.disconnects = counter(*_DISCONNECTS, BASE, registry=None)
        self.up_requests = counter(*_UP_REQUESTS, code, registry=None)
        self.up_errors = counter(*_UP_ERRORS, kind, registry=None)
        self.up_duration = histogram(*_UP_DURATION, UPSTREAM, registry=None, buckets=buckets)
        self.up_in_flight = gauge(
            *_UP_IN_FLIGHT, UPSTREAM, registry=None, multiprocess_mode="livesum"
        )
        self.up_healthy = gauge(*_UP_HEALTHY, UPSTREAM, registry=None, multiprocess_mode="livemin")
        self.up_retries = counter(*_UP_RETRIES, UPSTREAM, registry=None)
        self.up_cost = gauge(*_UP_COST, UPSTREAM, registry=None, multiprocess_mode="livemax")
        self.queue = gauge(*_QUEUE, BASE, registry=None, multiprocess_mode="livesum")
        self.budget = gauge(*_BUDGET, BASE, registry=None, multiprocess_mode="livesum")
        self.exhausted = counter(*_EXHAUSTED, BASE, registry=None)
        self.tunnels_open = gauge(*_TUNNELS_OPEN, BASE, registry=None, multiprocess_mode="livesum")
        self.tunnels = counter(*_TUNNELS, (*BASE, "result"), registry=None)
        self.tunnel_bytes = counter(*_TUNNEL_BYTES, (*BASE, "direction"), registry=None)

    def add_upstream(self, labels: tuple[str, ...], stats: UpstreamStats, done: _Written) -> None:
        _add_codes(self.up_requests, labels, stats.codes, done.codes)
        _add_codes(self.up_errors, labels, stats.errors, done.errors)
        done.latency = _add_latency(self.up_duration.labels(*labels), stats.latency, done.latency)
        done.count = _add(self.up_retries.labels(*labels), stats.retries, done.count)

    def remove_upstream(self, labels: tuple[str, ...], stats: UpstreamStats) -> None:
        for gauge in (self.up_in_flight, self.up_healthy, self.up_cost):
            gauge.labels(*labels).set(0.0)
        families: list[tuple[MetricWrapperBase, tuple[str, ...]]] = [
            (self.up_requests, (*labels, str(code))) for code in stats.codes
        ]
        families += [(self.up_errors, (*labels, kind)) for kind in stats.errors]
        families += [
            (family, labels)
            for family in (
                self.up_duration,
                self.up_retries,
                self.up_in_flight,
                self.up_healthy,
                self.up_cost,
            )
        ]
        # prometheus_client warns that multiprocess mode keeps a removed series in
        # its files; that is known (lbstack.metrics), and the children go all the same.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            for family, values in families:
                family.remove(*values)


def _add(child: prometheus_client.Counter, now: int, written: int) -> int:
    if now > written:
        child.inc(now - written)
    return now


def _add_codes(
    family: prometheus_client.Counter,
    labels: tuple[str, ...],
    now: dict[Any, int],
    written: dict[Any, int],
) -> None:
    for key, number in now.copy().items():
        before = written.get(key)
        if before is None or number > before:
            family.labels(*labels, str(key)).inc(number - (before or 0))
            written[key] = number


def _add_latency(
    child: prometheus_client.Histogram,
    latency: Histogram,
    written: tuple[list[int], float],
) -> tuple[list[int], float]:
    counts, total = latency.counts.copy(), latency.sum
    before, before_total = written
    if counts != before:
        grown = [now - then for now, then in zip(counts, before, strict=True)]
        add_observations(child, grown, total - before_total)
    return counts, total


def add_observations(
    child: prometheus_client.Histogram, counts: Sequence[int], total: float
) -> None:
    """Add to a labelled histogram child what observing ``counts[i]`` values in its
    bucket i (not cumulative, ``+Inf`` last) would, their sum being ``total``.

    prometheus_client has no public way; this uses its internals, as
    ``prometheus_client.Histogram.observe`` does (0.26): ``child._buckets``, one value
    per bound of ``child._upper_bounds`` (not cumulative), and ``child._sum``, each
    with ``inc(amount)``. ``test_add_observations_internals`` fails if they change.
    """
    buckets = child._buckets
    if len(buckets) != len(counts):
        raise ValueError(f"expected {len(buckets)} bucket counts, found {len(counts)}")
    for value, number in zip(buckets, counts, strict=True):
        if number:
            value.inc(number)
    child._sum.inc(total)
