"""Load-aware routing: the registry of policies that pick an upstream per request.

Both the balancer and the proxies route through a policy chosen by name in the config
(``TierConfig.policy``); the names here and ``app.config.PolicyName`` are kept equal
by a test.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from app.routing.least_outstanding import LeastOutstanding
from app.routing.policy import Policy
from app.routing.round_robin import RoundRobin
from app.routing.upstream import Upstream

PolicyFactory = Callable[[Sequence[Upstream], "random.Random | None"], Policy]

POLICIES: dict[str, PolicyFactory] = {
    RoundRobin.name: RoundRobin,
    LeastOutstanding.name: LeastOutstanding,
}


def create_policy(
    name: str, upstreams: Sequence[Upstream], rng: random.Random | None = None
) -> Policy:
    """The policy registered as ``name`` over ``upstreams``."""
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"expected a routing policy ({known}), found {name!r}") from None
    return factory(upstreams, rng)


__all__ = [
    "POLICIES",
    "LeastOutstanding",
    "Policy",
    "PolicyFactory",
    "RoundRobin",
    "Upstream",
    "create_policy",
]
