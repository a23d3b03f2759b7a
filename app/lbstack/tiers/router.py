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
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from random import Random
from typing import Any, Final

from aiohttp import web
from pydantic import ValidationError

from lbstack.admin import create_admin_app
from lbstack.component import ChildSpec, Component, UpstreamSpec
from lbstack.config import BalancerConfig, TierConfig
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
from lbstack.log import get_logger
from lbstack.metrics import ComponentMetrics, RouterMetrics
from lbstack.peering import LOAD_PATH, LoadView, Peering
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
) -> tuple[Forwarder, ComponentMetrics]:
    """A router's forwarder with its health checks, scraper and metrics."""
    metrics = ComponentMetrics(role, name)
    router_metrics = RouterMetrics(metrics)
    upstreams = [new_upstream(u, tier) for u in specs]
    forwarder = Forwarder(
        name,
        tier,
        upstreams,
        health=HealthMonitor(upstreams, tier, router_metrics, rng=rng),
        scraper=Scraper(upstreams, tier, router_metrics, rng=rng),
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
    forwarder, metrics = create_forwarder(
        spec.name, spec.role, tier, spec.upstreams, edge=edge, rng=rng
    )

    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    status = forwarder.status
    exchange = _exchange(spec, tier, forwarder, metrics)
    if exchange is not None:
        status = _with_peers(forwarder, exchange)
    interval = exchange.settings.interval if exchange is not None else 0.0
    load = LoadView(
        spec.name,
        spec.role,
        lambda: forwarder.upstreams,
        lambda: sum(u.in_flight for u in forwarder.upstreams),
        interval,
    )

    async def get_load(request: web.Request) -> web.Response:
        return web.json_response(load())

    admin = create_admin_app(metrics, status=status, ready=lambda: forwarder.state == "ready")
    admin[FORWARDER] = forwarder
    admin.add_routes(upstream_routes(forwarder))
    admin.router.add_get(LOAD_PATH, get_load)
    admin.cleanup_ctx.append(forwarder_ctx)
    if exchange is not None:
        admin.cleanup_ctx.append(_exchange_ctx(exchange))
    return Component(data_server=forwarder.data_server, admin=admin)


def _exchange(
    spec: ChildSpec, tier: TierConfig, forwarder: Forwarder, metrics: ComponentMetrics
) -> Peering | None:
    """The load exchange of a balancer with peers, unless the config turns it off."""
    if not spec.peers or not isinstance(tier, BalancerConfig) or not tier.exchange.enabled:
        return None
    return Peering(
        spec.peers,
        lambda: forwarder.upstreams,
        tier.exchange,
        metrics,
        decay=tier.decay,
    )


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
