"""Changing a running stack's membership: scale a group, drain and undrain a component.

The supervisor talks to the routers only through their admin API:
``POST /upstreams`` adds an upstream (it ramps in with slow start),
``POST /upstreams/{name}/drain`` and ``/undrain`` stop and resume new requests to it,
``DELETE /upstreams/{name}`` removes a drained one, and ``GET /upstreams`` shows the
in-flight count a drain waits on. A scale step never fails a client request: a new
server is ready before any router knows of it, and an old one gets no new request,
finishes the ones it has, and only then is stopped.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from lbstack.address import Address
from lbstack.client import fetch_json
from lbstack.errors import ControlError
from lbstack.log import get_logger

if TYPE_CHECKING:
    from lbstack.config import GroupLayout
    from lbstack.supervisor.arbiter import Supervisor
    from lbstack.supervisor.child import Child

log = get_logger("supervisor")
DRAIN_POLL = 0.1
MAX_SERVERS = 1024


async def call_router(router: Child, method: str, path: str, body: Any = None) -> Any:
    """One admin call to a router; a refusal or silence is a ControlError."""
    assert router.admin is not None
    try:
        status, answer = await fetch_json(router.admin, path, method=method, body=body)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise ControlError(f"{router.name} did not answer {method} {path}: {exc!r}") from exc
    if status >= 400:
        raise ControlError(f"{router.name} refused {method} {path} ({status}): {answer}")
    return answer


class Scaler:
    """Membership changes of one supervisor's stack, one at a time."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor
        # Membership changes (scale, drain, reload, restart) happen one at a time.
        self.lock = asyncio.Lock()
        self._manual_at: dict[str, float] = {}

    def held(self, group: str, hold: float) -> bool:
        """Whether a manual scale of ``group`` less than ``hold`` ago still stands."""
        at = self._manual_at.get(group)
        return at is not None and time.monotonic() - at < hold

    def routers_of(self, name: str) -> list[Child]:
        """The routers that send traffic to ``name``: a server's proxy, or every balancer."""
        children = self._supervisor.children
        target = children.get(name)
        if target is None or target.role not in ("server", "proxy"):
            known = ", ".join(n for n, c in children.items() if c.role in ("server", "proxy"))
            raise ControlError(f"no server or proxy named {name!r}; known: {known}")
        if target.role == "proxy":
            return [c for c in children.values() if c.role == "balancer"]
        return [c for c in children.values() if c.role == "proxy" and c.group == target.group]

    def routers_in_front(self, child: Child) -> list[Child]:
        """The routers that send traffic to ``child`` (none for a balancer)."""
        if child.role == "balancer":
            return []
        return self.routers_of(child.name)

    async def drain(self, name: str, *, force: bool = False) -> dict[str, Any]:
        """No new requests to ``name``; the ones in flight finish.

        Refused, unless ``force``, when a router in front would be left with nothing
        to send requests to: every client would get a 503."""
        return await self._set_draining(name, draining=True, force=force)

    async def undrain(self, name: str) -> dict[str, Any]:
        """``name`` takes new requests again (ramping in with slow start)."""
        return await self._set_draining(name, draining=False)

    async def _set_draining(
        self, name: str, *, draining: bool, force: bool = False
    ) -> dict[str, Any]:
        verb = "drain" if draining else "undrain"
        async with self.lock:
            routers = self.routers_of(name)
            if draining and not force:
                for router in routers:
                    await self._refuse_last(router, name)
            for router in routers:
                await call_router(router, "POST", f"/upstreams/{name}/{verb}")
            self._supervisor.children[name].draining = draining
            log.info("%sed %s", verb, name)
            return {f"{verb}ed": name}

    async def _refuse_last(self, router: Child, name: str) -> None:
        """Refuse to drain ``name`` if ``router`` has no other upstream to use."""
        upstreams = (await call_router(router, "GET", "/upstreams"))["upstreams"]
        others = [u["name"] for u in upstreams if u["name"] != name and u["available"]]
        if not others:
            raise ControlError(
                f"draining {name} would leave {router.name} nothing to send requests to "
                "(every other upstream is drained, down or ejected) and every client a 503; "
                f"`lbstack drain --force {name}` drains it anyway"
            )

    async def scale(self, group: str, servers: int) -> dict[str, Any]:
        """``lbstack scale``: grow or shrink ``group`` (``proxy-0``) to ``servers``
        servers; it holds the autoscaler off the group for its ``hold`` time."""
        supervisor = self._supervisor
        layouts = {layout.name: layout for layout in supervisor.config.layouts()}
        layout = layouts.get(group)
        if layout is None:
            raise ControlError(f"no group named {group!r}; groups: {', '.join(layouts)}")
        if layout.server.kind == "address":
            raise ControlError(
                f"{group}'s servers are addresses something else runs: "
                "lbstack cannot start or stop them"
            )
        if not 1 <= servers <= MAX_SERVERS:
            raise ControlError(f"expected 1 to {MAX_SERVERS} servers, found {servers}")
        async with self.lock:
            self._manual_at[group] = time.monotonic()
            try:
                return await self.resize(layout, servers)
            finally:  # the hold counts from the end of the change, however long
                self._manual_at[group] = time.monotonic()

    async def resize(self, layout: GroupLayout, servers: int) -> dict[str, Any]:
        """Grow or shrink a group to ``servers``; the caller holds ``lock``."""
        supervisor = self._supervisor
        current = supervisor.servers_in(layout.index)
        if servers > len(current):
            await self.grow(layout.index, servers - len(current))
        elif servers < len(current):
            await self.shrink(current[servers - len(current) :])
        now = supervisor.servers_in(layout.index)
        log.info("%s now has %d servers: %s", layout.name, len(now), ", ".join(c.name for c in now))
        return {"group": layout.name, "servers": [c.name for c in now]}

    async def grow(self, group: int, count: int, *, event: bool = True) -> list[Child]:
        """Start ``count`` new servers in ``group`` and add them to its proxy; them.

        ``event``: count it as a scale step (a reload's surge is not one)."""
        supervisor = self._supervisor
        proxy = supervisor.children[f"proxy-{group}"]
        added: list[Child] = []
        for _ in range(count):
            child = supervisor.add_server(group)
            child.start()
            if not await child.wait_ready():
                await supervisor.remove_server(child)
                raise ControlError(f"{child.name} did not become ready: {child.last_exit}")
            await call_router(proxy, "POST", "/upstreams", supervisor.upstream_spec(child))
            added.append(child)
            if event:
                supervisor.metrics.scale_events.labels(
                    "supervisor", "supervisor", f"proxy-{group}", "up"
                ).inc()
            log.info("added %s to proxy-%d", child.name, group)
        return added

    async def shrink(self, victims: list[Child], *, event: bool = True) -> None:
        """Drain, then stop and remove ``victims`` (last first)."""
        supervisor = self._supervisor
        timeout = supervisor.config.supervisor.graceful_timeout
        for child in reversed(victims):
            proxy = supervisor.children[f"proxy-{child.group}"]
            await call_router(proxy, "POST", f"/upstreams/{child.name}/drain")
            child.draining = True
            await self._until_idle(proxy, child.name, timeout)
            await call_router(proxy, "DELETE", f"/upstreams/{child.name}")
            await supervisor.remove_server(child)
            if event:
                supervisor.metrics.scale_events.labels(
                    "supervisor", "supervisor", f"proxy-{child.group}", "down"
                ).inc()
            log.info("removed %s from proxy-%s", child.name, child.group)

    async def _until_idle(self, router: Child, name: str, timeout: float) -> None:
        """Until ``router`` has nothing in flight to ``name``, or ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            answer = await call_router(router, "GET", "/upstreams")
            in_flight = next((u["in_flight"] for u in answer["upstreams"] if u["name"] == name), 0)
            if in_flight == 0:
                return
            if time.monotonic() > deadline:
                log.warning(
                    "%s still has %d in flight after %.0fs of draining; removing it",
                    name,
                    in_flight,
                    timeout,
                )
                return
            await asyncio.sleep(DRAIN_POLL)


def upstream_body(
    name: str, address: Address, admin: Address | None, health_path: str
) -> dict[str, Any]:
    """The JSON a router's ``POST /upstreams`` takes."""
    return {
        "name": name,
        "address": str(address),
        "admin": None if admin is None else str(admin),
        "health_path": health_path,
    }
