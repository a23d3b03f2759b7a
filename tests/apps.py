"""A user's own application, for tests that run it under gunicorn as a server group."""

from __future__ import annotations

import os

from aiohttp import web


async def hello(request: web.Request) -> web.Response:
    return web.json_response({"app": "own", "pid": os.getpid(), "path": request.path})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


app = create_app()
