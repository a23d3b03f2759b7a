"""The metric reference of the docs, read from the metric definitions themselves.

Each kind of component's registry is built from the classes that component builds it
from, one series of each family touched into existence, and collected: the page lists
the names, types, labels and help texts a scrape returns, never a hand-kept copy.
``lbstack.reference`` writes it into docs/metrics.md; a test keeps that copy in step, and
another that each component's real registry has no family this one lacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, cast

from prometheus_client import CollectorRegistry

from lbstack.address import parse_address
from lbstack.config import Config, parse_dns_name
from lbstack.discovery import DiscoveryMetrics, Source
from lbstack.forwarding.stats import ForwardingCollector, TierStats, UpstreamStats
from lbstack.identity import ChildId
from lbstack.metrics import (
    LATENCY_BUCKETS,
    CertificateCollector,
    ComponentMetrics,
    Metrics,
    RouterMetrics,
)
from lbstack.peering import Peering
from lbstack.routing.upstream import Upstream
from lbstack.supervisor.telemetry import SupervisorMetrics

if TYPE_CHECKING:
    from lbstack.supervisor.child import Child

__all__ = ["BEGIN", "COMPONENTS", "END", "Family", "families", "registries", "render"]

BEGIN = "<!-- metrics-reference:begin -->"
END = "<!-- metrics-reference:end -->"

# In the order the page names them.
COMPONENTS = ("balancer", "proxy", "server", "supervisor")


@dataclass(frozen=True)
class Family:
    """One metric family as a scrape shows it."""

    name: str  # as exposed: a counter's with ``_total``
    type: str
    labels: tuple[str, ...]
    help: str
    components: tuple[str, ...]


def _router(role: str, name: str, upstream: str) -> ComponentMetrics:
    """A router's registry as ``lbstack.tiers.router.create_forwarder`` fills it, with
    a DNS source (``lbstack.tiers.router.create_router``, ``lbstack.discovery``)."""
    metrics = ComponentMetrics(role, name)
    Source(
        parse_dns_name("dns://upstreams.example:8080"),
        lambda addresses: None,
        purpose="upstreams",
        settings=Config().discovery,
        metrics=DiscoveryMetrics(metrics),
    )
    router = RouterMetrics(metrics)
    router.ejections.labels(*router.labels(upstream))
    router.scrape_errors.labels(*router.labels(upstream))
    tier, stats = TierStats(), UpstreamStats(upstream)
    tier.count(200)
    stats.count(200)
    metrics.registry.register(
        ForwardingCollector(
            role,
            name,
            tier,
            lambda: [(stats, 0, True, 0.0)],
            lambda: 0,
            lambda: 0,
            lambda: 0.0,
        )
    )
    return metrics


def _balancer() -> CollectorRegistry:
    """A balancer with a peer (``lbstack.tiers.router._exchange``) and an https listener
    (``lbstack.tiers.balancer.create``)."""
    metrics = _router("balancer", "balancer-0", "proxy-0")
    config = Config().balancer
    upstream = Upstream("proxy-0", parse_address("unix:/run/lbstack/proxy-0.sock"))
    peer = parse_address("unix:/run/lbstack/balancer-1.admin.sock")
    Peering([peer], lambda: [upstream], config.exchange, metrics).fold()
    metrics.registry.register(
        CertificateCollector("balancer", "balancer-0", lambda: [("/etc/lbstack/tls/site.pem", 0.0)])
    )
    return metrics.registry


def _server() -> CollectorRegistry:
    """A simulated server's registry (``lbstack.tiers.server.create``)."""
    metrics = Metrics("server", "server-0-0")
    metrics.count(200)
    return metrics.registry


def _supervisor() -> CollectorRegistry:
    """The supervisor's registry, over a stand-in with one autoscaled group and a child."""
    child = SimpleNamespace(
        name="server-0-0", role="server", id=ChildId.server(0, 0), state="ready"
    )
    config = Config.model_validate({"proxies": 1, "autoscale": {"enabled": True}})
    metrics = SupervisorMetrics(config, lambda: [cast("Child", child)])
    metrics.track(cast("Child", child))
    return metrics.registry


def registries() -> dict[str, CollectorRegistry]:
    """A registry of each kind of component, every family holding a series."""
    build: dict[str, Callable[[], CollectorRegistry]] = {
        "balancer": _balancer,
        "proxy": lambda: _router("proxy", "proxy-0", "server-0-0").registry,
        "server": _server,
        "supervisor": _supervisor,
    }
    return {component: build[component]() for component in COMPONENTS}


def families() -> list[Family]:
    """Every lbstack_* family, in the order first met, with the components exporting it.

    A family two components describe differently is an error: the names are a contract.
    """
    found: dict[str, Family] = {}
    for component, registry in registries().items():
        for metric in registry.collect():
            if not metric.samples:
                raise ValueError(f"{component}: {metric.name} has no series to read labels from")
            labels = tuple(k for k in metric.samples[0].labels if k != "le")
            name = f"{metric.name}_total" if metric.type == "counter" else metric.name
            family = Family(name, metric.type, labels, metric.documentation, (component,))
            known = found.get(name)
            if known is None:
                found[name] = family
                continue
            if (known.type, known.labels, known.help) != (family.type, labels, family.help):
                raise ValueError(f"{name}: {component} describes it unlike {known.components}")
            found[name] = Family(
                name, known.type, known.labels, known.help, (*known.components, component)
            )
    return list(found.values())


def _rows(found: list[Family]) -> Iterator[str]:
    # Those every component exports first, then by how widely, then by component.
    ordered = sorted(found, key=lambda f: (-len(f.components), COMPONENTS.index(f.components[0])))
    for family in ordered:
        exported = (
            "every component" if family.components == COMPONENTS else ", ".join(family.components)
        )
        labels = ", ".join(family.labels)
        text = family.help.replace("|", "\\|").replace("<", "&lt;")
        yield f"| `{family.name}` | {family.type} | {labels} | {exported} | {text} |"


def render() -> str:
    """The generated part of docs/metrics.md, markers included."""
    buckets = ", ".join(f"{bound:g}" for bound in LATENCY_BUCKETS)
    return "\n".join(
        [
            BEGIN,
            "| metric | type | labels | exported by | meaning |",
            "|---|---|---|---|---|",
            *_rows(families()),
            "",
            f"Histogram buckets (`le`, seconds): {buckets}, +Inf.",
            END,
        ]
    )
