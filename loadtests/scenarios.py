"""What the benchmarks run and what they aim for, as data: scenarios and targets.

A ``Scenario`` is a topology (lbstack's shape and its simulated servers; nginx and
HAProxy copy the shape over the same server processes), a load shape, the systems
compared, durations and a fault. A benchmark program runs one or a few named scenarios
(``SCENARIOS``), its command line overriding durations or sizes. ``TARGETS`` are the
figures a benchmark aims for; ``loadtests.report`` prints PASS or MISS beside them and
never asserts them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from lbstack.config import PolicyName

Tables = Mapping[str, Mapping[str, Any]]  # TOML tables: "server.simulation" -> settings

# Every benchmark stack unless said otherwise: servers answer in exactly their latency.
BENCH_SETTINGS: Tables = {
    "server.simulation": {"latency_distribution": "fixed"},
    "supervisor": {"graceful_timeout": "5s"},
}
# The proxies neither check nor scrape their servers.
QUIET: Tables = {"proxy": {"scrape_interval": 0}, "proxy.health": {"interval": 0}}
AUTOSCALE: Mapping[str, int | str] = {
    "min": 1,
    "max": 6,
    "target": 2,
    "interval": "1s",
    "window": "3s",
    "scale_down_window": "10s",
}
SLOW_START_S = 5  # lbstack's default slow start: new upstreams ramp up this long


@dataclass(frozen=True)
class Topology:
    """An lbstack stack: its shape, its simulated servers' latency and its config."""

    proxies: int = 2
    servers_per_proxy: int = 3
    latency: str = "0ms"
    policy: PolicyName | None = None  # the balancer's and the proxies'; None: the default
    settings: Tables = field(default_factory=lambda: BENCH_SETTINGS)

    def toml(self, more: Tables | None = None) -> str:
        """The stack's config file; ``more`` adds or overrides settings."""
        tables: dict[str, dict[str, Any]] = {"server.simulation": {"latency": self.latency}}
        if self.policy is not None:
            tables["balancer"] = {"policy": self.policy}
            tables["proxy"] = {"policy": self.policy}
        for extra in (self.settings, more or {}):
            for name, values in extra.items():
                tables.setdefault(name, {}).update(values)
        lines = [f"proxies = {self.proxies}", f"servers_per_proxy = {self.servers_per_proxy}"]
        for name, values in tables.items():
            lines += [f"\n[{name}]", *(f"{k} = {json.dumps(v)}" for k, v in values.items())]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Fault:
    """What is done to one simulated server while the load runs."""

    server: str = "server-0-2"
    latency: str | None = None  # it answers this late throughout
    stall_every: float | None = None  # or it hangs for stall_for s every stall_every s
    stall_for: float = 1.0


@dataclass(frozen=True)
class Wrk:
    """Closed loop by wrk: each of ``connections`` sends its next request once answered."""

    connections: tuple[int, ...] = (64,)


@dataclass(frozen=True)
class Poisson:
    """Open loop by ``loadtests.loadgen``: Poisson arrivals at each rate in turn."""

    rates: tuple[int, ...]
    connections: int = 256  # the generator's pool limit


@dataclass(frozen=True)
class Users:
    """Closed-loop users by ``loadtests.loadgen``: (users, seconds) one step after another."""

    steps: tuple[tuple[int, float], ...]
    post_bytes: int = 0  # > 0: every other request is a POST with a body this long


@dataclass(frozen=True)
class Hold:
    """Keep-alive connections opened ``at_once`` at a time, all held, each used twice."""

    connections: int = 5000
    at_once: int = 100


@dataclass(frozen=True)
class Echo:
    """WebSockets each sending messages one after the other and timing each echo."""

    sockets: int = 8
    messages: int = 500
    size: int = 128


Load = Wrk | Poisson | Users | Hold | Echo


@dataclass(frozen=True)
class Scenario:
    """One benchmark scenario: the stack, the load, the systems compared, and for how long."""

    topology: Topology
    load: Load
    systems: tuple[str, ...] = ("lbstack",)
    duration: float = 10.0  # measured seconds per run
    warmup: float = 2.0  # unmeasured seconds before
    rounds: int = 1  # alternating rounds per system
    fault: Fault | None = None
    changes: tuple[tuple[str, ...], ...] = ()  # lbstack commands run under the load


SLOW = Fault(latency="50ms")
NGINX_RR, NGINX_LC, HAPROXY_LC = "nginx round_robin", "nginx least_conn", "haproxy leastconn"
POLICIES: tuple[PolicyName, ...] = get_args(PolicyName)
ROUTING = (*(f"lbstack {p}" for p in POLICIES), NGINX_RR, NGINX_LC)

SCENARIOS: dict[str, Scenario] = {
    # python -m loadtests.bench (make bench)
    "compare": Scenario(Topology(), Wrk((1, 64)), ("lbstack", NGINX_RR), rounds=2),
    "scale 1x3": Scenario(Topology(1), Wrk(), ("lbstack", NGINX_RR), warmup=SLOW_START_S, rounds=2),
    "scale 1x64": Scenario(
        Topology(1, 64), Wrk(), ("lbstack", NGINX_RR), warmup=SLOW_START_S, rounds=2
    ),
    "scale 1x64 quiet": Scenario(
        Topology(1, 64, settings={**BENCH_SETTINGS, **QUIET}), Wrk(), warmup=SLOW_START_S, rounds=2
    ),
    "hold": Scenario(Topology(), Hold(), warmup=0.0),
    # python -m loadtests.openloop
    "openloop": Scenario(
        Topology(latency="5ms", policy="p2c_ewma"),
        Poisson((400, 900, 1200)),
        ("lbstack", NGINX_LC, HAPROXY_LC),
        fault=SLOW,
    ),
    # python -m loadtests.multihost_bench: the same, on one host and over hosts
    "multihost": Scenario(
        Topology(latency="5ms", policy="p2c_ewma"),
        Poisson((400, 900)),
        ("one host", "over hosts"),
        fault=SLOW,
    ),
    # python -m loadtests.floor: lbstack's balancer, a ClientSession forwarder, a bare server
    "floor": Scenario(Topology(1), Wrk(), ("lbstack", "aiohttp", "server"), rounds=2),
    # python -m loadtests.routing_bench
    "degraded": Scenario(Topology(latency="5ms"), Wrk(), ROUTING, duration=15.0, fault=SLOW),
    "stall": Scenario(
        Topology(latency="5ms"), Wrk(), ROUTING, duration=15.0, fault=Fault(stall_every=5.0)
    ),
    # python -m loadtests.autoscale_bench
    "autoscale": Scenario(
        Topology(1, 1, "50ms", settings={"autoscale": {"enabled": True, **AUTOSCALE}}),
        Users(((2, 10.0), (16, 30.0), (2, 30.0))),
        warmup=0.0,
    ),
    # python -m loadtests.change_bench: the reload finds the proxies' policy changed
    "changes": Scenario(
        Topology(latency="1ms", settings={"proxy": {"policy": "p2c_ewma"}}),
        Users(((4, 120.0),), post_bytes=4096),
        warmup=0.0,
        changes=(
            ("reload",),
            ("restart", "--rolling"),
            ("upgrade", "--supervisor-only"),
            ("upgrade",),
        ),
    ),
    # python -m loadtests.ws_bench
    "websocket": Scenario(Topology(), Echo(), ("balancer.sock", "server-0-0.sock"), rounds=3),
    # python -m loadtests.tls_bench
    "tls": Scenario(Topology(), Wrk(), ("lbstack", NGINX_LC), rounds=2),
}
RELOADED: Tables = {"proxy": {"policy": "least_outstanding"}}  # what "changes" reloads to


@dataclass(frozen=True)
class Target:
    """A figure a benchmark aims for: at most ``most`` or at least ``least``."""

    benchmark: str
    figure: str
    what: str
    most: float | None = None
    least: float | None = None

    def verdict(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        passed = (self.most is None or value <= self.most) and (
            self.least is None or value >= self.least
        )
        return "PASS" if passed else "MISS"

    @property
    def bound(self) -> str:
        return f"≤ {self.most:g}" if self.most is not None else f"≥ {self.least:g}"


TARGETS: tuple[Target, ...] = (
    Target("bench", "throughput_ratio", "lbstack / nginx req/s at c=64", least=0.6),
    Target("bench", "p50_ratio_c1", "lbstack / nginx p50 at c=1", most=1.5),
    Target("bench", "peak_rss_mib", "peak RSS of any lbstack process, MiB", most=60.0),
    Target("bench", "scale_cost_pct", "throughput lost with 64 servers behind a proxy, %", most=10),
    Target("bench", "hold_failed", "keep-alive connections not held through 2 GETs", most=0),
    Target("openloop", "lbstack_p99_ms_at_900", "lbstack p99 at 900 req/s, ms", most=15.0),
    Target("floor", "cpu_ratio", "lbstack's hop / ClientSession forwarder, CPU/req", most=0.5),
    Target("routing", "degraded_p2c_ewma_p99_ms", "p2c_ewma p99 with a slow server, ms", most=15),
    Target(
        "routing",
        "degraded_p2c_ewma_rps_ratio",
        "p2c_ewma / round_robin req/s with a slow server",
        least=0.9,
    ),
    Target("changes", "failed", "requests failed during planned changes", most=0),
)
