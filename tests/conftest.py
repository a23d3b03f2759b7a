"""Shared fixtures: a short socket dir, and aiohttp servers on unix sockets in it."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from app.address import Address
from app.httpserver import Handler

# How long a test server's teardown waits for handlers still running before cancelling.
SHUTDOWN_TIMEOUT = 2.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A temp dir short enough for unix socket paths (pytest's tmp_path can be too long)."""
    path = Path(tempfile.mkdtemp(prefix="lbt", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class UnixServers:
    """Serves low-level aiohttp handlers on unix sockets; the fixture stops them all.

    ``stack`` is the teardown stack the servers are on: push more cleanups to it to have
    them run in last-in, first-out order with the servers.
    """

    def __init__(self, directory: Path, stack: AsyncExitStack) -> None:
        self.directory = directory
        self.stack = stack

    async def serve(
        self,
        handler: Handler,
        name: str,
        *,
        server_class: type[web.Server] = web.Server,
        **options: Any,
    ) -> Address:
        """Serve ``handler`` on ``<sockdir>/<name>.sock`` and return its address."""
        return await self.serve_server(server_class(handler, **options), name)

    async def serve_server(self, server: web.Server, name: str) -> Address:
        """Serve ``server`` (a data plane's, say) on ``<sockdir>/<name>.sock``."""
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        self.stack.push_async_callback(runner.cleanup)
        path = str(self.directory / f"{name}.sock")
        await web.UnixSite(runner, path).start()
        return Address.unix(path)


@pytest.fixture
async def unix_servers(sockdir: Path) -> AsyncIterator[UnixServers]:
    async with AsyncExitStack() as stack:
        yield UnixServers(sockdir, stack)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
