"""Shared fixtures: a short socket dir, and aiohttp servers on unix sockets in it."""

from __future__ import annotations

import inspect
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lbstack.address import Address
from lbstack.httpserver import Handler

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


# Modules whose every test runs real processes or outside programs (prometheus,
# systemd-analyze, gunicorn, locust, mkdocs); in the others, the tests that start a
# stack or a subprocess themselves are marked by what their code calls.
_INTEGRATION_MODULES = frozenset(
    {
        "test_autoscale_command",
        "test_autoscale_manual",
        "test_autoscale_reload",
        "test_autoscale_tolerance",
        "test_bad_input",
        "test_control",
        "test_deploy",
        "test_failover",
        "test_fanout",
        "test_gunicorn",
        "test_locust",
        "test_reload",
        "test_scale",
        "test_stack",
        "test_systemd",
        "test_tls",
        "test_tunnel",
        "test_upgrade",
    }
)
_INTEGRATION_CALLS = ("running_stack(", "running_tier(", "create_subprocess_exec(", "subprocess.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs real processes (make test-unit leaves these out)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that run real processes ``integration``."""
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if hasattr(item, "module") else ""
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        if module in _INTEGRATION_MODULES or any(call in source for call in _INTEGRATION_CALLS):
            item.add_marker(pytest.mark.integration)
