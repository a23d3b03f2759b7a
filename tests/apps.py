"""A user's own application, for tests that run it under gunicorn as a server group."""

from __future__ import annotations

import asyncio
import os
import time

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"app": "own", "pid": os.getpid(), "path": request.path})


async def slow(request: web.Request) -> web.Response:
    """Answers after ``ms`` milliseconds, so requests stay in flight (autoscaling tests)."""
    await asyncio.sleep(int(request.match_info["ms"]) / 1000)  # wait-ok: the app's latency
    return web.json_response({"app": "own", "pid": os.getpid(), "path": request.path})


async def burn(request: web.Request) -> web.Response:
    """Spends ``ms`` milliseconds of CPU before answering (autoscaling tests)."""
    until = time.process_time() + int(request.match_info["ms"]) / 1000
    while time.process_time() < until:
        pass
    return web.json_response({"app": "own", "pid": os.getpid(), "path": request.path})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/slow/{ms:\\d+}", slow)
    app.router.add_get("/cpu/{ms:\\d+}", burn)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


app = create_app()
