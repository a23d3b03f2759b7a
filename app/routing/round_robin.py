"""Round robin: each available upstream in turn."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from random import Random

from app.routing.policy import Policy
from app.routing.upstream import Upstream


class RoundRobin(Policy):
    """Each available upstream in turn, whatever its load."""

    name = "round_robin"

    def __init__(self, upstreams: Sequence[Upstream], rng: Random | None = None) -> None:
        super().__init__(upstreams, rng)
        self._next = 0

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        upstreams = self.upstreams
        count = len(upstreams)
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            upstream = upstreams[index]
            if upstream.available and upstream not in exclude:
                self._next = (index + 1) % count
                return upstream
        return None
