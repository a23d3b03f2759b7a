"""The interface every routing policy implements."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Collection, Sequence

from app.routing.upstream import Upstream


class Policy(ABC):
    """Chooses the upstream for each request among the available ones.

    ``upstreams`` may be replaced as upstreams come and go; a policy keeps no state
    that would break when it changes length. ``rng`` is the policy's only source of
    randomness, so a seeded ``random.Random`` makes it deterministic.
    """

    name: str

    def __init__(self, upstreams: Sequence[Upstream], rng: random.Random | None = None) -> None:
        self.upstreams: tuple[Upstream, ...] = tuple(upstreams)
        self.rng = rng if rng is not None else random.Random()

    @abstractmethod
    def pick(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """The upstream for the next request, skipping unavailable and ``exclude``d ones.

        ``exclude`` holds the upstreams this request already tried. None when no
        upstream can take the request.
        """
