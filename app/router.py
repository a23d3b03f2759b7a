"""The router role shared by the balancer and the proxies: a forwarder and its admin app."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from app.admin import create_admin_app
from app.component import ChildSpec, Component
from app.config import TierConfig
from app.forwarding import FORWARDER, Forwarder
from app.httpserver import server_options
from app.metrics import Metrics


def create_router(spec: ChildSpec, tier: TierConfig, *, edge: bool) -> Component:
    """A balancer (``edge``) or a proxy: a forwarder on the data plane, the admin app around it."""
    metrics = Metrics(spec.role, spec.name)
    forwarder = Forwarder(spec.name, tier, spec.upstreams, metrics, edge=edge)

    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        await forwarder.start()
        yield
        await forwarder.close()

    admin = create_admin_app(
        metrics, status=forwarder.status, ready=lambda: forwarder.state == "ready"
    )
    admin[FORWARDER] = forwarder
    admin.cleanup_ctx.append(forwarder_ctx)
    options = server_options(
        keepalive=tier.timeouts.client_keepalive,
        max_header_size=tier.limits.max_header_size,
        max_headers=tier.limits.max_headers,
    )
    return Component(handler=forwarder.handle, admin=admin, server_options=options)
