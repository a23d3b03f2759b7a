"""The router role shared by the balancer and the proxies: a forwarder and its admin app.

Besides the admin plane every child serves, a router's admin app manages its upstreams
at runtime (JSON in and out; never on the data socket):

* ``GET /upstreams``: ``{"upstreams": [view, ...]}``, the same views as ``/status``'s;
* ``GET /upstreams/{name}``: one view; 404 when unknown;
* ``POST /upstreams`` with ``{"name", "address", "admin"?, "health_path"?}`` (an
  ``UpstreamSpec``): 201 and the new upstream's view, in slow start; 409 when the name
  exists; 400 naming each bad field, what was expected and what was found;
* ``POST /upstreams/{name}/drain``: 200, no new request goes to it, those in flight
  finish; ``POST /upstreams/{name}/undrain``: 200, back with slow start;
* ``DELETE /upstreams/{name}``: 200 and its last view once removed; 409 unless it is
  draining (drain it first). Requests still in flight to it finish.

Unknown names answer 404. Errors are ``{"error": "..."}`` (400s add ``"problems"``).

``GET /load`` is the router's own load, small and cheap, which the other balancers
poll (``lbstack.peering``); a balancer with peers also shows them in ``/status``.

Upstreams may also follow a source (``lbstack.discovery``, ``lbstack.reconciler``): a
balancer's ``[balancer] upstreams`` when set (fixed addresses or a DNS name), a proxy's
servers when its group's ``server.kind`` is ``dns``; and a balancer's peers follow
``[balancer.exchange] peers`` besides this host's balancers. ``/status`` then lists each
source under ``discovery``. Admin APIs reached over TCP get the admin token.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from random import Random
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from lbstack.admin import create_admin_app
from lbstack.component import ChildSpec, Component, UpstreamSpec
from lbstack.config import BalancerConfig, DnsName, ExchangeConfig, TierConfig
from lbstack.discovery import DiscoveryMetrics, OnChange, Origin, Resolver, Source
from lbstack.forwarding import (
    FORWARDER,
    Forwarder,
    UnknownUpstream,
    UpstreamConflict,
    new_upstream,
)
from lbstack.forwarding.stats import ForwardingCollector
from lbstack.health import HealthMonitor
from lbstack.identity import UPSTREAM_NAME, UPSTREAM_NAME_RULE
from lbstack.loadview import LOAD_PATH, LoadView
from lbstack.log import get_logger
from lbstack.metrics import ComponentMetrics, RouterMetrics
from lbstack.peering import Peering
from lbstack.reconciler import Reconciler, tls_configured, upstream_spec
from lbstack.routing import Upstream
from lbstack.scrape import Scraper

log = get_logger("router")

# A name that fits in a URL path segment and a metric label as it is.
_FIELDS: Final = tuple(UpstreamSpec.model_fields)

Problem = dict[str, str]


def create_forwarder(
    name: str,
    role: str,
    tier: TierConfig,
    specs: Sequence[UpstreamSpec],
    *,
    edge: bool,
    rng: Random | None = None,
    token: str | None = None,
) -> tuple[Forwarder, ComponentMetrics]:
    """A router's forwarder with its health checks, scraper and metrics; ``token``, the
    admin token, goes to upstreams' admin APIs over TCP."""
    metrics = ComponentMetrics(role, name)
    router_metrics = RouterMetrics(metrics)
    upstreams = [new_upstream(u, tier) for u in specs]
    forwarder = Forwarder(
        name,
        tier,
        upstreams,
        health=HealthMonitor(upstreams, tier, router_metrics, rng=rng, token=token),
        scraper=Scraper(upstreams, tier, router_metrics, rng=rng, token=token),
        edge=edge,
        rng=rng,
    )
    metrics.registry.register(
        ForwardingCollector(
            role,
            name,
            forwarder.stats,
            forwarder.readings,
            lambda: forwarder.in_flight,
            lambda: len(forwarder.admission.waiters),
            forwarder.budget.balance,
        )
    )
    return forwarder, metrics


def create_router(
    spec: ChildSpec, tier: TierConfig, *, edge: bool, rng: Random | None = None
) -> Component:
    """A balancer (``edge``) or a proxy: a forwarder on the data plane, the admin app around it."""
    token = spec.config.admin.token()
    forwarder, metrics = create_forwarder(
        spec.name, spec.role, tier, spec.upstreams, edge=edge, rng=rng, token=token
    )

    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    exchanging = _exchange_settings(spec, tier)
    load = LoadView(
        spec.name,
        spec.role,
        lambda: forwarder.upstreams,
        lambda: sum(u.in_flight for u in forwarder.upstreams),
        0.0 if exchanging is None else exchanging.interval,
    )
    status = forwarder.status
    exchange = None
    if exchanging is not None:
        exchange = Peering(
            spec.peers,
            lambda: forwarder.upstreams,
            exchanging,
            metrics,
            decay=tier.decay,
            me=load,
            token=token,
        )
        status = _with_peers(forwarder, exchange)
    following = _following(spec, tier, forwarder, metrics, exchange)
    if following.sources:
        status = _with_sources(status, following.sources)

    async def get_load(request: web.Request) -> web.Response:
        return web.json_response(load())

    admin = create_admin_app(metrics, status=status, ready=lambda: forwarder.state == "ready")
    admin[FORWARDER] = forwarder
    admin.add_routes(upstream_routes(forwarder))
    admin.router.add_get(LOAD_PATH, get_load)
    # Started in this order, stopped in the reverse: sources change a running forwarder.
    admin.cleanup_ctx.append(forwarder_ctx)
    if exchange is not None:
        admin.cleanup_ctx.append(_exchange_ctx(exchange))
    if following.sources:
        admin.cleanup_ctx.append(following.ctx)
    return Component(data_server=forwarder.data_server, admin=admin)


def _exchange_settings(spec: ChildSpec, tier: TierConfig) -> ExchangeConfig | None:
    """The load exchange of a balancer with peers (this host's or elsewhere), unless the
    config turns it off."""
    if not isinstance(tier, BalancerConfig) or not tier.exchange.enabled:
        return None
    if not spec.peers and tier.exchange.peers == ():
        return None
    return tier.exchange


@dataclass
class _Following:
    """The sources a router follows and what they drive; ``ctx`` runs them."""

    resolver: Resolver
    sources: list[Source] = field(default_factory=list)
    reconcilers: list[Reconciler] = field(default_factory=list)

    async def ctx(self, app: web.Application) -> AsyncIterator[None]:
        try:
            for source in self.sources:
                await source.start()
            yield
        finally:
            for source in self.sources:
                await source.close()
            for reconciler in self.reconcilers:
                await reconciler.close()


def _following(
    spec: ChildSpec,
    tier: TierConfig,
    forwarder: Forwarder,
    metrics: ComponentMetrics,
    exchange: Peering | None,
) -> _Following:
    """The upstreams' source (a balancer's ``upstreams``, a proxy's ``dns`` servers) and
    the peers' (``[balancer.exchange] peers``) of this router, if it has any."""
    config = spec.config
    following = _Following(Resolver(config.discovery))
    found: list[tuple[Origin, OnChange, str]] = []
    origin, health_path, admin = _upstream_source(spec, tier)
    if origin is not None:
        tls = isinstance(origin, DnsName) and tls_configured(tier.upstream_tls)
        reconciler = Reconciler(
            forwarder,
            partial(
                upstream_spec,
                admin_offset=config.network.admin_offset if admin else None,
                health_path=health_path,
                tls=tls,
            ),
            grace=config.supervisor.graceful_timeout,
            source=str(origin),
        )
        following.reconcilers.append(reconciler)
        found.append((origin, reconciler.apply, "upstreams"))
    if exchange is not None and isinstance(tier, BalancerConfig) and tier.exchange.peers != ():
        found.append((tier.exchange.peers, exchange.follow, "peers"))
    named = any(isinstance(origin, DnsName) for origin, *_ in found)
    dns_metrics = DiscoveryMetrics(metrics) if named else None
    following.sources = [
        Source(
            origin,
            apply,
            purpose=purpose,
            settings=config.discovery,
            resolver=following.resolver,
            metrics=dns_metrics,
        )
        for origin, apply, purpose in found
    ]
    return following


def _upstream_source(spec: ChildSpec, tier: TierConfig) -> tuple[Origin | None, str, bool]:
    """Where the router's upstreams are found beside ``spec.upstreams``, their health
    path, and whether they have an admin API: a balancer's ``upstreams`` (lbstack
    proxies), or a proxy's group of ``dns`` servers (``admin_api`` says)."""
    if isinstance(tier, BalancerConfig) and tier.upstreams != ():
        return tier.upstreams, UpstreamSpec.model_fields["health_path"].default, True
    if spec.role == "proxy" and spec.group is not None:
        server = spec.config.group(spec.group).server
        if server.kind == "dns":
            return server.discover, server.health_path, server.admin_api
    return None, "", False


def _with_sources(
    status: Callable[[], dict[str, Any]], sources: Sequence[Source]
) -> Callable[[], dict[str, Any]]:
    """``/status`` with each source: its name, the set in use, its TTL, its last error."""

    def with_sources() -> dict[str, Any]:
        return {**status(), "discovery": [source.status() for source in sources]}

    return with_sources


def _exchange_ctx(exchange: Peering) -> Callable[[web.Application], AsyncIterator[None]]:
    """The exchange polls while the admin app runs, as the scraper and health checks do."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        await exchange.start()
        yield
        await exchange.close()

    return ctx


def _with_peers(forwarder: Forwarder, exchange: Peering) -> Callable[[], dict[str, Any]]:
    """``/status`` with the peers, and each upstream's load as the peers report it."""

    def status() -> dict[str, Any]:
        view = forwarder.status()
        for upstream_view in view["upstreams"]:
            upstream = forwarder.find(upstream_view["name"])
            if upstream is not None:
                upstream_view["peer_in_flight"] = round(upstream.peer_in_flight, 3)
        view["peers"] = exchange.status()
        return view

    return status


def upstream_routes(forwarder: Forwarder) -> list[web.RouteDef]:
    """The admin routes that list, add, drain, undrain and remove ``forwarder``'s upstreams."""

    async def list_upstreams(request: web.Request) -> web.Response:
        return web.json_response({"upstreams": forwarder.upstream_views()})

    async def get_upstream(request: web.Request) -> web.Response:
        upstream = forwarder.find(request.match_info["name"])
        if upstream is None:
            return _error(404, f"no upstream {request.match_info['name']}")
        return web.json_response(forwarder.upstream_view(upstream))

    async def add_upstream(request: web.Request) -> web.Response:
        spec = _parse_spec(await request.read())
        if isinstance(spec, list):
            return _refused(spec)
        try:
            upstream = forwarder.add_upstream(spec)
        except UpstreamConflict as exc:
            return _error(409, str(exc))
        except RuntimeError as exc:
            return _error(503, str(exc))
        return web.json_response(
            forwarder.upstream_view(upstream),
            status=201,
            headers={"Location": f"/upstreams/{upstream.name}"},
        )

    def acting(act: Callable[[str], Upstream]) -> Callable[[web.Request], Awaitable[web.Response]]:
        """A route that applies ``act`` to the named upstream and answers its view."""

        async def handler(request: web.Request) -> web.Response:
            try:
                upstream = act(request.match_info["name"])
            except UnknownUpstream as exc:
                return _error(404, str(exc))
            except UpstreamConflict as exc:
                return _error(409, str(exc))
            return web.json_response(forwarder.upstream_view(upstream))

        return handler

    drain = acting(forwarder.drain)
    undrain = acting(forwarder.undrain)
    remove = acting(forwarder.remove_upstream)
    recycle = acting(forwarder.recycle)

    return [
        web.get("/upstreams", list_upstreams),
        web.post("/upstreams", add_upstream),
        web.get("/upstreams/{name}", get_upstream),
        web.delete("/upstreams/{name}", remove),
        web.post("/upstreams/{name}/drain", drain),
        web.post("/upstreams/{name}/undrain", undrain),
        web.post("/upstreams/{name}/recycle", recycle),
    ]


def _parse_spec(body: bytes) -> UpstreamSpec | list[Problem]:
    """The upstream a ``POST /upstreams`` body describes, or what is wrong with it."""
    try:
        data = json.loads(body)
    except ValueError:  # not JSON, or not UTF-8
        return [_problem("(body)", "a JSON object", "not JSON")]
    if not isinstance(data, dict):
        return [_problem("(body)", "a JSON object", _describe(data))]
    problems = [
        _problem(str(key), f"one of the fields {', '.join(_FIELDS)}", "an unknown field")
        for key in data
        if key not in _FIELDS
    ]
    try:
        spec = UpstreamSpec.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = ".".join(str(part) for part in error["loc"]) or "(body)"
            if error["type"] == "missing":
                problems.append(_problem(field, "a value (required)", "nothing"))
                continue
            expected = error["msg"]
            expected = expected.removeprefix("Input should be ").removeprefix("expected ")
            problems.append(_problem(field, expected, _describe(error.get("input"))))
        return problems
    if not UPSTREAM_NAME.fullmatch(spec.name):
        problems.append(_problem("name", UPSTREAM_NAME_RULE, repr(spec.name)))
    if not spec.health_path.startswith("/"):
        problems.append(_problem("health_path", "a path starting with '/'", repr(spec.health_path)))
    return problems or spec


def _problem(field: str, expected: str, found: str) -> Problem:
    return {"field": field, "expected": expected, "found": found}


def _describe(value: Any) -> str:
    if isinstance(value, dict | list):
        return f"a {'JSON object' if isinstance(value, dict) else 'list'}"
    return repr(value)


def _refused(problems: list[Problem]) -> web.Response:
    message = "; ".join(
        f"{p['field']}: expected {p['expected']}, found {p['found']}" for p in problems
    )
    log.info("refused an upstream: %s", message)
    return web.json_response(
        {"error": f"invalid upstream: {message}", "problems": problems}, status=400
    )


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
