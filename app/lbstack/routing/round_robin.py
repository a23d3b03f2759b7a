"""Round robin: each available upstream in turn, as often as its weight says."""

from __future__ import annotations

from collections.abc import Collection

from lbstack.routing.policy import Policy
from lbstack.routing.upstream import Upstream


class RoundRobin(Policy):
    """Smooth weighted round robin (nginx's), whatever the upstreams' load.

    Each pick adds every candidate's effective weight to its running score, takes the
    highest score (the first one on a tie) and takes the candidates' total weight off
    the winner. Over a cycle each upstream gets its weight's share, interleaved rather
    than in bursts: weights 5, 1, 1 give a a b a c a a. Unavailable and excluded
    upstreams sit the pick out, so a retry doesn't cost them their turn to come.
    """

    name = "round_robin"

    def _prepare(self) -> None:
        # Running scores, index for index with ``_bound``, the upstreams they were
        # kept for: ``upstreams`` may be replaced at any time.
        self._bound: tuple[Upstream, ...] = ()
        self._scores: list[float] = []

    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        upstreams = self.upstreams
        if upstreams is not self._bound:
            self._rebind(upstreams)
        scores = self._scores
        now = self.clock()
        total = 0.0
        best = -1
        best_score = 0.0
        for index, upstream in enumerate(upstreams):
            if not upstream.available or upstream in exclude:
                continue
            weight = self.effective_weight(upstream, now)
            score = scores[index] + weight
            scores[index] = score
            total += weight
            if best < 0 or score > best_score:
                best, best_score = index, score
        if best < 0:
            return None
        scores[best] = best_score - total
        return upstreams[best]

    def _rebind(self, upstreams: tuple[Upstream, ...]) -> None:
        """Carry the scores over to a new upstream list; newcomers start at zero."""
        kept = dict(zip(self._bound, self._scores, strict=True))
        self._bound = upstreams
        self._scores = [kept.get(upstream, 0.0) for upstream in upstreams]
