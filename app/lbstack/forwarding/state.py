"""One request in flight: the state its tries, its relay and the timeout sweep share."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Final

from lbstack import aio
from lbstack.forwarding.headers import RequestHead

if TYPE_CHECKING:
    from lbstack.forwarding.front import FrontConnection
    from lbstack.forwarding.upstreams import Link
    from lbstack.routing import Upstream

# What an exchange waits on; when it waits too long, the status it answers with.
WAIT_HEADERS, READ_CLIENT, WRITE_UPSTREAM, READ_UPSTREAM, WRITE_CLIENT, TUNNEL = range(6)
_PHASE_STATUS: Final = (504, 408, 504, 504, 408, 408)
UPSTREAM_PHASES: Final = frozenset({WAIT_HEADERS, WRITE_UPSTREAM, READ_UPSTREAM})
# The status of an exchange whose client went away: nothing is sent (nginx's 499).
CLIENT_GONE: Final = 499


class BodyFailed(Exception):
    """The client's body could not be read: answer ``status`` (or nothing: 499)."""

    def __init__(self, status: int, problem: str) -> None:
        super().__init__(problem)
        self.status = status
        self.problem = problem


class Exchange:
    """One request in flight: what the sweep reads, and what its tries share."""

    __slots__ = (
        "attempts",
        "body_started",
        "conn",
        "deadline",
        "expect_continue",
        "failure",
        "head",
        "http10",
        "link",
        "message",
        "payload",
        "phase",
        "raced",
        "reached",
        "replayable",
        "target",
        "task",
        "tried",
    )

    def __init__(
        self,
        conn: FrontConnection,
        message: aio.RawRequestMessage,
        payload: aio.StreamReader,
        head: RequestHead,
        task: asyncio.Task[None],
    ) -> None:
        self.conn = conn
        self.message = message
        self.payload = payload
        self.head = head
        self.task = task
        self.deadline = 0.0
        self.phase = WAIT_HEADERS
        self.failure = 0
        self.attempts = 0
        self.body_started = False
        self.http10 = message.version < aio.HTTP11
        self.expect_continue = False
        self.link: Link | None = None
        self.target = b""  # what goes upstream: origin form
        # What decides on a retry: whether the request may be sent again at all, the
        # upstreams that failed it, the tries that may have reached one, and whether
        # the keep-alive race was retried already.
        self.replayable = False
        self.tried: tuple[Upstream, ...] = ()
        self.reached = 0
        self.raced = False

    def expire(self) -> None:
        """Past the deadline (the sweep): end with the phase's status."""
        self.fail(_PHASE_STATUS[self.phase])

    def fail(self, status: int) -> None:
        if not self.failure:
            self.failure = status
            self.task.cancel()

    def absorb(self) -> int:
        """The failure a cancellation stands for, or 0 when the client went away."""
        failure, self.failure = self.failure, 0
        if failure and self.task.uncancel() == 0:
            return failure
        return 0
