"""The interface every routing policy implements."""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Sequence
from typing import ClassVar

from lbstack.config import TierConfig
from lbstack.routing.upstream import Upstream, effective_weight

# Used when a policy is built without a tier (tests, tools): the config's own defaults.
_DEFAULT_TIER = TierConfig()


class Policy(ABC):
    """Chooses the upstream for each request among the available ones.

    ``upstreams`` may be replaced as upstreams come and go; a policy keeps no state
    that would break when it changes length. ``rng`` is the policy's only source of
    randomness and ``clock`` its only source of time (seconds, monotonic, the same
    clock as ``loop.time()``), so a seeded ``random.Random`` and a fake clock make it
    deterministic. ``tier`` supplies ``slow_start`` and what the policy tunes by.
    """

    name: ClassVar[str]

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        rng: random.Random | None = None,
        *,
        tier: TierConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstreams: tuple[Upstream, ...] = tuple(upstreams)
        self.rng = rng if rng is not None else random.Random()
        self.clock = clock
        self.tier = tier if tier is not None else _DEFAULT_TIER
        self.slow_start = self.tier.slow_start
        self._prepare()

    def _prepare(self) -> None:
        """A policy's own state, set up once the base's is (a hook for subclasses)."""
        return  # a hook, not an obligation

    @abstractmethod
    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """The upstream for the next request, skipping unavailable and ``exclude``d ones.

        ``exclude`` holds the upstreams this request already tried. None when no
        upstream can take the request.
        """

    def observe(self, upstream: Upstream, latency: float, now: float) -> None:
        """Learn from a try that got response headers after ``latency`` seconds.

        The forwarder calls it for every such try; policies blind to latency ignore it.
        """
        return  # a hook, not an obligation: most policies need no latency

    def observe_failure(self, upstream: Upstream, now: float) -> None:
        """Learn from a try that failed (no usable response); ignored by default."""
        return

    def effective_weight(self, upstream: Upstream, now: float) -> float:
        """``upstream``'s weight at ``now``, scaled down while it is in slow start."""
        return effective_weight(upstream, now, self.slow_start)
