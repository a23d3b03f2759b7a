"""Per-request stats and the collector that exports them: the same series as the
prometheus_client objects of ``lbstack.metrics``, in one process and in multiprocess mode."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client import Histogram as PromHistogram
from prometheus_client.parser import text_string_to_metric_families

from lbstack.forwarding import stats as stats_module
from lbstack.forwarding.stats import (
    ERROR_KINDS,
    ForwardingCollector,
    Histogram,
    TierStats,
    UpstreamReading,
    UpstreamStats,
    _FileSeries,
    add_observations,
)
from lbstack.metrics import (
    LATENCY_BUCKETS,
    ComponentMetrics,
    Metrics,
    RouterMetrics,
    UpstreamMetrics,
    sample_functions,
)

ROLE = "proxy"
ROOT = Path(__file__).resolve().parent.parent
# Latencies on and around every bound, and beyond the last.
EDGES = [
    *LATENCY_BUCKETS,
    *(math.nextafter(bound, math.inf) for bound in LATENCY_BUCKETS),
    *(math.nextafter(bound, 0.0) for bound in LATENCY_BUCKETS),
    0.0,
    1e-9,
    31.0,
    1e6,
]


@dataclass
class Gauges:
    """What the gauges read now: the component's, and each upstream's."""

    in_flight: int = 0
    queue: int = 0
    budget: float = 10.0
    upstreams: dict[str, tuple[int, bool, float]] = field(default_factory=dict)

    def upstream(self, name: str) -> tuple[int, bool, float]:
        return self.upstreams.get(name, (0, True, 0.0))


class Side(Protocol):
    """One way of keeping the figures: prometheus_client's objects, or the stats."""

    registry: CollectorRegistry

    def tier(self, status: int, seconds: float) -> None: ...
    def disconnect(self) -> None: ...
    def exhausted(self) -> None: ...
    def add(self, name: str) -> None: ...
    def remove(self, name: str) -> None: ...
    def request(self, name: str, status: int, seconds: float) -> None: ...
    def error(self, name: str, kind: str) -> None: ...
    def retry(self, name: str) -> None: ...


class OldSide:
    """Metrics and UpstreamMetrics, used as the old forwarder (lbstack.forwarding) did."""

    def __init__(self, instance: str, gauges: Gauges) -> None:
        self.gauges = gauges
        self.metrics = Metrics(ROLE, instance)
        self.registry = self.metrics.registry
        self.upstream = upstream = UpstreamMetrics(self.metrics)
        self.metrics.in_flight.set_function(lambda: gauges.in_flight)
        upstream.queue_length.set_function(lambda: gauges.queue)
        upstream.budget.set_function(lambda: gauges.budget)
        self.codes: dict[str, set[int]] = {}

    def tier(self, status: int, seconds: float) -> None:
        self.metrics.count(status)
        self.metrics.latency.observe(seconds)

    def disconnect(self) -> None:
        self.metrics.client_disconnects.inc()

    def exhausted(self) -> None:
        self.upstream.budget_exhausted.inc()

    def add(self, name: str) -> None:
        metrics, gauges = self.upstream, self.gauges
        labels = metrics.labels(name)
        for kind in ERROR_KINDS:
            metrics.errors.labels(*labels, kind)
        metrics.latency.labels(*labels)
        metrics.retries.labels(*labels)
        metrics.in_flight.labels(*labels).set_function(lambda: gauges.upstream(name)[0])
        metrics.healthy.labels(*labels).set_function(
            lambda: 1.0 if gauges.upstream(name)[1] else 0.0
        )
        metrics.cost.labels(*labels).set_function(lambda: gauges.upstream(name)[2])
        self.codes[name] = set()

    def remove(self, name: str) -> None:
        metrics = self.upstream
        labels = metrics.labels(name)
        for code in self.codes.pop(name):
            metrics.requests.remove(*labels, str(code))
        for kind in ERROR_KINDS:
            metrics.errors.remove(*labels, kind)
        for series in (
            metrics.latency,
            metrics.retries,
            metrics.in_flight,
            metrics.healthy,
            metrics.cost,
        ):
            series.remove(*labels)

    def request(self, name: str, status: int, seconds: float) -> None:
        metrics = self.upstream
        metrics.requests.labels(*metrics.labels(name), str(status)).inc()
        metrics.latency.labels(*metrics.labels(name)).observe(seconds)
        self.codes[name].add(status)

    def error(self, name: str, kind: str) -> None:
        self.upstream.errors.labels(*self.upstream.labels(name), kind).inc()

    def retry(self, name: str) -> None:
        self.upstream.retries.labels(*self.upstream.labels(name)).inc()


class NewSide:
    """ComponentMetrics, RouterMetrics and the stats with their collector."""

    def __init__(self, instance: str, gauges: Gauges) -> None:
        self.gauges = gauges
        self.metrics = ComponentMetrics(ROLE, instance)
        self.registry = self.metrics.registry
        self.router = RouterMetrics(self.metrics)
        self.stats = TierStats()
        self.links: dict[str, UpstreamStats] = {}
        self.collector = ForwardingCollector(
            ROLE,
            instance,
            self.stats,
            self.readings,
            lambda: gauges.in_flight,
            lambda: gauges.queue,
            lambda: gauges.budget,
        )
        self.registry.register(self.collector)

    def readings(self) -> Iterator[UpstreamReading]:
        for name, stats in self.links.items():
            yield (stats, *self.gauges.upstream(name))

    def tier(self, status: int, seconds: float) -> None:
        self.stats.count(status)
        self.stats.latency.observe(seconds)

    def disconnect(self) -> None:
        self.stats.client_disconnects += 1

    def exhausted(self) -> None:
        self.stats.budget_exhausted += 1

    def add(self, name: str) -> None:
        self.links[name] = UpstreamStats(name)

    def remove(self, name: str) -> None:
        del self.links[name]

    def request(self, name: str, status: int, seconds: float) -> None:
        self.links[name].count(status)
        self.links[name].latency.observe(seconds)

    def error(self, name: str, kind: str) -> None:
        self.links[name].error(kind)

    def retry(self, name: str) -> None:
        self.links[name].retries += 1


def traffic(side: Side, gauges: Gauges, names: list[str], seed: int) -> None:
    """A deterministic mix of everything a forwarder counts."""
    rng = random.Random(seed)
    for _ in range(300):
        seconds = rng.choice([*EDGES, rng.expovariate(50.0)])
        status = rng.choice([200, 200, 200, 404, 502, 503])
        side.tier(status, seconds)
        name = rng.choice(names)
        side.request(name, status, seconds * 0.9)
        if rng.random() < 0.1:
            side.error(name, rng.choice(ERROR_KINDS))
        if rng.random() < 0.05:
            side.retry(name)
        if rng.random() < 0.03:
            side.disconnect()
        if rng.random() < 0.02:
            side.exhausted()
    gauges.in_flight = rng.randrange(20)
    gauges.queue = rng.randrange(5)
    gauges.budget = rng.uniform(-2.0, 30.0)
    for name in names:
        gauges.upstreams[name] = (rng.randrange(9), rng.random() < 0.7, rng.uniform(0, 3))


def scenario(side: Side, gauges: Gauges) -> None:
    """Upstreams come and go; one comes back under its old name."""
    for name in ("a", "b", "c"):
        side.add(name)
    traffic(side, gauges, ["a", "b", "c"], seed=1)
    generate_latest(side.registry)
    traffic(side, gauges, ["a", "b"], seed=2)
    side.remove("c")
    side.remove("b")
    side.add("b")
    side.add("d")
    traffic(side, gauges, ["a", "b", "d"], seed=3)


Family = tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]


# The process's own series, and the tunnels' (newer than the old classes compared with).
NOT_COMPARED = ("lbstack_process_", "lbstack_tunnel")


def families(registry: CollectorRegistry) -> dict[str, Family]:
    """Every family but the process's: type, help, samples (sorted)."""
    return {
        family.name: (
            family.type,
            family.documentation,
            sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples),
        )
        for family in registry.collect()
        if not family.name.startswith(NOT_COMPARED)
    }


def exposition(text: str) -> dict[str, list[str]]:
    """The text exposition family by family (HELP, TYPE, then sample lines sorted)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            current = blocks[line.split()[2]] = []
        current.append(line)
    return {
        name: [*lines[:2], *sorted(lines[2:])]
        for name, lines in blocks.items()
        if not name.startswith(NOT_COMPARED)
    }


def both(instance: str) -> tuple[OldSide, NewSide]:
    old_gauges, new_gauges = Gauges(), Gauges()
    old, new = OldSide(instance, old_gauges), NewSide(instance, new_gauges)
    scenario(old, old_gauges)
    scenario(new, new_gauges)
    return old, new


def test_same_families_as_prometheus_client_objects() -> None:
    old, new = both("proxy-0")
    expected, found = families(old.registry), families(new.registry)
    assert sorted(found) == sorted(expected)
    assert found == expected


def test_same_exposition_text() -> None:
    old, new = both("proxy-0")
    expected = exposition(generate_latest(old.registry).decode())
    assert exposition(generate_latest(new.registry).decode()) == expected
    assert "lbstack_upstream_requests_total" in expected
    assert "lbstack_request_duration_seconds" in expected


def test_values_as_counted() -> None:
    gauges = Gauges(in_flight=3, queue=1, budget=2.5, upstreams={"a": (4, False, 1.5)})
    side = NewSide("proxy-1", gauges)
    side.add("a")
    side.tier(200, 0.001)
    side.tier(200, 0.003)
    side.request("a", 502, 0.002)
    side.error("a", "reset")
    side.retry("a")
    side.exhausted()
    registry = side.registry
    base = {"role": ROLE, "instance": "proxy-1"}
    up = {**base, "upstream": "a"}

    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("lbstack_requests_total", **base, code="200") == 2.0
    assert value("lbstack_request_duration_seconds_bucket", **base, le="0.001") == 1.0
    assert value("lbstack_request_duration_seconds_bucket", **base, le="0.0025") == 1.0
    assert value("lbstack_request_duration_seconds_bucket", **base, le="0.005") == 2.0
    assert value("lbstack_request_duration_seconds_bucket", **base, le="+Inf") == 2.0
    assert value("lbstack_request_duration_seconds_count", **base) == 2.0
    assert value("lbstack_request_duration_seconds_sum", **base) == pytest.approx(0.004)
    assert value("lbstack_in_flight_requests", **base) == 3.0
    assert value("lbstack_queue_length", **base) == 1.0
    assert value("lbstack_retry_budget", **base) == 2.5
    assert value("lbstack_retry_budget_exhausted_total", **base) == 1.0
    assert value("lbstack_client_disconnects_total", **base) == 0.0
    assert value("lbstack_upstream_requests_total", **up, code="502") == 1.0
    assert value("lbstack_upstream_errors_total", **up, kind="reset") == 1.0
    assert value("lbstack_upstream_retries_total", **up) == 1.0
    assert value("lbstack_upstream_in_flight_requests", **up) == 4.0
    assert value("lbstack_upstream_healthy", **up) == 0.0
    assert value("lbstack_upstream_cost", **up) == 1.5


@pytest.mark.parametrize("seconds", EDGES)
def test_bucket_edges_as_prometheus(seconds: float) -> None:
    """A value on a bound is in that bound's bucket (``le``), as prometheus_client has it."""
    ours = Histogram()
    ours.observe(seconds)
    theirs = PromHistogram("h", "h", registry=None, buckets=LATENCY_BUCKETS)
    theirs.observe(seconds)
    assert ours.counts == [int(value.get()) for value in theirs._buckets]
    assert ours.sum == seconds


def test_value_on_a_bound_is_in_its_bucket() -> None:
    for index, bound in enumerate(LATENCY_BUCKETS):
        histogram = Histogram()
        histogram.observe(bound)
        histogram.observe(math.nextafter(bound, math.inf))
        assert histogram.counts[index] == 1
        assert histogram.counts[index + 1] == 1
    histogram = Histogram()
    histogram.observe(1e9)
    assert histogram.counts[-1] == 1
    assert len(histogram.counts) == len(LATENCY_BUCKETS) + 1


def test_removed_upstream_series_disappear() -> None:
    gauges = Gauges()
    side = NewSide("proxy-2", gauges)
    side.add("a")
    side.add("b")
    side.request("b", 200, 0.01)
    side.error("b", "timeout")

    def upstreams() -> set[str]:
        return {
            sample.labels["upstream"]
            for family in side.registry.collect()
            for sample in family.samples
            if "upstream" in sample.labels
        }

    assert upstreams() == {"a", "b"}
    side.remove("b")
    assert upstreams() == {"a"}
    side.add("b")  # back under the same name: counts from 0
    found = families(side.registry)
    requests = found["lbstack_upstream_requests"][2]
    assert [s for s in requests if ("upstream", "b") in s[1]] == []
    errors = [s for s in found["lbstack_upstream_errors"][2] if ("upstream", "b") in s[1]]
    assert [value for *_, value in errors] == [0.0] * len(ERROR_KINDS)


def test_error_kinds_at_zero_from_the_start() -> None:
    side = NewSide("proxy-3", Gauges())
    side.add("a")
    registry = side.registry
    for kind in ERROR_KINDS:
        labels = {"role": ROLE, "instance": "proxy-3", "upstream": "a", "kind": kind}
        assert registry.get_sample_value("lbstack_upstream_errors_total", labels) == 0.0
    assert UpstreamStats("a").errors == dict.fromkeys(ERROR_KINDS, 0)


def test_error_kinds_are_the_old_forwarders() -> None:
    import lbstack.forwarding  # noqa: PLC0415 - only while the old forwarder exists

    assert getattr(lbstack.forwarding, "ERROR_KINDS", ERROR_KINDS) == ERROR_KINDS


def test_restricted_registry_filters_by_sample_name() -> None:
    """What a router's scrape of our /metrics asks for (``name[]=...``)."""
    gauges = Gauges(upstreams={"a": (2, True, 0.5)})
    side = NewSide("proxy-4", gauges)
    side.add("a")
    restricted = side.registry.restricted_registry(["lbstack_upstream_in_flight_requests"])
    samples = [s for family in restricted.collect() for s in family.samples]
    assert [(s.name, s.labels["upstream"], s.value) for s in samples] == [
        ("lbstack_upstream_in_flight_requests", "a", 2.0)
    ]


def test_conflicts_with_metrics_request_series() -> None:
    """A router's registry is a ComponentMetrics': Metrics has the tier series already."""
    metrics = Metrics(ROLE, "proxy-5")
    collector = ForwardingCollector(
        ROLE, "proxy-5", TierStats(), lambda: (), lambda: 0, lambda: 0, lambda: 0.0
    )
    with pytest.raises(ValueError, match="lbstack_requests"):
        metrics.registry.register(collector)


def test_sample_writes_what_collect_yields() -> None:
    """The multiprocess path without files: samples of the stats, fed as growth to
    prometheus_client's objects, give what the collector yields at the same moment."""
    instance = "proxy-sampled"
    gauges = Gauges()
    side = NewSide(instance, gauges)
    series = _FileSeries.of(ROLE, instance)
    mirror = CollectorRegistry(auto_describe=True)
    for name, value in vars(series).items():
        if name != "_instances":
            mirror.register(value)
    for name in ("a", "b", "c"):
        side.add(name)
    traffic(side, gauges, ["a", "b", "c"], seed=1)
    side.collector.sample()
    assert families(mirror) == families_of_collector(side)
    traffic(side, gauges, ["a", "b"], seed=2)
    side.collector.sample()
    side.collector.sample()  # nothing grew: nothing added
    assert families(mirror) == families_of_collector(side)
    side.remove("c")
    side.remove("b")
    side.add("b")
    traffic(side, gauges, ["a", "b"], seed=3)
    side.collector.sample()
    found, expected = families(mirror), families_of_collector(side)
    # The growth of each sum comes in pieces: equal to rounding.
    assert found.keys() == expected.keys()
    for name, (kind, documentation, samples) in expected.items():
        assert found[name][:2] == (kind, documentation)
        assert [s[:2] for s in found[name][2]] == [s[:2] for s in samples]
        for (*_, got), (*_, want) in zip(found[name][2], samples, strict=True):
            assert math.isclose(got, want, rel_tol=1e-12), name


def families_of_collector(side: NewSide) -> dict[str, Family]:
    registry = CollectorRegistry()
    registry.register(side.collector)
    return families(registry)


def test_add_observations_internals() -> None:
    """The prometheus_client internals ``add_observations`` relies on are still there."""
    observed = PromHistogram("h", "h", ["x"], registry=None, buckets=LATENCY_BUCKETS)
    added = PromHistogram("h", "h", ["x"], registry=None, buckets=LATENCY_BUCKETS)
    ours = Histogram()
    for seconds in EDGES:
        observed.labels("1").observe(seconds)
        ours.observe(seconds)
    child = added.labels("1")
    assert child._upper_bounds == [*LATENCY_BUCKETS, math.inf]
    assert len(child._buckets) == len(ours.counts)
    add_observations(child, ours.counts, ours.sum)
    assert [v.get() for v in child._buckets] == [v.get() for v in observed.labels("1")._buckets]
    assert child._sum.get() == pytest.approx(observed.labels("1")._sum.get())
    with pytest.raises(ValueError, match="bucket counts"):
        add_observations(child, [1, 2], 0.0)


def test_hot_path_touches_no_prometheus_client() -> None:
    """Structural: counting and observing call our own three methods, ``dict.get`` and
    ``bisect_left``; nothing else, no prometheus_client code, no lock."""
    tier, upstream = TierStats(), UpstreamStats("a")
    calls: set[str] = set()

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call":
            calls.add(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")
        elif event == "c_call":
            calls.add(f"builtin:{arg.__qualname__}")

    sys.setprofile(profile)
    try:
        upstream.count(200)
        upstream.latency.observe(0.003)
        upstream.error("reset")
        upstream.retries += 1
        tier.count(502)
        tier.latency.observe(0.0005)
        tier.client_disconnects += 1
    finally:
        sys.setprofile(None)
    ours = stats_module.__file__
    assert calls - {"builtin:setprofile"} == {
        f"{ours}:count",
        f"{ours}:observe",
        f"{ours}:error",
        "builtin:dict.get",
        "builtin:bisect_left",
    }
    for stats in (tier, upstream, upstream.latency):
        assert not hasattr(stats, "__dict__")


def test_collected_not_sampled_outside_multiprocess_mode() -> None:
    """Outside multiprocess mode the registry collects it, and nothing samples it."""
    side = NewSide("proxy-6", Gauges())
    sample_functions()
    assert side.collector in side.registry._collector_to_names
    assert ("proxy", "proxy-6") not in _FileSeries._instances


# Multiprocess mode: workers in subprocesses, PROMETHEUS_MULTIPROC_DIR set at start.


def run_worker(kind: str, worker: int) -> str:
    """One gunicorn worker's share of the scenario (in a subprocess); the last answers
    /metrics, the sum over every worker's files."""
    gauges = Gauges()
    side: Side = OldSide("proxy-mp", gauges) if kind == "old" else NewSide("proxy-mp", gauges)
    if worker == 1:
        scenario(side, gauges)
        # A worker on its way out samples once more (as a sampler's last round does).
        sample_functions()
        return ""
    side.add("a")
    side.add("d")
    traffic(side, gauges, ["a", "d"], seed=4)
    return generate_latest(side.registry).decode()


def run_tier(kind: str, directory: Path) -> str:
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    output = ""
    for worker in (1, 2):
        script = (
            "import sys\n"
            "from tests.test_forwarding_stats import run_worker\n"
            f"sys.stdout.write(run_worker({kind!r}, {worker}))\n"
        )
        done = subprocess.run(
            [sys.executable, "-W", "error", "-c", script],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        output = done.stdout
    return output


def test_multiprocess_same_totals(tmp_path: Path) -> None:
    old = run_tier("old", tmp_path / "old")
    new = run_tier("new", tmp_path / "new")
    expected, found = parsed(old), parsed(new)
    assert "lbstack_upstream_duration_seconds" in expected
    assert found.keys() == expected.keys()
    for name, (kind, samples) in expected.items():
        assert found[name][0] == kind, name
        assert found[name][1].keys() == samples.keys(), name
        for key, value in samples.items():
            assert math.isclose(found[name][1][key], value, rel_tol=1e-12), (name, key)
    removed = [key for key in found["lbstack_upstream_requests"][1] if ("upstream", "c") in key[1]]
    assert removed, "a removed upstream's counts stay in the files"


def parsed(
    text: str,
) -> dict[str, tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    return {
        family.name: (
            family.type,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples},
        )
        for family in text_string_to_metric_families(text)
        if not family.name.startswith(NOT_COMPARED)
    }
