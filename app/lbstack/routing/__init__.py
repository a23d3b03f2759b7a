"""Load-aware routing: the registry of policies that pick an upstream per request.

Both the balancer and the proxies route through a policy chosen by name in the config
(``TierConfig.policy``); the names here and ``lbstack.config.PolicyName`` are kept equal
by a test. ``RetryBudget`` bounds the retries the forwarder may add on top.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from lbstack.config import TierConfig
from lbstack.routing.budget import RetryBudget
from lbstack.routing.least_outstanding import LeastOutstanding
from lbstack.routing.p2c_ewma import P2CEwma
from lbstack.routing.policy import Policy
from lbstack.routing.round_robin import RoundRobin
from lbstack.routing.upstream import Upstream, effective_weight


class PolicyFactory(Protocol):
    """What builds a policy: every ``Policy`` subclass's constructor."""

    def __call__(
        self,
        upstreams: Sequence[Upstream],
        rng: random.Random | None = ...,
        *,
        tier: TierConfig | None = ...,
        clock: Callable[[], float] = ...,
    ) -> Policy: ...


POLICIES: dict[str, PolicyFactory] = {
    RoundRobin.name: RoundRobin,
    LeastOutstanding.name: LeastOutstanding,
    P2CEwma.name: P2CEwma,
}


def create_policy(
    name: str,
    upstreams: Sequence[Upstream],
    rng: random.Random | None = None,
    *,
    tier: TierConfig | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Policy:
    """The policy registered as ``name`` over ``upstreams``, tuned by ``tier``.

    Without ``tier`` the policy takes the config's defaults (slow start, decay...).
    """
    try:
        factory = POLICIES[name]
    except KeyError:
        known = ", ".join(sorted(POLICIES))
        raise ValueError(f"expected a routing policy ({known}), found {name!r}") from None
    return factory(upstreams, rng, tier=tier, clock=clock)


__all__ = [
    "POLICIES",
    "LeastOutstanding",
    "P2CEwma",
    "Policy",
    "PolicyFactory",
    "RetryBudget",
    "RoundRobin",
    "Upstream",
    "create_policy",
    "effective_weight",
]
