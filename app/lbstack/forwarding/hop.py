"""What the exchange, its relay and its tunnels need of the forwarder that runs them.

``Forwarder`` builds an ``Exchanger`` and passes itself; typed as this narrow view, the
pieces below it need not import it, and the package's imports run one way: forwarder
over exchange over relay and tunnel over state.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from lbstack.config import TierConfig
    from lbstack.forwarding.admission import Admission
    from lbstack.forwarding.state import Exchange
    from lbstack.forwarding.stats import TierStats
    from lbstack.forwarding.upstreams import UpstreamSet
    from lbstack.health import HealthMonitor
    from lbstack.routing import Policy
    from lbstack.routing.budget import RetryBudget


class Hop(Protocol):
    """One hop's forwarding state, as its exchanges use it (``Forwarder`` is one)."""

    tier: TierConfig
    edge: bool
    admission: Admission
    budget: RetryBudget
    members: UpstreamSet
    policy: Policy
    health: HealthMonitor
    stats: TierStats

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    def refuse(
        self,
        ex: Exchange,
        status: int,
        problem: str,
        *,
        close: bool = False,
        retry_after: bool = False,
        unreached: bool = False,
    ) -> tuple[int, bool]:
        """Answer with the stack's own error; the connection closes unless it is sound."""
        ...

    def client_gone(self, ex: Exchange, doing: str) -> None:
        """Count a client that went away (nothing is answered: 499)."""
        ...
