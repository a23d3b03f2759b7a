"""The one lock over a stack's membership, and the rule for taking it.

**The rule.** Whatever changes which children run or which upstreams a router has runs
inside ``async with membership.change(what):``, and only there: a scale step, a drain
or undrain, a reload, a rolling restart, an autoscaler's step, an upgrade. Changes run
one at a time, in the order they asked. Reading the stack (``status``, metrics, an
autoscaler's reading) never takes the lock; a reader that then acts on what it read
takes it and checks again inside, since the stack may have changed while it waited.

Changes do not nest: code inside a change calls the unlocked steps it needs (e.g.
``Scaler.converge``), never another public change, which would wait on itself. A
child that dies and is restarted is not a membership change: it keeps its name and
sockets, and its ``Child`` handles that alone. An upgrade that succeeds never releases
the lock: the image that held it is replaced by one that starts without it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from lbstack.log import get_logger

log = get_logger("supervisor")


class Membership:
    """Serialises the stack's membership changes (see the module's rule)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._running: str | None = None

    @property
    def busy(self) -> bool:
        """Whether a change is running (what a reader saw may be changing under it)."""
        return self._lock.locked()

    @property
    def running(self) -> str | None:
        """What the change under way is, as its caller named it."""
        return self._running

    @contextlib.asynccontextmanager
    async def change(self, what: str) -> AsyncIterator[None]:
        """Hold the stack's membership for ``what`` (e.g. ``"scale proxy-0"``)."""
        if self._lock.locked():
            log.debug("%s waits for %s", what, self._running)
        async with self._lock:
            self._running = what
            try:
                yield
            finally:
                self._running = None
