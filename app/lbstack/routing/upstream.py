"""The runtime view of one upstream that routing policies choose from."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lbstack.address import Address


@dataclass(eq=False, slots=True)
class Upstream:
    """One upstream as a router sees it: where it is, whether it is in, how loaded it is.

    Who writes what:

    * the forwarder, per request: ``in_flight``, ``requests``, ``errors`` and the latency
      estimate (``ewma``/``ewma_at``, through the policy's ``observe``);
    * the health monitor: ``healthy`` (active checks), ``ejected_until`` and
      ``ejections`` (passive ejection), ``ramp_start`` (slow start) and ``available``,
      the one flag policies read to know whether they may pick it;
    * the metrics scraper: the ``reported_*`` fields, what the upstream says of its own
      load, stamped with ``reported_at`` so that stale figures age out;
    * the control API: ``weight`` and ``draining``;
    * the balancers' load exchange (``lbstack.peering``): the ``peer_*`` fields, what the
      other balancers have in flight to this upstream, already faded by the age of
      their views, so a pick reads them as they are.

    Identity is the object itself, so a policy's ``exclude`` set is cheap to test.
    """

    name: str
    address: Address
    admin: Address | None = None
    health_path: str = "/healthz"
    weight: float = 1.0

    # Routing gate (health monitor): policies pick only available upstreams.
    available: bool = True
    healthy: bool = True
    draining: bool = False
    ejected_until: float = 0.0
    ejections: int = 0
    consecutive_failures: int = 0
    ramp_start: float = -math.inf

    # Exact, per request (forwarder).
    in_flight: int = 0
    requests: int = 0
    errors: int = 0

    # Latency estimate in seconds (peak EWMA), and when it was last updated.
    ewma: float = 0.0
    ewma_at: float = -math.inf

    # What the upstream reports of itself in its /metrics (scraper).
    reported_in_flight: float = 0.0
    reported_latency: float = 0.0
    reported_health: float = 1.0
    reported_at: float = -math.inf

    # What the other balancers send this upstream (load exchange): the sum of their
    # requests in flight to it, and the mean of their latency estimates of it (0: none).
    peer_in_flight: float = 0.0
    peer_latency: float = 0.0


# Below this an upstream still takes a share, or slow start would begin with nothing
# to learn from; 0.1 is the floor Envoy's slow start (min_weight_percent) defaults to.
RAMP_FLOOR = 0.1
# Weights at or below zero are floored here rather than dividing by zero: such an
# upstream is a last resort, picked when nothing weightier can take the request.
# Taking it out altogether is what ``draining`` and ``available`` are for.
WEIGHT_FLOOR = 1e-6


def effective_weight(upstream: Upstream, now: float, slow_start: float) -> float:
    """``upstream.weight`` as routing uses it at ``now``: ramped up while in slow start.

    An upstream whose ``ramp_start`` is less than ``slow_start`` seconds ago has its
    weight scaled by ``max(RAMP_FLOOR, elapsed / slow_start)``, so a new or re-admitted
    upstream takes a growing share instead of a cold flood. Every policy uses this.
    """
    weight = upstream.weight if upstream.weight > WEIGHT_FLOOR else WEIGHT_FLOOR
    elapsed = now - upstream.ramp_start  # inf when it never ramped: no scaling
    if elapsed >= slow_start or slow_start <= 0:
        return weight
    return weight * max(RAMP_FLOOR, elapsed / slow_start)
