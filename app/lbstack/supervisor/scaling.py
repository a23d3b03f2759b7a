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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lbstack.client import AdminClient
from lbstack.errors import APIConnectionError, APIStatusError, ControlError
from lbstack.log import get_logger
from lbstack.supervisor.topology import server_upstream

if TYPE_CHECKING:
    from lbstack.config import GroupLayout
    from lbstack.supervisor.child import Child
    from lbstack.supervisor.membership import Membership
    from lbstack.supervisor.topology import Topology

log = get_logger("supervisor")
DRAIN_POLL = 0.1
MAX_SERVERS = 1024


async def call_router(router: Child, method: str, path: str, body: Any = None) -> Any:
    """One admin call to a router; a refusal or silence is a ControlError."""
    assert router.admin is not None
    try:
        return await AdminClient(router.admin).request(method, path, body)
    except APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise ControlError(f"{router.name} did not answer {method} {path}: {cause!r}") from exc
    except APIStatusError as exc:
        refused = f"{router.name} refused {method} {path} ({exc.status}): {exc.body}"
        raise ControlError(refused) from exc


class Scaler:
    """Server counts and drains of one stack's groups.

    Like gunicorn's ``manage_workers``, a size is a target: ``converge`` steps the group
    one server at a time until what runs is what is wanted, reading the group anew
    before each step. A manual scale, a reload and the autoscaler all set targets.
    """

    def __init__(
        self,
        topology: Topology,
        membership: Membership,
        on_step: Callable[[str, str], None],
    ) -> None:
        """``on_step(group, "up" | "down")`` counts a scale step (a surge is not one)."""
        self._topology = topology
        self._membership = membership
        self._on_step = on_step
        self._manual_at: dict[str, float] = {}

    def held(self, group: str, hold: float) -> bool:
        """Whether a manual scale of ``group`` less than ``hold`` ago still stands."""
        at = self._manual_at.get(group)
        return at is not None and time.monotonic() - at < hold

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
        async with self._membership.change(f"{verb} {name}"):
            routers = self._topology.routers_of(name)
            if draining and not force:
                for router in routers:
                    await self._refuse_last(router, name)
            for router in routers:
                await call_router(router, "POST", f"/upstreams/{name}/{verb}")
            self._topology.children[name].draining = draining
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
        layouts = {layout.name: layout for layout in self._topology.config.layouts()}
        layout = layouts.get(group)
        if layout is None:
            raise ControlError(f"no group named {group!r}; groups: {', '.join(layouts)}")
        if layout.server.kind in ("address", "dns"):
            found = "addresses" if layout.server.kind == "address" else "found by DNS"
            raise ControlError(
                f"{group}'s servers are {found}: something else runs them, and "
                "lbstack cannot start or stop them"
            )
        if layout not in self._topology.placement.local_groups():
            raise ControlError(
                f"{group} is scaled on the host that runs its proxy: this one runs "
                f"tier={self._topology.config.tier}"
            )
        if not 1 <= servers <= MAX_SERVERS:
            raise ControlError(f"expected 1 to {MAX_SERVERS} servers, found {servers}")
        async with self._membership.change(f"scale {group}"):
            self._manual_at[group] = time.monotonic()
            try:
                return await self.converge(layout, servers)
            finally:  # the hold counts from the end of the change, however long
                self._manual_at[group] = time.monotonic()

    async def converge(self, layout: GroupLayout, servers: int) -> dict[str, Any]:
        """Step the group until it runs ``servers`` servers; the caller holds a change.

        A new server is ready before its proxy knows of it; an old one (the newest
        first) is drained and idle before it stops. A step that fails stops here,
        raising ControlError, with the group as the steps before it left it."""
        while True:
            current = self._topology.servers_in(layout.index)
            if len(current) < servers:
                await self.grow(layout.index)
            elif len(current) > servers:
                await self.shrink(current[-1])
            else:
                break
        names = [c.name for c in current]
        log.info("%s now has %d servers: %s", layout.name, len(names), ", ".join(names))
        return {"group": layout.name, "servers": names}

    async def grow(self, group: int, *, step: bool = True) -> Child:
        """Start one new server in ``group`` and add it to its proxy; the new server.

        ``step``: count it as a scale step (a reload's surge is not one)."""
        topology = self._topology
        proxy = topology.proxy_of(group)
        child = topology.add_server(group)
        child.start()
        if not await child.wait_ready():
            await self._stop(child)
            raise ControlError(f"{child.name} did not become ready: {child.last_exit}")
        await call_router(proxy, "POST", "/upstreams", self.upstream_spec(child))
        if step:
            self._on_step(proxy.name, "up")
        log.info("added %s to %s", child.name, proxy.name)
        return child

    def upstream_spec(self, child: Child) -> dict[str, Any]:
        """What a router's ``POST /upstreams`` takes for the server ``child``."""
        assert child.group is not None
        health_path = self._topology.config.group(child.group).server.health_path
        spec = server_upstream(child, health_path)
        return spec.model_dump(mode="json", exclude={"draining"})  # a new one: not drained

    async def shrink(self, child: Child, *, step: bool = True) -> None:
        """Drain ``child``, wait until its proxy has nothing in flight to it, remove it."""
        assert child.group is not None
        proxy = self._topology.proxy_of(child.group)
        await call_router(proxy, "POST", f"/upstreams/{child.name}/drain")
        child.draining = True
        timeout = self._topology.config.supervisor.graceful_timeout
        await self._until_idle(proxy, child.name, timeout)
        await call_router(proxy, "DELETE", f"/upstreams/{child.name}")
        await self._stop(child)
        if step:
            self._on_step(proxy.name, "down")
        log.info("removed %s from %s", child.name, proxy.name)

    async def _stop(self, child: Child) -> None:
        await child.stop(self._topology.config.supervisor.graceful_timeout + 1.0)
        self._topology.remove(child)

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
