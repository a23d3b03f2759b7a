"""The live status view: readings, rates, quantiles and the tree it renders."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from lbstack import statusview
from lbstack.metrics import Metrics, histogram_quantile
from lbstack.statusview import Load, Reading, load_between, render


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = {0.1: 50.0, 0.2: 90.0, 0.5: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.2)
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.47)
    assert histogram_quantile(0.99, {}) is None
    assert histogram_quantile(0.99, {1.0: 0.0, math.inf: 0.0}) is None
    # Everything beyond the last finite bucket: its bound is the best answer.
    assert histogram_quantile(0.99, {0.1: 0.0, math.inf: 10.0}) == pytest.approx(0.1)


def test_a_reading_from_real_metrics_and_the_load_between_two() -> None:
    metrics = Metrics("proxy", "proxy-0")
    before = Reading.parse(generate_latest(metrics.registry).decode(), at=10.0)
    for _ in range(98):
        metrics.count(200)
        metrics.latency.observe(0.004)
    for _ in range(2):
        metrics.count(502)
        metrics.latency.observe(0.4)
    metrics.in_flight.set(3)
    after = Reading.parse(generate_latest(metrics.registry).decode(), at=12.0)
    load = load_between(before, after)
    assert load.rps == pytest.approx(50.0)
    assert load.error_ratio == pytest.approx(0.02)
    assert load.in_flight == 3
    assert load.p99 is not None and 0.25 < load.p99 <= 0.5


def _status() -> dict[str, Any]:
    def component(name: str, role: str, group: str | None = None) -> dict[str, Any]:
        return {
            "name": name,
            "role": role,
            "group": group,
            "pid": 1,
            "state": "ready",
            "restarts": 0,
            "admin": f"unix:/r/{name}.admin.sock",
        }

    return {
        "run_dir": "/r",
        "components": [
            component("supervisor", "supervisor"),
            *(component(f"server-0-{s}", "server", "proxy-0") for s in range(2)),
            component("proxy-0", "proxy", "proxy-0"),
            component("proxy-1", "proxy", "proxy-1"),
            component("balancer-0", "balancer"),
        ],
    }


def test_the_tree_shows_every_component_with_its_load_and_share() -> None:
    loads = {
        "balancer-0": Load(100.0, 0.0, 0.004, 2),
        "proxy-0": Load(75.0, 0.0, 0.003, 1),
        "proxy-1": Load(25.0, 0.1, None, 0),
        "server-0-0": Load(60.0, 0.0, 0.001, 1),
        "server-0-1": Load(15.0, 0.0, 0.002, 0),
    }
    out = io.StringIO()
    Console(file=out, width=120, force_terminal=False).print(render(_status(), loads))
    lines = out.getvalue().splitlines()
    names = [line.split()[0] for line in lines[2:]]
    assert names == ["supervisor", "├─", "├─", "│", "│", "└─"]
    text = out.getvalue()
    for expected in ("balancer-0", "proxy-0", "├─ server-0-0", "└─ server-0-1", "4.0ms"):
        assert expected in text
    proxy0 = next(line for line in lines if "proxy-0" in line)
    assert proxy0.rstrip().endswith("75%")
    server00 = next(line for line in lines if "server-0-0" in line)
    assert server00.rstrip().endswith("80%")
    proxy1 = next(line for line in lines if "proxy-1" in line)
    assert "10.0" in proxy1  # error %
    assert "\x1b[" not in text  # plain text when not a terminal


def test_the_tree_shows_each_autoscaled_group_with_its_last_decision() -> None:
    status = _status()
    status["autoscale"] = {
        "proxy-0": {
            "signal": "in_flight",
            "target": 4.0,
            "tolerance": 0.1,
            "min": 1,
            "max": 6,
            "evaluations": 12,
            "problem": None,
            "current": 2,
            "observed": 6.5,
            "recommendation": 4,
            "desired": 3,
            "reason": "scale up, limited to max_step_up 1",
        },
        "proxy-1": {
            "signal": "p99",
            "target": 0.05,
            "tolerance": 0.1,
            "min": 1,
            "max": 4,
            "evaluations": 0,
            "problem": "proxy-1 did not answer",
        },
    }
    out = io.StringIO()
    Console(file=out, width=200, force_terminal=False).print(render(status, {}))
    text = out.getvalue()
    assert (
        "autoscale proxy-0: in_flight 6.5 / target 4 ±10%, min 1 max 6; 2 → 3 servers "
        "(scale up, limited to max_step_up 1); 12 evaluations" in text
    )
    assert "autoscale proxy-1: p99 ? / target 0.05" in text
    assert "problem: proxy-1 did not answer" in text


def test_the_title_says_how_long_the_supervisor_has_run_and_its_upgrades() -> None:
    status = _status()
    supervisor = status["components"][0]
    assert statusview._title(status) == "lbstack — /r"  # nothing known: nothing said
    supervisor["started_at"] = 1000.0
    assert statusview._title(status, now=1042.9) == "lbstack — /r, up 42s"
    supervisor["upgrades"] = 2
    assert statusview._title(status, now=1000.0 + 3 * 3600 + 5 * 60) == (
        "lbstack — /r, up 3h05m, upgraded 2×"
    )
    assert statusview._title(status, now=1000.0 + 2 * 86400 + 4 * 3600) == (
        "lbstack — /r, up 2d04h, upgraded 2×"
    )


def test_a_routers_view_shows_its_sources_and_the_peers_counted_once() -> None:
    status: dict[str, Any] = {
        "name": "balancer-0",
        "policy": "p2c_ewma",
        "in_flight": 0,
        "queued": 0,
        "retry_budget": 10,
        "upstreams": [],
        "peers": [
            {
                "name": "198.18.0.2:9081",
                "up": True,
                "age": 0.1,
                "in_flight": 0,
                "errors": 0,
                "same_as": "balancer-1",
            },
        ],
        "discovery": [
            {
                "source": "dns://proxies.lbstack.test:8080",
                "for": "upstreams",
                "addresses": ["tcp://198.18.0.3:8080", "tcp://198.18.0.4:8080"],
                "state": "ok",
                "ttl": 5.0,
                "last_error": None,
            },
            {
                "source": "dns+srv://_lb._tcp.b.test",
                "for": "peers",
                "addresses": ["x"],
                "state": "failed",
                "ttl": None,
                "last_error": "timed out",
            },
        ],
    }
    console = Console(width=300, record=True)
    console.print(statusview.render_router(status))
    text = " ".join(console.export_text().split())
    assert "198.18.0.2:9081 is balancer-1 (not counted twice)" in text
    assert "upstreams from dns://proxies.lbstack.test:8080: 2 addresses, ok, TTL 5s" in text
    assert (
        "peers from dns+srv://_lb._tcp.b.test: 1 addresses, failed "
        "(keeping the last good set: timed out)"
    ) in text
