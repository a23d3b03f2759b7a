"""Power of two choices over peak-EWMA cost, as Finagle and Linkerd balance.

Each pick draws two distinct candidates at random among the available, non-excluded
upstreams and sends to the cheaper one. Comparing two random ones rather than scanning
for the cheapest keeps a pick O(1) and, unlike always taking the global minimum,
doesn't herd every router onto the same upstream between two updates of their view.

The cost of upstream ``u`` at time ``now``::

    cost = max(latency, LATENCY_FLOOR) × (load + 1) / (weight × health)

    latency = u.ewma × exp(-(now − u.ewma_at) / decay)           # peak EWMA, seconds
              max'ed with u.reported_latency             when the report is fresh
              (no sample yet: the fresh reported latency if any, else the
              peers' estimate if any, else the prior)
    load    = max(u.in_flight + u.peer_in_flight, u.reported_in_flight)
                                                         when the report is fresh
              u.in_flight + u.peer_in_flight             otherwise
    weight  = effective_weight(u, now)                   # u.weight, ramped in slow start
    health  = max(u.reported_health, HEALTH_FLOOR)       when the report is fresh, else 1

* **Peak EWMA** (``observe``): a sample above the estimate replaces it at once, so a
  slowing upstream is shunned from its first slow response; a lower one pulls the
  estimate towards it with weight ``1 − exp(-elapsed / decay)``, ``elapsed`` being the
  time since the last update, so the estimate is a time average over ``decay``
  (``TierConfig.decay``) whatever the request rate. A decay of 0 forgets latency at
  once: the policy then weighs load alone.
* **Decay while idle**: between samples the estimate decays towards zero (Finagle's
  ``observe(0)`` on read), so an upstream avoided after a slow spell gets probed again
  some ``decay`` × ln(its estimate / the others' cost) later instead of never, and a
  fast sample then brings it back.
* **Prior**: an upstream with no sample yet costs as much as the policy's time-averaged
  latency of all samples (``PRIOR_LATENCY`` before the first one), i.e. a typical
  upstream, so it is tried, and its in-flight count stops a flood before its first answer.
* **Failure penalty** (``observe_failure``): the estimate jumps to
  ``max(PENALTY_MIN, PENALTY_FACTOR × estimate)`` (at most ``PENALTY_MAX`` unless
  already above it) and then decays like any estimate, so an upstream failing fast
  looks slow, not attractive, and is probed again later at growing intervals.
* **Peers** (balancers only, ``lbstack.peering``): ``peer_in_flight`` is what the other
  balancers have in flight to the upstream, so N balancers see the same load and don't
  all pile onto the one that looks idle from each of them alone. A peer exports only
  its own count, never what it learnt from others, and the upstream's own report
  counts every balancer's requests already: hence the sum with our own count and the
  max with the report, never a sum of all three. ``peer_latency`` (the peers' estimate)
  stands in for the prior of an upstream this balancer has no sample of yet.
* **Reports**: what an upstream says of itself in its metrics (the ``reported_*``
  fields, from all its routers) counts only while fresh: ``now − reported_at ≤
  3 × scrape_interval`` (never when ``scrape_interval`` is 0). ``reported_health`` is a
  proxy's share of healthy servers, so one with all servers down costs
  ``1 / HEALTH_FLOOR`` times more.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from lbstack.routing.policy import Policy
from lbstack.routing.upstream import Upstream

# The prior before any sample at all; then every upstream has it, so it only weighs
# against reported latencies.
PRIOR_LATENCY = 0.01
# Keeps load in the cost once an idle upstream's estimate has decayed to about nothing.
LATENCY_FLOOR = 1e-6
# A failure looks at least this slow (seconds), or this many times the estimate...
PENALTY_MIN = 1.0
PENALTY_FACTOR = 10.0
# ...but no slower than this, so that a run of failures can't push the next probe
# out indefinitely: from 10 s it decays to a few ms in about 15 decay constants.
PENALTY_MAX = 10.0
HEALTH_FLOOR = 1e-3
# Reported figures older than this many scrape intervals are stale (two missed scrapes).
FRESH_SCRAPES = 3.0
# Random draws of a pair before falling back to listing the candidates, which costs an
# allocation but is needed when most upstreams are out or excluded.
_DRAWS = 3


class P2CEwma(Policy):
    """Power of two choices: the cheaper of two random candidates by peak-EWMA cost."""

    name = "p2c_ewma"

    def _prepare(self) -> None:
        self.decay = self.tier.decay
        interval = self.tier.scrape_interval
        # How old a report may be and still count; with no scraping, none counts.
        self.fresh_for = FRESH_SCRAPES * interval if interval > 0 else -math.inf
        # Time-averaged latency of all samples: the prior of upstreams without one.
        self._typical = PRIOR_LATENCY
        self._typical_at = -math.inf

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        upstreams = self.upstreams
        count = len(upstreams)
        rng = self.rng
        if count >= 2:
            for _ in range(_DRAWS):
                first = rng.randrange(count)
                second = rng.randrange(count - 1)
                if second >= first:  # distinct, uniformly among the other count - 1
                    second += 1
                a, b = upstreams[first], upstreams[second]
                if a.available and b.available and a not in exclude and b not in exclude:
                    return self._cheaper(a, b)
        candidates = [u for u in upstreams if u.available and u not in exclude]
        if len(candidates) < 2:
            return candidates[0] if candidates else None
        first = rng.randrange(len(candidates))
        second = rng.randrange(len(candidates) - 1)
        if second >= first:
            second += 1
        return self._cheaper(candidates[first], candidates[second])

    def _cheaper(self, a: Upstream, b: Upstream) -> Upstream:
        now = self.clock()
        return b if self.cost(b, now) < self.cost(a, now) else a

    def cost(self, upstream: Upstream, now: float) -> float:
        """What sending one more request to ``upstream`` at ``now`` costs (module doc)."""
        latency = self.latency(upstream, now)
        load = upstream.in_flight + upstream.peer_in_flight
        weight = self.effective_weight(upstream, now)
        if now - upstream.reported_at <= self.fresh_for:
            reported = upstream.reported_latency
            if upstream.ewma_at == -math.inf and reported > 0:
                latency = reported  # a measurement beats the prior
            elif reported > latency:
                latency = reported
            load = max(load, upstream.reported_in_flight)
            weight *= max(upstream.reported_health, HEALTH_FLOOR)
        return max(latency, LATENCY_FLOOR) * (load + 1.0) / weight

    def latency(self, upstream: Upstream, now: float) -> float:
        """``upstream``'s latency estimate at ``now``, decayed since its last update."""
        if upstream.ewma_at == -math.inf:
            return upstream.peer_latency if upstream.peer_latency > 0 else self._typical
        return upstream.ewma * self._keep(now - upstream.ewma_at)

    def observe(self, upstream: Upstream, latency: float, now: float) -> None:
        latency = max(latency, 0.0)
        if upstream.ewma_at == -math.inf or latency > upstream.ewma:
            upstream.ewma = latency  # peak sensitivity: slowness counts at once
        else:
            keep = self._keep(now - upstream.ewma_at)
            upstream.ewma = upstream.ewma * keep + latency * (1.0 - keep)
        upstream.ewma_at = now
        if self._typical_at == -math.inf:
            self._typical = latency
        else:
            keep = self._keep(now - self._typical_at)
            self._typical = self._typical * keep + latency * (1.0 - keep)
        self._typical_at = now

    def observe_failure(self, upstream: Upstream, now: float) -> None:
        current = self.latency(upstream, now)
        penalty = min(max(PENALTY_MIN, PENALTY_FACTOR * current), PENALTY_MAX)
        upstream.ewma = max(penalty, current)
        upstream.ewma_at = now

    def _keep(self, elapsed: float) -> float:
        """The weight an estimate keeps after ``elapsed`` seconds (1 with no decay)."""
        if elapsed <= 0.0:
            return 1.0
        if self.decay <= 0.0:
            return 0.0  # no memory: the estimate is the last sample
        return math.exp(-elapsed / self.decay)
