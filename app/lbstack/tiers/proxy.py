"""A reverse proxy in front of its group of servers."""

from __future__ import annotations

from lbstack.component import ChildSpec, Component
from lbstack.tiers.router import create_router


def create(spec: ChildSpec) -> Component:
    """The proxy component: it answers X-Served-By with the server that served."""
    return create_router(spec, spec.config.proxy, edge=False)
