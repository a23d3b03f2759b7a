"""Least outstanding: the available upstream with the fewest requests in flight per weight."""

from __future__ import annotations

from collections.abc import Collection

from lbstack.routing.policy import Policy
from lbstack.routing.upstream import Upstream


class LeastOutstanding(Policy):
    """The available upstream with the least ``(in_flight + 1) / effective weight``.

    ``in_flight`` is this router's own count plus, on a balancer with peers, the
    requests the other balancers have in flight to it (``peer_in_flight``), so that
    several balancers fill the proxies together rather than each on its own. The
    ``+ 1`` (HAProxy's leastconn does the same) makes weights count among idle upstreams
    too: a weight-2 upstream takes the next request before a weight-1 one, and holds
    twice its in-flight share under load. Ties go round robin, so idle upstreams share
    a light load instead of the first one taking all of it.
    """

    name = "least_outstanding"

    def _prepare(self) -> None:
        self._start = 0

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        upstreams = self.upstreams
        count = len(upstreams)
        if count == 0:
            return None
        now = self.clock()
        start = self._start
        best = -1
        best_load = 0.0
        for offset in range(count):
            index = (start + offset) % count
            upstream = upstreams[index]
            if not upstream.available or upstream in exclude:
                continue
            load = (upstream.in_flight + upstream.peer_in_flight + 1) / self.effective_weight(
                upstream, now
            )
            if best < 0 or load < best_load:
                best, best_load = index, load
        if best < 0:
            return None
        # The next scan starts past this pick, so tied upstreams take turns.
        self._start = (best + 1) % count
        return upstreams[best]
