"""The live terminal view of ``lbstack status``: the topology as a tree with its load.

Each refresh reads the supervisor's status (the topology, states, restarts) and every
component's admin ``/metrics``; rates, error shares and p99 come from the difference
between two readings, like ``top``. It renders with rich, which falls back to plain
text when the output is not a terminal.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from lbstack.address import parse_address
from lbstack.client import fetch
from lbstack.metrics import histogram_quantile, parse

METRICS_TIMEOUT = 2.0


@dataclass
class Reading:
    """One component's counters at one moment."""

    at: float
    requests: float = 0.0
    errors: float = 0.0  # 5xx answers
    in_flight: float = 0.0
    tunnels: float | None = None  # routers only: tunnels open
    buckets: dict[float, float] = field(default_factory=dict)  # le -> cumulative count

    @classmethod
    def parse(cls, text: str, at: float) -> Reading:
        reading = cls(at=at)
        for name, labels, value in parse(text):
            if name == "lbstack_requests_total":
                reading.requests += value
                if labels.get("code", "").startswith("5"):
                    reading.errors += value
            elif name == "lbstack_in_flight_requests":
                reading.in_flight += value
            elif name == "lbstack_tunnels_open":
                reading.tunnels = (reading.tunnels or 0.0) + value
            elif name == "lbstack_request_duration_seconds_bucket":
                le = float(labels["le"])
                reading.buckets[le] = reading.buckets.get(le, 0.0) + value
        return reading


@dataclass
class Load:
    """What a component did between two readings."""

    rps: float
    error_ratio: float
    p99: float | None  # seconds
    in_flight: float
    tunnels: float | None = None


def load_between(before: Reading, after: Reading) -> Load:
    elapsed = max(after.at - before.at, 1e-9)
    requests = max(after.requests - before.requests, 0.0)
    errors = max(after.errors - before.errors, 0.0)
    delta = {le: after.buckets[le] - before.buckets.get(le, 0.0) for le in after.buckets}
    return Load(
        rps=requests / elapsed,
        error_ratio=errors / requests if requests else 0.0,
        p99=histogram_quantile(0.99, delta) if requests else None,
        in_flight=after.in_flight,
        tunnels=after.tunnels,
    )


async def read(components: list[dict[str, Any]]) -> dict[str, Reading]:
    """Every component's metrics now (components that do not answer are left out)."""

    async def one(component: dict[str, Any]) -> tuple[str, Reading | None]:
        if component["role"] == "supervisor" or not component.get("admin"):
            return component["name"], None
        try:
            status, body = await fetch(
                parse_address(component["admin"]), "/metrics", timeout=METRICS_TIMEOUT
            )
        except (aiohttp.ClientError, OSError, TimeoutError):
            return component["name"], None
        if status != 200:
            return component["name"], None
        return component["name"], Reading.parse(body.decode(), time.monotonic())

    pairs = await asyncio.gather(*(one(c) for c in components))
    return {name: reading for name, reading in pairs if reading is not None}


def _tree(components: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Components in tree order with their prefixes: balancers, then each proxy and
    its servers."""
    by_role: dict[str, list[dict[str, Any]]] = {}
    for component in components:
        by_role.setdefault(component["role"], []).append(component)
    rows = [("", c) for c in by_role.get("supervisor", [])]
    rows += [("├─ ", c) for c in by_role.get("balancer", [])]
    proxies = by_role.get("proxy", [])
    servers = by_role.get("server", [])
    for index, proxy in enumerate(proxies):
        last_proxy = index == len(proxies) - 1
        rows.append(("└─ " if last_proxy else "├─ ", proxy))
        group = [s for s in servers if s.get("group") == proxy["name"]]
        for position, server in enumerate(group):
            branch = "└─ " if position == len(group) - 1 else "├─ "
            rows.append((("   " if last_proxy else "│  ") + branch, server))
    return rows


def _share(
    name: str,
    role: str,
    group: str | None,
    loads: dict[str, Load],
    components: list[dict[str, Any]],
) -> float | None:
    """The component's part of its peers' traffic: servers within their group, proxies
    among proxies, balancers among balancers."""
    if name not in loads:
        return None
    same_group = role == "server"  # a proxy's group is its own: proxies share among all
    peers = [
        c["name"]
        for c in components
        if c["role"] == role and (not same_group or c.get("group") == group)
    ]
    total = sum(loads[p].rps for p in peers if p in loads)
    return loads[name].rps / total if total > 0 else None


STATE_STYLE = {
    "ready": "green",
    "failed": "bold red",
    "backoff": "yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "stopped": "dim",
}


def render(status: dict[str, Any], loads: dict[str, Load]) -> RenderableType:
    """The tree table: one row per component with its state and load; under it, each
    autoscaled group's signal and last decision."""
    components = status["components"]
    # Tunnels get a column while any router has one open (the table stays narrow else).
    tunnels = any(load.tunnels for load in loads.values())
    table = Table(title=_title(status), title_justify="left", box=None, pad_edge=False)
    for column, justify in (
        ("NAME", "left"),
        ("STATE", "left"),
        ("PID", "right"),
        ("RESTARTS", "right"),
        ("REQ/S", "right"),
        ("ERR%", "right"),
        ("P99", "right"),
        ("IN-FLIGHT", "right"),
        ("TUNNELS", "right"),
        ("SHARE", "right"),
    ):
        if column == "TUNNELS" and not tunnels:
            continue
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for prefix, component in _tree(components):
        name = component["name"]
        load = loads.get(name)
        share = _share(name, component["role"], component.get("group"), loads, components)
        state = component["state"]
        table.add_row(
            prefix + name,
            Text(state, style=STATE_STYLE.get(state, "")),
            str(component["pid"] or "-"),
            str(component["restarts"]),
            "-" if load is None else f"{load.rps:.0f}",
            "-" if load is None else f"{100 * load.error_ratio:.1f}",
            "-" if load is None or load.p99 is None else _ms(load.p99),
            "-" if load is None else f"{load.in_flight:.0f}",
            *(
                ["-" if load is None or load.tunnels is None else f"{load.tunnels:.0f}"]
                if tunnels
                else []
            ),
            "-"
            if share is None or (component["role"] == "balancer" and share == 1.0)
            else f"{100 * share:.0f}%",
        )
    autoscale = status.get("autoscale") or {}
    if not autoscale:
        return table
    lines = [autoscale_line(group, entry) for group, entry in autoscale.items()]
    return Group(table, Text("\n".join(lines), no_wrap=True, overflow="ellipsis"))


def _title(status: dict[str, Any], now: float | None = None) -> str:
    """The run dir, and how long the supervisor has run and how often it was upgraded."""
    supervisor: dict[str, Any] = next(
        (c for c in status["components"] if c["role"] == "supervisor"), {}
    )
    parts = [f"lbstack — {status['run_dir']}"]
    started = supervisor.get("started_at")
    if started is not None:
        parts.append(f"up {_duration((time.time() if now is None else now) - started)}")
    if supervisor.get("upgrades"):
        parts.append(f"upgraded {supervisor['upgrades']}×")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    """``42s``, ``7m``, ``3h05m``, ``2d04h``: the two largest units that matter."""
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m" if minutes else f"{secs}s"


def autoscale_line(group: str, entry: dict[str, Any]) -> str:
    """One autoscaled group: signal, observed against target, servers now and desired."""
    observed = entry.get("observed")
    line = (
        f"autoscale {group}: {entry['signal']} "
        f"{'?' if observed is None else f'{observed:g}'} / target {entry['target']:g} "
        f"±{100 * entry['tolerance']:.0f}%, min {entry['min']} max {entry['max']}"
    )
    if "desired" in entry:
        line += f"; {entry['current']} → {entry['desired']} servers ({entry['reason']})"
    line += f"; {entry['evaluations']} evaluations"
    if entry.get("problem"):
        line += f"; problem: {entry['problem']}"
    return line


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds < 1 else f"{seconds:.2f}s"


def render_router(status: dict[str, Any]) -> Table:
    """A balancer's or proxy's routing view: every input of its decisions, per upstream."""
    title = (
        f"{status['name']} — policy {status['policy']}, in flight {status['in_flight']}, "
        f"queued {status['queued']}, retry budget {status['retry_budget']}"
        + (
            f", tunnels {status['tunnels']['open']}/{status['tunnels']['max']}"
            if "tunnels" in status
            else ""
        )
        + (", PANIC: health ignored" if status.get("panic") else "")
    )
    peers = status.get("peers")  # a balancer with peers (the load exchange)
    table = Table(
        title=title,
        title_justify="left",
        caption=_caption(status),
        caption_justify="left",
        box=None,
        pad_edge=False,
    )
    columns: tuple[str, ...] = ("UPSTREAM", "STATE", "EJECT", "INFL")
    if peers is not None:
        columns += ("PEERS",)  # what the other balancers have in flight to it
    columns += ("REQS", "ERRS", "LAT", "COST", "REPORTED")
    for column in columns:
        left = column in ("UPSTREAM", "STATE", "REPORTED")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for u in status["upstreams"]:
        reported = u["reported"]
        weight = "" if u["weight"] == 1 else f" ×{u['weight']:g}"
        peer = () if peers is None else (f"{u.get('peer_in_flight', 0):g}",)
        table.add_row(
            u["name"] + weight,
            _gate(u),
            str(u.get("ejections", 0)),
            str(u["in_flight"]),
            *peer,
            str(u["requests"]),
            str(u["errors"]),
            _ms(u["latency_ewma"]),
            "-" if u["cost"] is None else f"{u['cost']:.2g}",
            "-"
            if reported["age"] is None
            else f"{reported['in_flight']:g} {_ms(reported['latency'])} {reported['health']:.0%}",
        )
    return table


def _caption(status: dict[str, Any]) -> str | None:
    """Below the table: the peers (a balancer's load exchange) and the sources its
    upstreams and peers are found by (DNS names, fixed addresses)."""
    lines = [] if status.get("peers") is None else [_peers(status["peers"])]
    lines += [_source(source) for source in status.get("discovery", [])]
    return "\n".join(lines) or None


def _source(source: dict[str, Any]) -> str:
    """One line on a source: ``upstreams from dns://...: 2 addresses, ok, TTL 5s``."""
    found = f"{len(source['addresses'])} addresses"
    line = f"{source['for']} from {source['source']}: {found}, {source['state']}"
    if source.get("ttl") is not None:
        line += f", TTL {source['ttl']:g}s"
    if source["state"] in ("failed", "empty") and source.get("last_error"):
        line += f" (keeping the last good set: {source['last_error']})"
    return line


def _peers(peers: list[dict[str, Any]]) -> str:
    """One line on the other balancers whose load this one routes with."""
    parts = []
    for peer in peers:
        if peer.get("same_as"):
            parts.append(f"{peer['name']} is {peer['same_as']} (not counted twice)")
        elif peer["up"]:
            parts.append(
                f"{peer['name']} up ({peer['age']:.2f}s old, {peer['in_flight']:g} in flight)"
            )
        else:
            age = "never heard" if peer["age"] is None else f"{peer['age']:.1f}s old"
            parts.append(f"{peer['name']} IGNORED ({age}, {peer['errors']} errors)")
    return "peers: " + ("; ".join(parts) or "none")


def _gate(upstream: dict[str, Any]) -> Text:
    """Whether the router may pick the upstream, and if not, why."""
    if upstream.get("draining"):
        return Text("draining", style="yellow")
    if upstream.get("ejected_for_seconds"):
        return Text(f"ejected {upstream['ejected_for_seconds']:.0f}s", style="red")
    if not upstream.get("healthy", True):
        return Text("unhealthy", style="red")
    if not upstream["available"]:
        return Text("out", style="red")
    if upstream.get("slow_start_remaining_seconds"):
        return Text(f"ramp {upstream['slow_start_remaining_seconds']:.0f}s", style="yellow")
    return Text("in", style="green")
