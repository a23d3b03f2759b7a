"""Admission: which upstream takes a request, within each one's in-flight cap.

The routing policy picks; an upstream at ``max_in_flight_per_upstream`` is passed
over. When every upstream is at its cap the request waits in a bounded FIFO queue
for a slot (``queue_size``, at most ``timeouts.queue``), then gets a 503.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Final

from lbstack.config import TierConfig
from lbstack.routing import Policy, Upstream

# What ``pick`` returns when every available upstream is at its in-flight limit.
FULL: Final = object()


class Admission:
    """Picks upstreams for a router and keeps their in-flight counts."""

    def __init__(self, tier: TierConfig, policy: Policy) -> None:
        self.policy = policy
        self._limit = tier.limits.max_in_flight_per_upstream
        self._queue_size = tier.limits.queue_size
        self._queue_timeout = tier.timeouts.queue
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def pick(self, exclude: tuple[Upstream, ...]) -> Upstream | object | None:
        """The policy's pick among upstreams with a free slot; ``FULL`` when all are full."""
        upstream = self.policy.pick(exclude)
        limit = self._limit
        if upstream is None or not limit or upstream.in_flight < limit:
            return upstream
        full = set(exclude)
        while upstream is not None and upstream.in_flight >= limit:
            full.add(upstream)
            upstream = self.policy.pick(full)
        return FULL if upstream is None else upstream

    async def acquire(
        self, loop: asyncio.AbstractEventLoop, exclude: tuple[Upstream, ...]
    ) -> Upstream | str:
        """An upstream with a free slot, waiting in the queue if all are full; or why not."""
        picked = self.pick(exclude)
        if picked is None:
            return "no upstream available"
        if picked is not FULL:
            assert isinstance(picked, Upstream)
            return picked
        if len(self.waiters) >= self._queue_size:
            return "every upstream is at its limit and the queue is full"
        deadline = loop.time() + self._queue_timeout
        while picked is FULL:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return "no upstream slot freed up in time"
            waiter = loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                return "no upstream slot freed up in time"
            finally:
                if not waiter.done():
                    waiter.cancel()
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            picked = self.pick(exclude)
        if picked is None:
            return "no upstream available"
        assert isinstance(picked, Upstream)
        return picked

    def release(self, upstream: Upstream) -> None:
        """A try to ``upstream`` is over: free its slot for the first waiter."""
        upstream.in_flight -= 1
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def wake(self) -> None:
        """Slots were added (an upstream came in): let the queued requests try again."""
        count = self._limit or len(self.waiters)
        waiters = self.waiters
        while waiters and count > 0:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count -= 1
