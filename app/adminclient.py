"""A small HTTP client for admin and control sockets (unix or tcp)."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from app.address import Address


def session(address: Address, timeout: float) -> aiohttp.ClientSession:
    """A client session bound to one admin or control address."""
    connector: aiohttp.BaseConnector
    if address.is_unix:
        connector = aiohttp.UnixConnector(path=address.path)
    else:
        connector = aiohttp.TCPConnector()
    return aiohttp.ClientSession(
        base_url=address.http_base,
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


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
    try:
        status, _ = await fetch(address, path, timeout=timeout)
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False
    return 200 <= status < 300
