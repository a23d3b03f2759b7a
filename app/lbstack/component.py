"""What the supervisor tells a child: who it is, its sockets, its upstreams, the config.

This is the whole interface between the supervisor and the data plane: the supervisor
builds a ``ChildSpec``, passes it in the environment with the listening sockets as
inherited file descriptors, and ``python -m lbstack.worker`` turns it into a running
balancer, proxy or server.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from lbstack.config import AddressField, Config
from lbstack.httpserver import DataPlane
from lbstack.identity import Role

ENV_VAR = "LBSTACK_CHILD"


class UpstreamSpec(BaseModel):
    """One upstream of a router: its name, where to send requests, where its admin is."""

    model_config = ConfigDict(frozen=True)

    name: str
    address: AddressField
    admin: AddressField | None = None
    health_path: str = "/healthz"
    # Drained (lbstack drain, a scale-down): a router (re)started now must not undo it.
    draining: bool = False


class ChildSpec(BaseModel):
    """Everything a child process needs to run."""

    model_config = ConfigDict(frozen=True)

    name: str
    role: Role
    group: int | None = None  # the proxy index a proxy or server belongs to
    listen_fds: tuple[int, ...]
    tls_fds: tuple[int, ...] = ()  # those of listen_fds served with TLS (https listeners)
    admin_fd: int
    # The admin API on TCP too (a tier other hosts reach): token required but probes.
    admin_tcp_fd: int | None = None
    upstreams: tuple[UpstreamSpec, ...] = ()
    peers: tuple[AddressField, ...] = ()  # the other balancers' admin sockets (load exchange)
    parent_pid: int = 0  # the supervisor; the child exits when it goes away
    config: Config

    def to_env(self) -> dict[str, str]:
        return {ENV_VAR: self.model_dump_json()}

    @classmethod
    def from_env(cls) -> ChildSpec:
        return cls.model_validate_json(os.environ[ENV_VAR])


@dataclass(frozen=True)
class Component:
    """A child's running parts, as its role builds them.

    ``data_server`` makes (in the running loop) the server of the data sockets: every
    request, no reserved paths. ``admin`` is the admin app; resources the component
    holds (pools, background tasks) live in its ``cleanup_ctx``, so they outlast the
    data plane's graceful drain. ``tls`` is the context the spec's ``tls_fds`` are
    served with.
    """

    data_server: Callable[[], DataPlane]
    admin: web.Application
    tls: ssl.SSLContext | None = None
