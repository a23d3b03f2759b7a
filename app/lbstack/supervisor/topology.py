"""The stack as the supervisor plans it: which children there are, their sockets, and
what each is launched with.

This is the model every part of the supervisor reads and the changes (scaling, reload,
upgrade) edit; it starts and stops nothing itself. Sockets are bound here, once, and
every (re)start of a child inherits them, so a restarted child gets the very same
socket and a client sees no refused connection. Identities are ``ChildId``s: nothing
here or above parses a name.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import signal
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from lbstack import sockets
from lbstack.address import Address, parse_address
from lbstack.component import ChildSpec, UpstreamSpec
from lbstack.config import Config, GroupLayout
from lbstack.errors import ControlError, LbstackError
from lbstack.identity import ChildId, Role
from lbstack.rundir import RunDir
from lbstack.supervisor.child import Child, Launch, python_argv

PR_SET_PDEATHSIG = 1
# What each ``tier`` runs on this host.
TIER_ROLES: dict[str, frozenset[Role]] = {
    "all": frozenset(Role),
    "balancer": frozenset({Role.BALANCER}),
    "proxy": frozenset({Role.PROXY, Role.SERVER}),
    "server": frozenset({Role.SERVER}),
}


@dataclass(frozen=True)
class Hooks:
    """What the topology tells whoever runs the stack."""

    on_give_up: Callable[[Child, str], None]  # a child could not be started
    on_restart: Callable[[Child], None]  # a child died and is started again
    on_added: Callable[[Child], None]  # a child joined the topology
    on_changed: Callable[[], None]  # the set of children changed (after add or remove)


class BoundSockets:
    """Every socket the supervisor holds, by address; children inherit their fds."""

    def __init__(self) -> None:
        self._held: dict[Address, socket.socket] = {}

    def bind(self, address: Address, mode: int) -> socket.socket:
        """The socket bound at ``address``: bound now unless held already."""
        sock = self._held.get(address)
        if sock is None:
            sock = self._held[address] = sockets.bind(address, mode)
        return sock

    def fds(self, addresses: Iterable[Address]) -> tuple[int, ...]:
        return tuple(self._held[a].fileno() for a in addresses)

    def get(self, address: Address) -> socket.socket:
        return self._held[address]

    def move(self, source: Address, target: Address) -> None:
        """The socket held at ``source`` is now known as ``target`` (its path was renamed)."""
        self._held[target] = self._held.pop(source)

    def forget(self, address: Address) -> None:
        """Stop holding ``address`` without closing it (its path is gone already)."""
        self._held.pop(address, None)

    def close(self, address: Address) -> None:
        """Close the socket at ``address`` and remove its path."""
        sock = self._held.pop(address, None)
        if sock is not None:
            sock.close()
            sockets.unlink(address)

    def close_all(self) -> None:
        for address in list(self._held):
            self.close(address)

    def take(self, inherited: Mapping[str, int]) -> None:
        """Hold the sockets a previous image bound, by their inherited descriptors."""
        for text, descriptor in inherited.items():
            sock = socket.socket(fileno=descriptor)
            sock.set_inheritable(False)  # children get theirs through pass_fds
            self._held[parse_address(text)] = sock

    def descriptors(self) -> dict[str, int]:
        """Address -> descriptor, for the image an upgrade execs."""
        return {str(address): sock.fileno() for address, sock in self._held.items()}


@dataclass(frozen=True)
class Placement:
    """What runs on this host, as ``tier`` says, and where other hosts reach it."""

    config: Config

    def runs(self, role: Role) -> bool:
        """Whether this host runs children of ``role`` (``tier`` says which)."""
        return role in TIER_ROLES[self.config.tier]

    def local_groups(self) -> list[GroupLayout]:
        """The groups whose proxy runs here and whose servers we start: the ones that
        can be scaled here."""
        if not self.runs(Role.PROXY):
            return []
        return [g for g in self.config.layouts() if g.server.kind in ("simulated", "command")]

    def network_addresses(self, id: ChildId) -> tuple[Address | None, Address | None]:
        """Where other hosts reach ``id``: its data and admin TCP addresses, when this host
        runs one tier. The k-th proxy or server listens at ``network.port`` + k, balancer
        k at none (the balancers share ``listen``); every admin is ``admin_offset`` above."""
        tier, network = self.config.tier, self.config.network
        if tier == "all" or (tier == "proxy" and id.role is Role.SERVER):
            return None, None
        k = id.group if id.role is Role.PROXY and id.group is not None else id.index
        data = None if id.role is Role.BALANCER else _tcp(network.bind, network.port + k)
        return data, _tcp(network.bind, network.port + k + network.admin_offset)


class Topology:
    """The children of one stack, their sockets and how each is launched."""

    def __init__(self, config: Config, run_dir: RunDir, hooks: Hooks) -> None:
        self.config = config
        self.run_dir = run_dir
        self.sockets = BoundSockets()
        self.children: dict[str, Child] = {}
        self.retiring: list[Child] = []  # replaced children still draining
        self._hooks = hooks
        self._foreign: list[Address] = []  # sockets our command-run servers create

    # ---- reading -------------------------------------------------------------------

    @property
    def placement(self) -> Placement:
        return Placement(self.config)

    def of_role(self, role: Role) -> list[Child]:
        """The children of ``role``, in group and index order."""
        found = (c for c in self.children.values() if c.role is role)
        return sorted(found, key=lambda c: c.id.sort_key)

    def servers_in(self, group: int) -> list[Child]:
        """Group ``group``'s server children, in index order."""
        return [c for c in self.of_role(Role.SERVER) if c.group == group]

    def tiers(self) -> list[list[Child]]:
        """Servers, proxies, balancers: the order tiers start in (and stop in reverse)."""
        return [self.of_role(role) for role in Role]

    def routers_of(self, name: str) -> list[Child]:
        """The routers that send traffic to ``name``: a server's proxy, or every balancer."""
        target = self.children.get(name)
        if target is None or target.role is Role.BALANCER:
            known = ", ".join(n for n, c in self.children.items() if c.role is not Role.BALANCER)
            raise ControlError(f"no server or proxy named {name!r}; known: {known}")
        if target.role is Role.PROXY:
            return self.of_role(Role.BALANCER)
        return [c for c in self.of_role(Role.PROXY) if c.group == target.group]

    def routers_in_front(self, child: Child) -> list[Child]:
        """The routers that send traffic to ``child`` (none for a balancer)."""
        return [] if child.role is Role.BALANCER else self.routers_of(child.name)

    def proxy_of(self, group: int) -> Child:
        return self.children[ChildId.proxy(group).name]

    def __iter__(self) -> Iterator[Child]:
        return iter(self.children.values())

    # ---- planning ------------------------------------------------------------------

    def prepare(self) -> None:
        """Check every path will fit, make the run dir, bind the balancers' listeners."""
        layouts = self.config.layouts()
        longest = max(
            [ChildId.balancer(self.config.balancers - 1).name]
            + [ChildId.server(g.index, g.servers - 1).name for g in layouts],
            key=len,
        )
        self.run_dir.check_length(longest)
        self.run_dir.prepare()
        if self.placement.runs(Role.BALANCER):
            for address in (self.run_dir.balancer, *self.config.listen):
                self.sockets.bind(address, sockets.DATA_MODE)

    def plan(self, running: Iterable[str] = ()) -> None:
        """Every child of this host's tier; a group's servers are those ``running``
        (names an upgraded image adopts: scale steps change count and names) if any."""
        ids = [ChildId.parse(name) for name in running]
        if self.placement.runs(Role.SERVER):
            for layout in self.config.layouts():
                here = [i.index for i in ids if i.role is Role.SERVER and i.group == layout.index]
                for index in here or range(layout.servers):
                    self._add(self._plan_server(layout, index))
        if self.placement.runs(Role.PROXY):
            for layout in self.config.layouts():
                self._add(self._plan_proxy(layout))
        if self.placement.runs(Role.BALANCER):
            for index in range(self.config.balancers):
                self._add(self._plan_balancer(index))
        self._hooks.on_changed()

    def add_server(self, group: int) -> Child:
        """Bind and register (not start) the next server of ``group``."""
        index = 1 + max((c.id.index for c in self.servers_in(group)), default=-1)
        self.run_dir.check_length(ChildId.server(group, index).name)
        child = self._plan_server(self.config.group(group), index)
        assert child is not None  # address groups are refused before this
        self._add(child)
        self._hooks.on_changed()
        return child

    def add_balancer(self, index: int) -> Child:
        """Register (not start) one more balancer on the shared listeners."""
        child = self._plan_balancer(index)
        self._add(child)
        self._hooks.on_changed()
        return child

    def remove(self, child: Child) -> None:
        """Forget a stopped child and release every socket of its own."""
        self.children.pop(child.name, None)
        own = child.listen if child.role is Role.SERVER else []
        for address in (*own, *([child.admin] if child.admin else [])):
            self.sockets.close(address)
        self._hooks.on_changed()

    def _add(self, child: Child | None) -> None:
        if child is not None:
            self.children[child.name] = child
            self._hooks.on_added(child)

    def _child(
        self,
        id: ChildId,
        listen: list[Address],
        admin: Address | None,
        launch: Callable[[], Launch],
        ready_check: tuple[Address, str],
    ) -> Child:
        return Child(
            id=id,
            listen=listen,
            admin=admin,
            launch=launch,
            ready_check=ready_check,
            settings=self.config.supervisor,
            on_give_up=self._hooks.on_give_up,
            on_restart=self._hooks.on_restart,
        )

    def _builtin(
        self,
        id: ChildId,
        listen: list[Address],
        upstreams: Callable[[], tuple[UpstreamSpec, ...]] = tuple,
        admin: Address | None = None,
        peers: Callable[[], tuple[Address, ...]] = tuple,
    ) -> Child:
        """A child running our own code (``python -m lbstack.worker``) on bound sockets.

        Its admin socket is ``admin`` (default: its own name's); every (re)start
        inherits whatever socket ``child.admin`` names then, which a handover changes.
        """
        data_tcp, admin_tcp = self.placement.network_addresses(id)
        listen = [*listen, *([data_tcp] if data_tcp else [])]
        for address in listen:
            self.sockets.bind(address, sockets.DATA_MODE)
        admin = admin or self.run_dir.admin(id.name)
        self.sockets.bind(admin, sockets.ADMIN_MODE)
        if admin_tcp is not None:
            self.sockets.bind(admin_tcp, sockets.ADMIN_MODE)
        itself: list[Child] = []

        def launch() -> Launch:
            spec = ChildSpec(
                name=id.name,
                role=id.role,
                group=id.group,
                listen_fds=self.sockets.fds(listen),
                tls_fds=self.sockets.fds(a for a in listen if a.is_tls),
                admin_fd=self.sockets.fds([itself[0].admin or admin])[0],
                admin_tcp_fd=None if admin_tcp is None else self.sockets.fds([admin_tcp])[0],
                upstreams=upstreams(),
                peers=peers(),
                parent_pid=os.getpid(),
                config=self.config,
            )
            return Launch(
                argv=python_argv(),
                env={**os.environ, **spec.to_env()},
                pass_fds=(
                    *spec.listen_fds,
                    spec.admin_fd,
                    *([spec.admin_tcp_fd] if spec.admin_tcp_fd is not None else []),
                ),
            )

        child = self._child(id, listen, admin, launch, (admin, "/readyz"))
        itself.append(child)
        return child

    def _plan_server(
        self, layout: GroupLayout, index: int, admin: Address | None = None
    ) -> Child | None:
        id = ChildId.server(layout.index, index)
        server = layout.server
        if server.kind == "simulated":
            return self._builtin(id, [self.run_dir.data(id.name)], admin=admin)
        if server.kind in ("address", "dns"):
            return None
        data = self.run_dir.data(id.name)
        self._foreign.append(data)  # its command binds it; launch clears a stale one
        argv = [
            part.replace("{socket}", data.path).replace("{name}", id.name)
            for part in shlex.split(server.command)
        ]

        def launch() -> Launch:
            sockets.clear_stale(data.path)
            return Launch(argv=argv, env=dict(os.environ), preexec_fn=die_with_parent)

        return self._child(id, [data], None, launch, (data, server.health_path))

    def _plan_proxy(self, layout: GroupLayout, admin: Address | None = None) -> Child:
        id = ChildId.proxy(layout.index)
        listen = [self.run_dir.data(id.name)]
        return self._builtin(
            id,
            listen,
            upstreams=lambda: group_upstreams(
                self.config.group(layout.index), self.servers_in(layout.index)
            ),
            admin=admin,
        )

    def _plan_balancer(self, index: int, admin: Address | None = None) -> Child:
        def proxies() -> tuple[UpstreamSpec, ...]:
            return tuple(
                UpstreamSpec(name=c.name, address=c.listen[0], admin=c.admin, draining=c.draining)
                for c in self.of_role(Role.PROXY)
            )

        def peers() -> tuple[Address, ...]:
            # The other balancers' admin sockets, whose load views this one folds in.
            count = self.config.balancers
            return tuple(
                self.run_dir.admin(ChildId.balancer(i).name) for i in range(count) if i != index
            )

        listen = [self.run_dir.balancer, *self.config.listen]
        return self._builtin(ChildId.balancer(index), listen, proxies, admin, peers=peers)

    # ---- handover: a child replaced by a successor on the same sockets -----------------

    def plan_successor(self, old: Child) -> Child:
        """Bind a successor admin socket and plan (not start) ``old``'s successor.

        It shares ``old``'s data sockets and gets the config as it is now.
        """
        admin = self.run_dir.successor_admin(old.name)
        sockets.clear_stale(admin.path)  # a leftover of an interrupted reload
        self.sockets.forget(admin)
        if old.role is Role.BALANCER:
            return self._plan_balancer(old.id.index, admin)
        assert old.group is not None
        layout = self.config.group(old.group)
        if old.role is Role.PROXY:
            return self._plan_proxy(layout, admin)
        child = self._plan_server(layout, old.id.index, admin)
        assert child is not None
        return child

    def take_over(self, new: Child, old: Child) -> None:
        """Point ``old``'s admin path at ``new``; ``old`` stays reachable at its retiring
        path while it drains. The path never stops answering: a hard link keeps the old
        socket there until the rename puts the new one in its place, atomically."""
        assert new.admin is not None and old.admin is not None
        canonical, successor = old.admin, new.admin
        retiring = self.run_dir.retiring_admin(old.name)
        sockets.clear_stale(retiring.path)
        os.link(canonical.path, retiring.path)
        os.rename(successor.path, canonical.path)
        self.sockets.move(canonical, retiring)
        self.sockets.move(successor, canonical)
        old.admin, old.ready_check = retiring, (retiring, "/readyz")
        new.admin, new.ready_check = canonical, (canonical, "/readyz")
        new.draining = old.draining  # the routers' drain is by name: it still stands
        self.children[new.name] = new
        self.retiring.append(old)

    def release(self, child: Child) -> None:
        """Forget a stopped handover party (a drained predecessor, or a successor that never
        took over): close and remove the admin socket it was left with."""
        self.retiring = [c for c in self.retiring if c is not child]
        if child.admin is not None:
            self.sockets.close(child.admin)

    def apply(self, config: Config) -> None:
        """Make ``config`` the one new and restarted children run with."""
        self.config = config
        for child in self.children.values():
            child.settings = config.supervisor

    def close(self) -> None:
        """Every socket closed and every path removed (the children have stopped)."""
        self.sockets.close_all()
        for address in self._foreign:
            try:
                sockets.clear_stale(address.path)
            except LbstackError:  # still held by something else: leave it
                continue


def group_upstreams(layout: GroupLayout, servers: list[Child]) -> tuple[UpstreamSpec, ...]:
    """A proxy's upstreams: its group's ``servers`` as they run now, or the addresses the
    config gives (none for a group found by DNS: the proxy follows the name itself)."""
    server = layout.server
    if server.kind == "dns":
        return ()
    if server.kind == "address":
        return tuple(
            UpstreamSpec(
                name=ChildId.server(layout.index, i).name,
                address=address,
                health_path=server.health_path,
            )
            for i, address in enumerate(server.addresses)
        )
    return tuple(server_upstream(c, server.health_path) for c in servers)


def server_upstream(child: Child, health_path: str) -> UpstreamSpec:
    """A server child as its proxy's upstream: where it listens and answers its admin
    API, and whether it is drained."""
    return UpstreamSpec(
        name=child.name,
        address=child.listen[0],
        admin=child.admin,
        health_path=health_path,
        draining=child.draining,
    )


def _tcp(host: str, port: int) -> Address:
    return Address("tcp", host=host, port=port)


def die_with_parent() -> None:
    """preexec hook: SIGTERM this child when the supervisor dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
