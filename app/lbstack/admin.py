"""The admin plane every child serves on its admin socket.

``GET /metrics``, ``/healthz``, ``/readyz`` and ``/status`` are a contract; roles add
their own mutating routes (POST/PUT) to the app this returns.

On a unix socket the file's mode (0600) says who may use it. Over TCP (a tier serving
other hosts) every request but ``GET /healthz`` and ``GET /readyz`` must carry the
stack's token (``Authorization: Bearer <token>``, ``[admin] token_file``); the clients
in this package send it with ``bearer``. Without a token (allowed on loopback only),
TCP serves reading and refuses every change (``require_token``).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lbstack.httpserver import DataPlane
from lbstack.metrics import ComponentMetrics

# The data plane serving beside this admin app, when there is one: a draining data
# plane is not ready, so the routers in front stop sending it requests.
DATA_SERVER = web.AppKey("data_server", DataPlane)
# The component's metrics, for roles that add series of their own.
METRICS = web.AppKey("metrics", ComponentMetrics)
# On a draining /readyz: the router in front takes us out at once, without waiting for
# ``health.fall`` failed checks (as Envoy's x-envoy-immediate-health-check-fail).
DRAINING_HEADER = "X-Lbstack-Draining"

StatusFn = Callable[[], dict[str, Any]]
ReadyFn = Callable[[], bool]


def create_admin_app(
    metrics: ComponentMetrics, status: StatusFn, ready: ReadyFn
) -> web.Application:
    """An admin app over one component's metrics, status and readiness."""

    async def get_metrics(request: web.Request) -> web.Response:
        # ?name[]=... renders only those series (as prometheus_client's own exporter
        # does): the routers' scrapes ask for the few they read, a fraction of the cost.
        names = request.query.getall("name[]", None)
        registry = metrics.registry.restricted_registry(names) if names else metrics.registry
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "instance": metrics.instance})

    async def readyz(request: web.Request) -> web.Response:
        data = request.app.get(DATA_SERVER)
        if data is not None and data.draining:
            return web.json_response(
                {"status": "draining", "instance": metrics.instance},
                status=503,
                headers={DRAINING_HEADER: "1"},
            )
        if ready():
            return web.json_response({"status": "ready", "instance": metrics.instance})
        return web.json_response({"status": "not ready", "instance": metrics.instance}, status=503)

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response({"name": metrics.instance, "role": metrics.role, **status()})

    app = web.Application()
    app[METRICS] = metrics
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", get_status)
    return app


# What a TCP admin API answers without the token: probes reveal nothing and change nothing.
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def bearer(token: str | None) -> dict[str, str]:
    """The headers that carry ``token`` to an admin API (none without a token)."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def require_token(token: str | None) -> Middleware:
    """Middleware guarding an admin API that also listens on TCP.

    Over TCP every request but GET on the probes must carry ``token``; with no token
    configured (a loopback-only tier: the config refuses any other bind without one),
    reading is let through and nothing that changes anything is. On a unix socket (its
    file mode guards it) every request goes through."""
    expected = None if token is None else f"Bearer {token}".encode()

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        over_tcp = transport is not None and isinstance(transport.get_extra_info("sockname"), tuple)
        reading = request.method in ("GET", "HEAD")
        if not over_tcp or (reading and request.path in OPEN_PATHS):
            return await handler(request)
        if expected is None:
            if reading:
                return await handler(request)
            return web.json_response(
                {"error": "changes over TCP need [admin] token_file; use the admin socket"},
                status=403,
            )
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "expected Authorization: Bearer <the stack's admin token>"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="lbstack admin"'},
            )
        return await handler(request)

    return check
