"""HTTP clients to an ``Address`` (unix, tcp or https): pools, sessions, one-off requests.

Every client in the stack (forwarding pools, health checks, scrapes, the supervisor's
probes, the CLI) connects through ``connector`` here, so there is one place that knows
how a unix or tcp address becomes an aiohttp connector.
"""

from __future__ import annotations

import asyncio
import json
from ssl import SSLContext
from typing import Any

import aiohttp

from lbstack.address import Address


def connector(
    address: Address, *, ssl: SSLContext | None = None, **options: Any
) -> aiohttp.BaseConnector:
    """A connection pool to ``address``; ``options`` go to aiohttp's connector.

    ``ssl``: the client context for an ``https://`` address (default: aiohttp's,
    verifying against the system's trust store).
    """
    if address.is_unix:
        return aiohttp.UnixConnector(path=address.path, **options)
    return aiohttp.TCPConnector(ssl=True if ssl is None else ssl, **options)


def session(
    address: Address, timeout: float | None, *, ssl: SSLContext | None = None, **options: Any
) -> aiohttp.ClientSession:
    """A client session to ``address`` (requests take paths), no cookies, no proxies."""
    return aiohttp.ClientSession(
        base_url=address.http_base,
        connector=connector(address, ssl=ssl, **options),
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it; re-raise if *we* are being cancelled."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def fetch(
    address: Address,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One request; returns (status, body). Raises aiohttp.ClientError or TimeoutError."""
    async with (
        session(address, timeout) as client,
        client.request(method, path, json=body) as response,
    ):
        return response.status, await response.read()


async def fetch_json(
    address: Address,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    status, raw = await fetch(address, path, method=method, body=body, timeout=timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": raw.decode(errors="replace")}


async def probe(address: Address, path: str, timeout: float = 1.0) -> bool:
    """Whether ``path`` answers 2xx within ``timeout`` (any failure is just False)."""
    async with session(address, timeout) as client:
        return await answers(client, path)


async def answers(client: aiohttp.ClientSession, path: str) -> bool:
    """Whether ``path`` answers 2xx through ``client`` (any failure is just False)."""
    try:
        async with client.get(path) as response:
            return 200 <= response.status < 300
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
