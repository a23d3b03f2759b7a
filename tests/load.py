"""Traffic behind a test's back: a few tasks sending requests while the test acts."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final

PROGRESS_TIMEOUT: Final = 10.0


class Load:
    """``clients`` tasks, each awaiting ``send()`` in a loop (at most ``bound`` times)
    until the ``async with`` block ends; ``seen`` counts the outcomes ``send`` returns."""

    def __init__(
        self, send: Callable[[], Awaitable[str]], clients: int, *, bound: int = 5000
    ) -> None:
        self.send = send
        self.clients = clients
        self.bound = bound
        self.seen: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        async with asyncio.timeout(PROGRESS_TIMEOUT):
            await asyncio.gather(*self._tasks)

    async def _client(self) -> None:
        for _ in range(self.bound):
            if self._stop.is_set():
                return
            self.seen[await self.send()] += 1

    async def progress(
        self, count: int, outcome: str | None = None, timeout: float = PROGRESS_TIMEOUT
    ) -> None:
        """Wait for ``count`` more outcomes (only ``outcome``s, when given)."""

        def done() -> int:
            return self.seen[outcome] if outcome is not None else self.seen.total()

        target = done() + count
        deadline = asyncio.get_running_loop().time() + timeout
        while done() < target:
            assert asyncio.get_running_loop().time() < deadline, f"{count} more requests"
            await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
