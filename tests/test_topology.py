"""The supervisor's model of a stack: identities, children and sockets, handover, and the
membership lock. No process runs here: the topology plans, binds and forgets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lbstack.address import Address
from lbstack.config import Config
from lbstack.identity import ChildId, Role
from lbstack.rundir import RunDir
from lbstack.supervisor.child import Child
from lbstack.supervisor.membership import Membership
from lbstack.supervisor.topology import Hooks, Topology
from tests.harness import short_tmpdir


@pytest.mark.parametrize(
    ("name", "identity"),
    [
        ("balancer-0", ChildId(Role.BALANCER, None, 0)),
        ("balancer-12", ChildId(Role.BALANCER, None, 12)),
        ("proxy-3", ChildId(Role.PROXY, 3, 3)),
        ("server-0-2", ChildId(Role.SERVER, 0, 2)),
        ("server-10-11", ChildId(Role.SERVER, 10, 11)),
    ],
)
def test_a_name_and_its_identity_are_one_another(name: str, identity: ChildId) -> None:
    assert ChildId.parse(name) == identity
    assert identity.name == name == str(identity)


@pytest.mark.parametrize(
    "name", ["server-0", "proxy-0-1", "balancer-0-1", "supervisor", "server-a-1", "proxy-", ""]
)
def test_a_name_that_is_no_child_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="not a child's name"):
        ChildId.parse(name)


def test_identities_sort_by_tier_then_group_then_index() -> None:
    ids = [
        ChildId.balancer(1),
        ChildId.proxy(1),
        ChildId.server(1, 0),
        ChildId.balancer(0),
        ChildId.server(0, 10),
        ChildId.server(0, 2),
        ChildId.proxy(0),
    ]
    assert [i.name for i in sorted(ids, key=lambda i: i.sort_key)] == [
        "server-0-2",
        "server-0-10",
        "server-1-0",
        "proxy-0",
        "proxy-1",
        "balancer-0",
        "balancer-1",
    ]
    assert ChildId.server(2, 5).group_name == "proxy-2"
    assert ChildId.balancer(0).group_name is None


class Recorded:
    """What the topology told its hooks."""

    def __init__(self) -> None:
        self.added: list[str] = []
        self.changes = 0

    def hooks(self) -> Hooks:
        def added(child: Child) -> None:
            self.added.append(child.name)

        def changed() -> None:
            self.changes += 1

        return Hooks(
            on_give_up=lambda child, message: None,
            on_restart=lambda child: None,
            on_added=added,
            on_changed=changed,
        )


@pytest.fixture
def run_dir() -> Iterator[Path]:
    path = short_tmpdir()
    yield path / "run"
    shutil.rmtree(path)


def _topology(run_dir: Path, recorded: Recorded, **config: object) -> Topology:
    settings = Config.model_validate(
        {"proxies": 2, "servers_per_proxy": 2, "balancers": 2, **config}
    )
    topology = Topology(settings, RunDir(run_dir), recorded.hooks())
    topology.prepare()
    return topology


def test_a_planned_stack_has_every_child_with_its_sockets_bound(run_dir: Path) -> None:
    recorded = Recorded()
    topology = _topology(run_dir, recorded)
    topology.plan()
    assert [[c.name for c in tier] for tier in topology.tiers()] == [
        ["server-0-0", "server-0-1", "server-1-0", "server-1-1"],
        ["proxy-0", "proxy-1"],
        ["balancer-0", "balancer-1"],
    ]
    assert sorted(recorded.added) == sorted(topology.children)
    assert recorded.changes == 1
    for child in topology:
        assert child.admin is not None and os.path.exists(child.admin.path), child.name
        assert all(os.path.exists(a.path) for a in child.listen), child.name
    assert [c.name for c in topology.routers_of("server-1-0")] == ["proxy-1"]
    assert [c.name for c in topology.routers_of("proxy-0")] == ["balancer-0", "balancer-1"]
    assert topology.routers_in_front(topology.children["balancer-0"]) == []
    topology.close()
    assert not list(run_dir.glob("*.sock"))


def test_an_upgraded_image_plans_the_servers_that_run_not_the_configured_count(
    run_dir: Path,
) -> None:
    """Scale steps change a group's count and names; the new image adopts those."""
    topology = _topology(run_dir, Recorded())
    topology.plan(["server-0-0", "server-0-3", "server-0-4", "proxy-0", "balancer-0"])
    assert [c.name for c in topology.servers_in(0)] == ["server-0-0", "server-0-3", "server-0-4"]
    assert [c.name for c in topology.servers_in(1)] == ["server-1-0", "server-1-1"]
    topology.close()


def test_added_servers_take_the_next_index_and_removed_ones_release_their_sockets(
    run_dir: Path,
) -> None:
    recorded = Recorded()
    topology = _topology(run_dir, recorded)
    topology.plan()
    added = topology.add_server(0)
    assert added.name == "server-0-2"
    assert recorded.changes == 2
    topology.remove(topology.children["server-0-1"])
    assert not os.path.exists(run_dir / "server-0-1.sock")
    assert not os.path.exists(run_dir / "server-0-1.admin.sock")
    assert topology.add_server(0).name == "server-0-3"  # never a name that ran before
    balancer = topology.children["balancer-1"]
    topology.remove(balancer)
    assert os.path.exists(run_dir / "balancer.sock")  # the listener is everyone's
    topology.close()


def test_a_successor_takes_over_the_admin_path_and_the_old_one_stays_reachable(
    run_dir: Path,
) -> None:
    topology = _topology(run_dir, Recorded())
    topology.plan()
    old = topology.children["proxy-1"]
    canonical = old.admin
    new = topology.plan_successor(old)
    assert new.name == old.name and new.listen == old.listen and new.admin != canonical
    topology.take_over(new, old)
    assert topology.children["proxy-1"] is new and new.admin == canonical
    assert old.admin is not None and os.path.exists(old.admin.path)
    assert topology.retiring == [old]
    topology.release(old)
    assert topology.retiring == [] and not os.path.exists(old.admin.path)
    assert canonical is not None and os.path.exists(canonical.path)
    topology.close()


async def test_membership_changes_run_one_at_a_time_in_the_order_asked() -> None:
    membership = Membership()
    order: list[str] = []
    first_in = asyncio.Event()
    release = asyncio.Event()

    async def change(what: str, hold: asyncio.Event | None = None) -> None:
        async with membership.change(what):
            order.append(f"+{what}")
            if hold is not None:
                first_in.set()
                await hold.wait()
            order.append(f"-{what}")

    first = asyncio.create_task(change("scale proxy-0", release))
    await first_in.wait()
    assert membership.busy and membership.running == "scale proxy-0"
    others = [asyncio.create_task(change(w)) for w in ("reload", "drain server-0-1")]
    await asyncio.sleep(0)  # wait-ok: let the others queue on the lock
    assert order == ["+scale proxy-0"]
    release.set()
    await asyncio.gather(first, *others)
    assert order == [
        "+scale proxy-0",
        "-scale proxy-0",
        "+reload",
        "-reload",
        "+drain server-0-1",
        "-drain server-0-1",
    ]
    assert not membership.busy and membership.running is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("tier", "roles"),
    [
        ("all", {"server", "proxy", "balancer"}),
        ("proxy", {"server", "proxy"}),
        ("server", {"server"}),
    ],
)
def test_a_tier_plans_only_its_own_children(run_dir: Path, tier: str, roles: set[str]) -> None:
    port = _free_port()
    proxies = 1 if tier == "server" else 2
    topology = _topology(
        run_dir,
        Recorded(),
        tier=tier,
        proxies=proxies,
        network={"port": port, "admin_offset": 1},
    )
    topology.plan()
    assert {c.role for c in topology} == roles
    if tier == "all":
        assert all(a.is_unix for c in topology for a in c.listen)
        topology.close()
        return
    exposed = [c for c in topology if any(not a.is_unix for a in c.listen)]
    first = topology.of_role(Role.PROXY if tier == "proxy" else Role.SERVER)[0]
    assert first in exposed and str(first.listen[-1]) == f"tcp://127.0.0.1:{port}"
    data, admin = topology.placement.network_addresses(first.id)
    assert (data, admin) == (
        first.listen[-1],
        Address("tcp", host="127.0.0.1", port=port + 1),
    )
    if tier == "proxy":  # its servers stay on unix sockets, behind it
        assert all(a.is_unix for c in topology.of_role(Role.SERVER) for a in c.listen)
    topology.close()


def test_a_balancer_tier_binds_no_proxy_and_finds_its_admin_port(run_dir: Path) -> None:
    port = _free_port()
    topology = _topology(
        run_dir,
        Recorded(),
        tier="balancer",
        balancer={"upstreams": "dns://proxies.lbstack.test:8080"},
        network={"port": port, "admin_offset": 2},
    )
    topology.plan()
    assert [c.name for c in topology] == ["balancer-0", "balancer-1"]
    assert topology.placement.network_addresses(ChildId.balancer(1)) == (
        None,
        Address("tcp", host="127.0.0.1", port=port + 3),
    )
    assert topology.placement.local_groups() == []  # no group scales here
    topology.close()
