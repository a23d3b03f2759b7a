"""Reload and rolling restart: replace children one at a time, new before old.

A child is replaced in one of two ways, and neither fails a client request:

* **Handover** (our own children: balancers, proxies, simulated servers). The
  supervisor holds every listening socket, so the successor starts on the very same
  data sockets, with an admin socket of its own, and must be ready before anything
  else happens. It then takes over the admin path (an atomic rename), and the old
  process gets SIGTERM and drains: it stops accepting (connections not yet accepted
  are the successor's), says ``Connection: close`` on every response, and keeps idle
  connections open for ``drain_window`` (see ``app/lbstack/worker.py``). Once it reports
  draining, the routers in front of it recycle their pools: they close their idle
  connections to it themselves (a close we make can't race a request of ours), and
  every new connection reaches the successor.
* **Surge** (servers the user's command runs: each binds its own socket, so two can't
  share one): a new server joins the group as in a scale step, then the old one is
  drained and removed.

A reload re-reads the config the stack was started with (file and flags), validates
it, and replaces exactly the children whose part of it changed; group sizes and the
number of balancers follow the new config. What can't change while running (run dir,
listeners, metrics endpoint, number of proxies) is refused with the reason, and an
invalid config is refused with its error: either way nothing changes.

Certificates are reloaded in process, not by replacing balancers: with https
listeners, every reload first has each balancer read its certificates again
(``POST /tls/reload`` with the new ``[tls]``, see ``app/lbstack/tiers/balancer.py``). New handshakes
get the certificates as the files are now; established connections keep going.
Validating the config checked those files already; should a balancer still fail to
load them, it keeps its own and the reload is rolled back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp

from lbstack.client import AdminClient, fetch
from lbstack.config import Config
from lbstack.errors import APIConnectionError, APIStatusError, ControlError
from lbstack.identity import ChildId, Role
from lbstack.log import get_logger
from lbstack.supervisor.scaling import call_router
from lbstack.supervisor.topology import Placement

if TYPE_CHECKING:
    from lbstack.supervisor.child import Child
    from lbstack.supervisor.membership import Membership
    from lbstack.supervisor.scaling import Scaler
    from lbstack.supervisor.topology import Topology

log = get_logger("supervisor")

# Changing these means new sockets or a new topology: stop the stack and start it.
FIXED = ("run_dir", "tier", "network", "listen", "metrics_listen", "proxies")
DRAINING_TIMEOUT = 5.0
DRAINING_POLL = 0.02
TLS_RELOAD = "/tls/reload"  # a balancer's (app/lbstack/tiers/balancer.py)


class Reloader:
    """Reloads and rolling restarts of one supervisor's stack, one at a time."""

    def __init__(
        self,
        topology: Topology,
        membership: Membership,
        scaler: Scaler,
        source: Callable[[], Config] | None,
        on_replaced: Callable[[Child], None],
        on_config: Callable[[], None],
    ) -> None:
        """``source`` re-reads the config (file and flags); ``on_replaced`` counts a
        replacement; ``on_config`` follows a new config (after a reload)."""
        self._topology = topology
        self._membership = membership
        self._scaler = scaler
        self._source = source
        self._on_replaced = on_replaced
        self._on_config = on_config

    # ---- reload ----------------------------------------------------------------------

    async def reload(self, *, dry_run: bool = False) -> dict[str, Any]:
        """Apply the config as it is now on disk; what changed, in a JSON-able dict.
        With ``dry_run``, what would change, and nothing is done.

        ``ConfigError`` for an invalid config, ``ControlError`` for a change that needs
        a restart of the stack or a successor that did not come up.
        """
        if self._source is None:
            raise ControlError("this stack was not started from a config it can re-read")
        new = self._source()  # ConfigError: refused, nothing changed
        old = self._topology.config
        refusals = [
            f"{field}: changing it needs a restart of the stack "
            f"(running {_show(getattr(old, field))}, new config {_show(getattr(new, field))})"
            for field in FIXED
            if getattr(old, field) != getattr(new, field)
        ]
        if refusals:
            raise ControlError("reload refused: " + "; ".join(refusals))
        https = _https(new)
        if dry_run:
            plan: dict[str, Any] = {
                "dry_run": True,
                "replaced": [c.name for c in self._changed(old, new)],
                "balancers": self._balancer_changes(new.balancers),
                "scaled": self._group_sizes(new),
            }
            if https:
                plan["certificates"] = [c.name for c in self._balancers()]
            return plan
        async with self._membership.change("reload"):
            changed = self._changed(old, new)
            self._topology.apply(new)
            done: list[Child] = []  # the children running the new config so far
            try:
                certificates = await self._reload_certificates(new) if https else []
                replaced = await self._replace_all(changed, done)
                balancers = await self._set_balancers(new.balancers)
                scaled = await self._resize_groups(new)
            except ControlError as exc:
                raise ControlError(
                    f"reload failed: {exc}; {await self._roll_back(old, done)}"
                ) from exc
        self._on_config()
        summary: dict[str, Any] = {"replaced": replaced, "balancers": balancers, "scaled": scaled}
        if https:
            summary["certificates"] = certificates
        log.info(
            "reload done: %s",
            "nothing changed"
            if not any(summary.values())
            else ", ".join(f"{k} {v}" for k, v in summary.items() if v),
        )
        return summary

    def _changed(self, old: Config, new: Config) -> list[Child]:
        """The children whose part of the config differs, in replacement order."""
        return _ordered([c for c in self._topology if _view(old, c) != _view(new, c)])

    async def _roll_back(self, old: Config, done: list[Child]) -> str:
        """Put ``old`` back everywhere a failed reload changed something; what it did."""
        self._topology.apply(old)
        try:
            back = await self._replace_all(_ordered(done), [])
            await self._set_balancers(old.balancers)
            await self._resize_groups(old)
            if _https(old):
                await self._reload_certificates(old)
        except ControlError as exc:
            log.error("rolling back the reload failed: %s", exc)
            return f"rolling back failed too ({exc}): `lbstack status` shows what runs"
        if not back:
            return "nothing was changed"
        return f"rolled back: {', '.join(back)} run the previous config again"

    async def _reload_certificates(self, config: Config) -> list[str]:
        """Every ready balancer serves the certificates ``config`` names, read from the
        files now (one starting meanwhile reads them as it starts); the balancers that
        did. ``ControlError`` at the first that refused, which keeps its own."""
        done = []
        for balancer in self._balancers():
            if balancer.state == "ready":
                await _post_tls(balancer, config)
                done.append(balancer.name)
        return done

    # ---- rolling restart -------------------------------------------------------------

    async def restart(self, names: list[str]) -> dict[str, Any]:
        """Replace ``names`` (every child when empty) one at a time, servers first."""
        async with self._membership.change("restart"):
            children = self._topology.children
            unknown = [n for n in names if n not in children]
            if unknown:
                raise ControlError(
                    f"no component named {', '.join(unknown)}; known: {', '.join(children)}"
                )
            chosen = [children[n] for n in names] if names else list(children.values())
            replaced = await self._replace_all(_ordered(chosen), [])
        log.info("rolling restart done: %d replaced", len(replaced))
        return {"replaced": replaced}

    # ---- the steps -------------------------------------------------------------------

    async def _replace_all(self, children: list[Child], done: list[Child]) -> list[str]:
        """Replace ``children`` in order; each successor is appended to ``done`` as soon
        as it serves, so a failure midway leaves what changed there."""
        replaced: list[str] = []
        for child in children:
            if child.role is Role.SERVER and child.admin is None:  # the user's command
                new = await self._surge(child)
                replaced.append(f"{child.name}->{new.name}")
            else:
                new = await self._hand_over(child)
                replaced.append(child.name)
            done.append(new)
        return replaced

    async def _hand_over(self, old: Child) -> Child:
        topology = self._topology
        timeout = topology.config.supervisor.graceful_timeout + 1.0
        new = topology.plan_successor(old)
        new.start()
        if not await new.wait_ready():
            await new.stop(timeout)
            topology.release(new)  # its successor admin socket goes
            raise ControlError(
                f"{old.name}'s successor did not become ready ({new.last_exit}); "
                f"{old.name} kept as it was"
            )
        old_pid = old.pid
        topology.take_over(new, old)
        stopping = asyncio.create_task(old.stop(timeout), name=f"stop old {old.name}")
        await _until_draining(old, stopping)
        for router in topology.routers_in_front(old):
            try:
                await call_router(router, "POST", f"/upstreams/{old.name}/recycle")
            except ControlError as exc:  # its pool then drains by Connection: close alone
                log.warning("recycling %s's pool: %s", old.name, exc)
        await stopping
        topology.release(old)
        self._on_replaced(new)
        log.info("%s replaced: pid %s -> %s", old.name, old_pid, new.pid)
        return new

    async def _surge(self, old: Child) -> Child:
        """A new server beside ``old``, then ``old`` drained and removed; the new one."""
        assert old.group is not None
        new = await self._scaler.grow(old.group, step=False)
        await self._scaler.shrink(old, step=False)
        self._on_replaced(new)
        log.info("%s replaced by %s", old.name, new.name)
        return new

    def _balancers(self) -> list[Child]:
        return self._topology.of_role(Role.BALANCER)

    def _balancer_changes(self, count: int) -> list[str]:
        """The balancers started (+) and stopped (-) to have ``count``."""
        current = self._balancers()
        return [f"+{ChildId.balancer(i).name}" for i in range(len(current), count)] + [
            f"-{c.name}" for c in reversed(current[count:])
        ]

    async def _set_balancers(self, count: int) -> list[str]:
        """Start or stop balancers until there are ``count``; what changed."""
        changes = self._balancer_changes(count)
        current = self._balancers()
        for index in range(len(current), count):
            await self._start_balancer(index)
        for child in reversed(current[count:]):
            await self._stop_balancer(child)
        return changes

    async def _start_balancer(self, index: int) -> None:
        """One more balancer on the shared listeners, ready."""
        child = self._topology.add_balancer(index)
        child.start()
        if not await child.wait_ready():
            await self._stop_balancer(child)
            raise ControlError(f"{child.name} did not become ready: {child.last_exit}")

    async def _stop_balancer(self, child: Child) -> None:
        """A balancer stopped for good; the shared listeners stay with the others."""
        await child.stop(self._topology.config.supervisor.graceful_timeout + 1.0)
        self._topology.remove(child)

    def _group_sizes(self, config: Config) -> dict[str, int]:
        """The groups without autoscaling whose size differs from ``config``'s: the size."""
        return {
            layout.name: layout.servers
            for layout in Placement(config).local_groups()
            if not layout.autoscale.enabled
            and len(self._topology.servers_in(layout.index)) != layout.servers
        }

    async def _resize_groups(self, config: Config) -> dict[str, int]:
        """Groups without autoscaling get the size the config says; what changed."""
        scaled = self._group_sizes(config)
        layouts = {layout.name: layout for layout in config.layouts()}
        for name, servers in scaled.items():
            await self._scaler.converge(layouts[name], servers)
        return scaled


async def _until_draining(old: Child, stopping: asyncio.Task[None]) -> None:
    """Until ``old`` says it drains (it no longer accepts), has exited, or a timeout."""
    assert old.admin is not None
    deadline = time.monotonic() + DRAINING_TIMEOUT
    while not stopping.done() and time.monotonic() < deadline:
        try:
            status, body = await fetch(old.admin, "/readyz", timeout=1.0)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return  # gone already
        if status == 503 and b"draining" in body:
            return
        await asyncio.sleep(DRAINING_POLL)


def _https(config: Config) -> bool:
    """Whether the balancers terminate TLS (serve certificates)."""
    return any(address.is_tls for address in config.listen)


async def _post_tls(balancer: Child, config: Config) -> None:
    """Have ``balancer`` serve the certificates ``config`` names, read from the files."""
    assert balancer.admin is not None
    try:
        await AdminClient(balancer.admin).request(
            "POST", TLS_RELOAD, config.tls.model_dump(mode="json")
        )
    except APIConnectionError as exc:
        cause = exc.__cause__ or exc
        raise ControlError(f"{balancer.name} did not answer POST {TLS_RELOAD}: {cause!r}") from exc
    except APIStatusError as exc:
        raise ControlError(f"{balancer.name}: {exc.message}") from exc


def _ordered(children: list[Child]) -> list[Child]:
    """Servers, then proxies, then balancers: each tier's routers outlive its changes."""
    return sorted(children, key=lambda c: c.role.tier)


def _view(config: Config, child: Child) -> Any:
    """The part of ``config`` that ``child`` runs on: it is replaced when this changes."""
    supervisor = config.supervisor
    common = (
        supervisor.log_level,
        supervisor.graceful_timeout,
        supervisor.drain_window,
        config.admin.model_dump(mode="json"),  # its token is read as it starts
        config.discovery.model_dump(mode="json"),
    )
    if child.role is Role.BALANCER:
        return (common, config.balancer.model_dump(mode="json"), config.balancers)
    assert child.group is not None
    server = config.group(child.group).server
    if child.role is Role.PROXY:
        return (
            common,
            config.proxy.model_dump(mode="json"),
            server.kind,
            server.health_path,
            [str(a) for a in server.addresses],
            str(server.discover),
        )
    return (common, server.model_dump(mode="json"))


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)
