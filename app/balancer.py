"""The balancer: the stack's public entry, forwarding each request to a proxy."""

from __future__ import annotations

from app.component import ChildSpec, Component
from app.router import create_router


def create(spec: ChildSpec) -> Component:
    """The balancer component: the edge of the stack, so it sets X-Forwarded-Proto."""
    return create_router(spec, spec.config.balancer, edge=True)
