"""Least outstanding: the available upstream with the fewest requests in flight."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from random import Random

from app.routing.policy import Policy
from app.routing.upstream import Upstream


class LeastOutstanding(Policy):
    """The available upstream with the fewest requests in flight from this router.

    Ties go round robin, so idle upstreams share a light load instead of the first
    one taking all of it.
    """

    name = "least_outstanding"

    def __init__(self, upstreams: Sequence[Upstream], rng: Random | None = None) -> None:
        super().__init__(upstreams, rng)
        self._start = 0

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        upstreams = self.upstreams
        count = len(upstreams)
        start = self._start
        best = -1
        best_load = 0
        for offset in range(count):
            index = (start + offset) % count
            upstream = upstreams[index]
            if not upstream.available or upstream in exclude:
                continue
            load = upstream.in_flight
            if best < 0 or load < best_load:
                best, best_load = index, load
                if load == 0:  # nothing beats an idle upstream
                    break
        if best < 0:
            return None
        # The next scan starts past this pick, so tied upstreams take turns.
        self._start = (best + 1) % count
        return upstreams[best]
