"""Entry point of every child process: ``python -m lbstack.worker``.

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

from lbstack.admin import DATA_SERVER, require_token
from lbstack.component import ChildSpec, Component
from lbstack.httpserver import DataPlane
from lbstack.identity import Role
from lbstack.log import get_logger, setup
from lbstack.sockets import from_fd
from lbstack.tiers import balancer, proxy, server

ROLES: dict[Role, Callable[[ChildSpec], Component]] = {
    Role.BALANCER: balancer.create,
    Role.PROXY: proxy.create,
    Role.SERVER: server.create,
}
PR_SET_PDEATHSIG = 1
ADMIN_KEEPALIVE = 30.0
DRAIN_POLL = 0.05

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
    """Serve until SIGTERM, then drain (see ``drain``)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    server = component.data_server()
    component.admin[DATA_SERVER] = server
    if spec.admin_tcp_fd is not None:
        component.admin.middlewares.append(require_token(spec.config.admin.token()))
    admin = web.AppRunner(
        component.admin, access_log=None, keepalive_timeout=ADMIN_KEEPALIVE, shutdown_timeout=1.0
    )
    await admin.setup()  # opens the component's resources (cleanup_ctx)
    settings = spec.config.supervisor
    data = web.ServerRunner(
        server, shutdown_timeout=settings.graceful_timeout - settings.drain_window
    )
    await data.setup()
    if spec.tls_fds and component.tls is None:
        raise RuntimeError(f"{spec.role} has https listeners and no TLS context")
    for fd in spec.listen_fds:
        tls = component.tls if fd in spec.tls_fds else None
        await web.SockSite(data, from_fd(fd), ssl_context=tls).start()
    # The admin sockets last: once /readyz answers, the data plane is serving.
    if spec.admin_tcp_fd is not None:
        await web.SockSite(admin, from_fd(spec.admin_tcp_fd)).start()
    await web.SockSite(admin, from_fd(spec.admin_fd)).start()
    log.debug("serving %d data socket(s)", len(spec.listen_fds))

    await stop.wait()
    await drain(server, data, settings.drain_window)
    await admin.cleanup()
    log.info("stopped")


async def drain(server: DataPlane, data: web.ServerRunner, window: float) -> None:
    """Stop without failing a request: the graceful half of SIGTERM.

    1. Draining: /readyz says 503 and every response says ``Connection: close``.
    2. Stop accepting. The listening sockets are shared (with the supervisor, and
       during a reload with our successor), so a connection not yet accepted is
       the successor's, never lost.
    3. For up to ``window``: wait for the connections to go away. Routers close their
       idle pooled connections to us themselves (the supervisor asks them to), busy
       ones close after their response; an idle connection is never closed under a
       client that may be reusing it.
    4. Then aiohttp's shutdown: close what is idle, give in-flight requests the rest
       of the graceful timeout, cancel what is left.
    """
    server.drain()
    log.info("SIGTERM: draining (%d connections, %d busy)", len(server.connections), server.busy)
    for site in list(data.sites):
        await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + window
    # Polled: aiohttp signals no event when its last connection goes.
    while server.connections and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(DRAIN_POLL)
    if server.connections:
        log.info(
            "closing %d connection(s) after the drain window (%d busy)",
            len(server.connections),
            server.busy,
        )
    await data.cleanup()


def main() -> None:
    spec = ChildSpec.from_env()
    setup(spec.config.supervisor.log_level, spec.name)
    _die_with_parent(spec.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    uvloop.run(serve(spec, ROLES[spec.role](spec)))


if __name__ == "__main__":
    main()
