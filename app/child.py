"""Entry point of every child process: ``python -m app.child``.

Reads the ``ChildSpec`` the supervisor put in the environment, builds the role's
component, serves its inherited sockets and stops gracefully on SIGTERM. SIGINT is
ignored: Ctrl-C reaches the whole process group, and the supervisor alone decides the
order in which children stop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
from collections.abc import Callable

import uvloop
from aiohttp import web

from app import balancer, proxy, server
from app.component import ChildSpec, Component, Role
from app.httpserver import DataServer
from app.log import get_logger, setup
from app.sockets import from_fd

ROLES: dict[Role, Callable[[ChildSpec], Component]] = {
    "balancer": balancer.create,
    "proxy": proxy.create,
    "server": server.create,
}
PR_SET_PDEATHSIG = 1
ADMIN_KEEPALIVE = 30.0

log = get_logger("child")


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, so no child is orphaned."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the supervisor's stop must do
        return
    if parent_pid and os.getppid() != parent_pid:
        sys.exit("supervisor went away before this child started")


async def serve(spec: ChildSpec, component: Component) -> None:
    """Serve until SIGTERM, then drain: stop accepting, finish in-flight, close."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    admin = web.AppRunner(
        component.admin, access_log=None, keepalive_timeout=ADMIN_KEEPALIVE, shutdown_timeout=1.0
    )
    await admin.setup()  # opens the component's resources (cleanup_ctx)
    data = web.ServerRunner(
        DataServer(component.handler, **component.server_options),
        shutdown_timeout=spec.config.supervisor.graceful_timeout,
    )
    await data.setup()
    for fd in spec.listen_fds:
        await web.SockSite(data, from_fd(fd)).start()
    # The admin socket last: once /readyz answers, the data plane is serving.
    await web.SockSite(admin, from_fd(spec.admin_fd)).start()
    log.debug("serving %d data socket(s)", len(spec.listen_fds))

    await stop.wait()
    log.info("SIGTERM: draining in-flight requests")
    await data.cleanup()
    await admin.cleanup()
    log.info("stopped")


def main() -> None:
    spec = ChildSpec.from_env()
    setup(spec.config.supervisor.log_level, spec.name)
    _die_with_parent(spec.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(serve(spec, ROLES[spec.role](spec)))


if __name__ == "__main__":
    main()
