"""The admin API over TCP: the token guards everything but the probes; without a token
nothing that changes anything is reachable; the unix socket is guarded by its mode."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lbstack.admin import bearer, require_token
from tests.harness import short_tmpdir

TOKEN = "s3cret-token-of-the-stack"


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Path]]:
    """An admin-like app on loopback TCP and on a unix socket, guarded by the token
    the test parametrises (``None``: no token configured)."""
    app = web.Application(middlewares=[require_token(request.param)])
    app.router.add_get("/healthz", _ok)
    app.router.add_get("/readyz", _ok)
    app.router.add_get("/metrics", _ok)
    app.router.add_post("/upstreams", _ok)
    app.router.add_delete("/upstreams/x", _ok)
    runner = web.AppRunner(app)
    await runner.setup()
    tcp = web.TCPSite(runner, "127.0.0.1", 0)
    await tcp.start()
    path = short_tmpdir() / "admin.sock"
    await web.UnixSite(runner, str(path)).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", path
    finally:
        await runner.cleanup()
        path.unlink(missing_ok=True)
        path.parent.rmdir()


async def _status(base: str, method: str, path: str, headers: dict[str, str]) -> int:
    async with (
        aiohttp.ClientSession() as client,
        client.request(method, base + path, headers=headers) as response,
    ):
        return response.status


@pytest.mark.parametrize("served", [TOKEN], indirect=True)
@pytest.mark.parametrize(
    ("method", "path", "headers", "status"),
    [
        ("GET", "/healthz", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/metrics", {}, 401),
        ("POST", "/upstreams", {}, 401),
        ("DELETE", "/upstreams/x", {}, 401),
        ("POST", "/upstreams", {"Authorization": "Bearer wrong"}, 401),
        ("POST", "/upstreams", {"Authorization": TOKEN}, 401),  # not a bearer header
        ("POST", "/healthz", {}, 401),  # only reading a probe is open
        ("GET", "/metrics", bearer(TOKEN), 200),
        ("POST", "/upstreams", bearer(TOKEN), 200),
        ("DELETE", "/upstreams/x", bearer(TOKEN), 200),
    ],
)
async def test_over_tcp_the_token_is_needed_for_all_but_the_probes(
    served: tuple[str, Path], method: str, path: str, headers: dict[str, str], status: int
) -> None:
    base, _ = served
    assert await _status(base, method, path, headers) == status


@pytest.mark.parametrize("served", [None], indirect=True)
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/healthz", 200),
        ("GET", "/metrics", 200),
        ("POST", "/upstreams", 403),
        ("DELETE", "/upstreams/x", 403),
    ],
)
async def test_without_a_token_tcp_reads_and_changes_nothing(
    served: tuple[str, Path], method: str, path: str, status: int
) -> None:
    base, _ = served
    assert await _status(base, method, path, {}) == status


@pytest.mark.parametrize("served", [TOKEN], indirect=True)
async def test_the_unix_socket_needs_no_token(served: tuple[str, Path]) -> None:
    _, path = served
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as client,
        client.post("http://admin/upstreams") as response,
    ):
        assert response.status == 200


def test_bearer_is_the_header_the_middleware_reads() -> None:
    assert bearer(TOKEN) == {"Authorization": f"Bearer {TOKEN}"}
    assert bearer(None) == {}
