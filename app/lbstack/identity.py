"""Who a child is: its role, its group and its index.

A child's name (``balancer-1``, ``proxy-0``, ``server-0-2``) names its sockets, its
metrics and its upstream entry in a router. This module is the one place that writes a
name from an identity and reads one back: nothing else splits names on ``-``.

An upstream found at an address rather than run by the supervisor (DNS discovery, fixed
addresses of another host) is named after that address (``address_name``).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from lbstack.address import Address

# What a router accepts as an upstream's name (it becomes a metric label and a URL part).
UPSTREAM_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
UPSTREAM_NAME_RULE: Final = (
    "a name of letters, digits, '.', '_' and '-', starting with a letter or digit"
)

_NAME: Final = re.compile(r"(balancer|proxy|server)-(\d+)(?:-(\d+))?")


def address_name(address: Address) -> str:
    """The upstream name of an address: ``198.18.0.3-8080`` for ``tcp://198.18.0.3:8080``.

    An IPv6 host is written in its canonical form with ``-`` for ``:`` (``0--1-8080``
    for ``[::1]:8080``: a leading ``0`` where the form starts with ``::``), a host name
    as it is, a unix socket by its file name without ``.sock``. The scheme is left
    out: one host and port is one upstream, over TLS or not.
    """
    if address.is_unix:
        name = os.path.basename(address.path).removesuffix(".sock")
    else:
        host = address.host
        with contextlib.suppress(ValueError):  # else a host name, kept as it is
            host = ipaddress.ip_address(host).compressed.replace(":", "-")
        name = f"{'0' if host.startswith('-') else ''}{host}-{address.port}"
    if not UPSTREAM_NAME.fullmatch(name):
        raise ValueError(f"expected an address that makes {UPSTREAM_NAME_RULE}, found {address}")
    return name


class Role(StrEnum):
    """What a child runs. Tiers start in this order: servers first, balancers last."""

    SERVER = "server"
    PROXY = "proxy"
    BALANCER = "balancer"

    @property
    def tier(self) -> int:
        """Position in the start order (0 starts first, and stops last)."""
        return list(Role).index(self)


@dataclass(frozen=True)
class ChildId:
    """A child's identity. ``group`` is the proxy index of a proxy or a server."""

    role: Role
    group: int | None
    index: int

    @classmethod
    def balancer(cls, index: int) -> ChildId:
        return cls(Role.BALANCER, None, index)

    @classmethod
    def proxy(cls, group: int) -> ChildId:
        return cls(Role.PROXY, group, group)

    @classmethod
    def server(cls, group: int, index: int) -> ChildId:
        return cls(Role.SERVER, group, index)

    @classmethod
    def parse(cls, name: str) -> ChildId:
        """The identity a name spells; ``ValueError`` for anything else."""
        match = _NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"not a child's name: {name!r}")
        role, first, second = match.group(1), int(match.group(2)), match.group(3)
        if role == Role.SERVER and second is not None:
            return cls.server(first, int(second))
        if role == Role.PROXY and second is None:
            return cls.proxy(first)
        if role == Role.BALANCER and second is None:
            return cls.balancer(first)
        raise ValueError(f"not a child's name: {name!r}")

    @property
    def name(self) -> str:
        if self.role is Role.SERVER:
            return f"server-{self.group}-{self.index}"
        return f"{self.role}-{self.index}"

    @property
    def group_name(self) -> str | None:
        """The name of the group (its proxy's name) a proxy or server belongs to."""
        return None if self.group is None else ChildId.proxy(self.group).name

    @property
    def sort_key(self) -> tuple[int, int, int]:
        """Tier order, then group, then index."""
        return (self.role.tier, -1 if self.group is None else self.group, self.index)

    def __str__(self) -> str:
        return self.name
