"""The load view: what a router serves on ``GET /load``, and how a peer reads it.

Every router serves its own load on its admin socket, and each balancer polls the
others' (``lbstack.peering``)::

    {"name": "balancer-1", "role": "balancer", "host": "lb-a", "pid": 4242, "seq": 17,
     "time": 1732423456.123, "interval": 0.25, "in_flight": 5,
     "upstreams": [{"name": "proxy-0", "in_flight": 3, "requests": 1200, "errors": 0,
                    "latency_ewma": 0.0021, "latency_age": 0.004, "available": true,
                    "healthy": true, "ejected": false, "draining": false}, ...]}

``in_flight`` per upstream is the router's *own* count, never what it learnt from its
peers, so figures don't echo between balancers. ``seq`` counts the views the process
has served and ``pid`` names the process: a peer that restarted shows a new pid.

``name`` and ``host`` (the machine's host name) are the router's **identity**,
``name@host``: the same across its restarts, and the same whichever address it is read
through, so a balancer found by DNS is recognised as this one or one it already polls.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from lbstack.routing.upstream import Upstream

LOAD_PATH: Final = "/load"


def identity(name: str, host: str) -> str:
    """Who a router is, wherever it is read from: ``balancer-1@lb-a``."""
    return f"{name}@{host}"


class LoadView:
    """Builds what a router serves on ``GET /load``: its own load, numbered.

    ``host`` defaults to the machine's host name (``socket.gethostname()``).
    """

    def __init__(
        self,
        name: str,
        role: str,
        upstreams: Callable[[], Sequence[Upstream]],
        in_flight: Callable[[], int],
        interval: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        host: str | None = None,
    ) -> None:
        self.name = name
        self.role = role
        self.host = socket.gethostname() if host is None else host
        self._upstreams = upstreams
        self._in_flight = in_flight
        self._interval = interval
        self._clock = clock
        self._seq = 0
        self._pid = os.getpid()

    @property
    def identity(self) -> str:
        return identity(self.name, self.host)

    def __call__(self) -> dict[str, Any]:
        self._seq += 1
        now = self._clock()
        return {
            "name": self.name,
            "role": self.role,
            "host": self.host,
            "pid": self._pid,
            "seq": self._seq,
            "time": round(time.time(), 3),
            "interval": self._interval,
            "in_flight": self._in_flight(),
            "upstreams": [
                {
                    "name": u.name,
                    "in_flight": u.in_flight,
                    "requests": u.requests,
                    "errors": u.errors,
                    "latency_ewma": u.ewma,
                    "latency_age": None if u.ewma_at == -math.inf else round(now - u.ewma_at, 6),
                    "available": u.available,
                    "healthy": u.healthy,
                    "ejected": u.ejected_until > now,
                    "draining": u.draining,
                }
                for u in self._upstreams()
            ],
        }


@dataclass(frozen=True, slots=True)
class UpstreamLoad:
    """One upstream as a peer sees it."""

    in_flight: float
    requests: int
    latency: float  # the peer's estimate when it answered, seconds (0: none)
    available: bool


@dataclass(frozen=True, slots=True)
class PeerView:
    """One answer of a peer's ``GET /load``."""

    name: str
    pid: int
    seq: int
    in_flight: float
    upstreams: dict[str, UpstreamLoad]
    host: str | None = None  # None: a router that predates it

    @property
    def identity(self) -> str | None:
        return None if self.host is None else identity(self.name, self.host)

    @classmethod
    def parse(cls, data: Any, decay: float) -> PeerView:
        """The view in a ``/load`` JSON body; ValueError saying what is wrong.

        A latency estimate is decayed by its age, with our own ``decay``, as the peer's
        policy would read it now.
        """
        if not isinstance(data, dict) or not isinstance(data.get("upstreams"), list):
            raise ViewError("expected a JSON object with an upstreams list")
        try:
            upstreams = {}
            for item in data["upstreams"]:
                latency = float(item["latency_ewma"])
                age = item.get("latency_age")
                if age is None:
                    latency = 0.0
                elif decay > 0:
                    latency *= math.exp(-max(float(age), 0.0) / decay)
                in_flight = float(item["in_flight"])
                if not (math.isfinite(in_flight) and in_flight >= 0 and math.isfinite(latency)):
                    raise ViewError(f"{item['name']}: expected finite figures >= 0")
                upstreams[str(item["name"])] = UpstreamLoad(
                    in_flight=in_flight,
                    requests=int(item["requests"]),
                    latency=max(latency, 0.0),
                    available=bool(item["available"]),
                )
            host = data.get("host")
            return cls(
                name=str(data["name"]),
                pid=int(data["pid"]),
                seq=int(data["seq"]),
                in_flight=float(data["in_flight"]),
                upstreams=upstreams,
                host=None if host is None else str(host),
            )
        except (KeyError, TypeError) as exc:
            raise ViewError(f"expected a load view, missing or mistyped {exc}") from exc


class ViewError(ValueError):
    """A peer answered something other than a load view."""


__all__ = ["LOAD_PATH", "LoadView", "PeerView", "UpstreamLoad", "ViewError", "identity"]
