"""The admin plane every child serves on its admin socket.

``GET /metrics``, ``/healthz``, ``/readyz`` and ``/status`` are a contract; roles add
their own mutating routes (POST/PUT) to the app this returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.metrics import Metrics

StatusFn = Callable[[], dict[str, Any]]
ReadyFn = Callable[[], bool]


def create_admin_app(metrics: Metrics, status: StatusFn, ready: ReadyFn) -> web.Application:
    """An admin app over one component's metrics, status and readiness."""

    async def get_metrics(request: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "instance": metrics.instance})

    async def readyz(request: web.Request) -> web.Response:
        if ready():
            return web.json_response({"status": "ready", "instance": metrics.instance})
        return web.json_response({"status": "not ready", "instance": metrics.instance}, status=503)

    async def get_status(request: web.Request) -> web.Response:
        return web.json_response({"name": metrics.instance, "role": metrics.role, **status()})

    app = web.Application()
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", get_status)
    return app
