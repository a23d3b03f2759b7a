"""The retry budget: how many retries a router may add to its traffic, as Finagle's.

Retries on another upstream rescue a request from one bad upstream, but when every
upstream is struggling they multiply the load that made them fail. A budget caps them
to a share of recent traffic, with a small floor so that a quiet router can still retry.

Arithmetic, over a sliding window of ``ttl`` seconds::

    balance = min_per_second × ttl  +  ratio × requests  −  retries

where ``requests`` (``deposit()``) and ``retries`` (successful ``try_withdraw()``) are
those of the window. A retry is allowed when ``balance ≥ 1``. So in any window retries
stay within ``ratio`` of the requests, plus the floor of ``min_per_second × ttl``,
which needs no deposits. Deposits and withdrawals alike age out: withdrawals charged
against old deposits can leave the balance below the floor (even negative) until they
expire in turn, which is what keeps the window's retries within its bound.

The window is a ring of ``ceil(ttl)`` buckets of about a second each, so memory and
work stay constant whatever the request rate; an entry expires when its bucket leaves
the ring, between ``ttl − ttl / ceil(ttl)`` and ``ttl`` seconds after it was made.
Amounts are kept in integer millionths of a token so that sums are exact: 5 deposits
of 0.2 make one whole retry, not 0.9999999.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

# Millionths of a token per token.
_SCALE = 1_000_000


class RetryBudget:
    """Tokens for retries: each request deposits ``ratio``, each retry withdraws 1."""

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        ttl: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ratio >= 0:
            raise ValueError(f"expected a retry budget ratio >= 0, found {ratio!r}")
        if not min_per_second >= 0:
            raise ValueError(f"expected retries per second >= 0, found {min_per_second!r}")
        if not (ttl > 0 and math.isfinite(ttl)):
            raise ValueError(f"expected a positive, finite retry budget ttl, found {ttl!r}")
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._clock = clock
        self._deposit = round(ratio * _SCALE)
        self._reserve = round(min_per_second * ttl * _SCALE)
        self._buckets = [0] * max(1, math.ceil(ttl))
        self._width = ttl / len(self._buckets)
        self._index = self._bucket_index()  # absolute index of the newest bucket
        self._total = 0  # sum of the buckets

    def deposit(self) -> None:
        """Count one request: it earns ``ratio`` of a retry."""
        self._add(self._deposit)

    def try_withdraw(self) -> bool:
        """Take one retry from the budget; False, and nothing taken, when it is spent."""
        self._advance()
        if self._reserve + self._total < _SCALE:
            return False
        self._add(-_SCALE)
        return True

    def balance(self) -> float:
        """Retries the budget holds now (what metrics show); below 0 while in debt."""
        self._advance()
        return (self._reserve + self._total) / _SCALE

    def _add(self, amount: int) -> None:
        self._advance()
        self._buckets[self._index % len(self._buckets)] += amount
        self._total += amount

    def _bucket_index(self) -> int:
        return math.floor(self._clock() / self._width)

    def _advance(self) -> None:
        """Empty the buckets that have left the window since the last call."""
        index = self._bucket_index()
        elapsed = index - self._index
        if elapsed <= 0:  # same bucket (or a clock that went back: stay put)
            return
        buckets = self._buckets
        size = len(buckets)
        if elapsed >= size:
            buckets[:] = [0] * size
            self._total = 0
        else:
            for step in range(1, elapsed + 1):
                slot = (self._index + step) % size
                self._total -= buckets[slot]
                buckets[slot] = 0
        self._index = index
