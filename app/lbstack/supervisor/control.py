"""The supervisor's HTTP surfaces: the control socket and the Prometheus endpoint.

The control socket (``control.sock``, mode 0600) serves ``GET /status`` (what
``lbstack status`` prints), ``/metrics``, ``/healthz`` and ``/readyz``. The metrics
endpoint (``metrics_listen``, loopback TCP) is a multi-target exporter:
``/metrics`` is the supervisor's own, ``/metrics?target=proxy-0`` relays that
component's admin ``/metrics``; a target is looked up in the live topology, never
taken as a path, and one that does not answer is a 503, which Prometheus records as
``up 0``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lbstack.client import fetch
from lbstack.errors import ConfigError, ControlError
from lbstack.log import get_logger

if TYPE_CHECKING:
    from lbstack.supervisor.arbiter import Supervisor

log = get_logger("supervisor")

SCRAPE_TIMEOUT = 5.0


def _metrics_handler(supervisor: Supervisor) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        target = request.query.get("target")
        if target is None or target == "supervisor":
            return web.Response(
                body=generate_latest(supervisor.metrics.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )
        child = supervisor.children.get(target)
        if child is None or child.admin is None:
            known = ", ".join(
                ["supervisor", *(n for n, c in supervisor.children.items() if c.admin is not None)]
            )
            return web.Response(status=404, text=f"unknown target {target!r}; known: {known}\n")
        try:
            status, body = await fetch(child.admin, "/metrics", timeout=SCRAPE_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return web.Response(status=503, text=f"{target} did not answer: {exc!r}\n")
        if status != 200:
            return web.Response(status=503, text=f"{target} answered {status}\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def _probes(app: web.Application, supervisor: Supervisor) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        ready = all(c.state in ("ready", "external") for c in supervisor.children.values())
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def create_control_app(supervisor: Supervisor) -> web.Application:
    """The control socket's app."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response(supervisor.status())

    async def scale(request: web.Request) -> web.Response:
        body = await _json_body(request, {"group": str, "servers": int})
        return await _run(supervisor.scaler.scale(body["group"], body["servers"]))

    async def drain(request: web.Request) -> web.Response:
        body = await _json_body(request, {"name": str})
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise web.HTTPBadRequest(text=f"force: expected true or false, found {force!r}\n")
        return await _run(supervisor.scaler.drain(body["name"], force=force))

    async def undrain(request: web.Request) -> web.Response:
        body = await _json_body(request, {"name": str})
        return await _run(supervisor.scaler.undrain(body["name"]))

    async def reload(request: web.Request) -> web.Response:
        body = await _json_body(request, {}) if request.can_read_body else {}
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise web.HTTPBadRequest(text=f"dry_run: expected true or false, found {dry_run!r}\n")
        try:
            return await _run(supervisor.reloader.reload(dry_run=dry_run))
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "problems": exc.problems}, status=422)

    async def restart(request: web.Request) -> web.Response:
        body = await _json_body(request, {"names": list})
        names = body["names"]
        if not all(isinstance(n, str) for n in names):
            raise web.HTTPBadRequest(text=f"names: expected a list of names, found {names!r}\n")
        return await _run(supervisor.reloader.restart(names))

    async def upgrade(request: web.Request) -> web.StreamResponse:
        sent: list[web.StreamResponse] = []

        async def answer(body: dict[str, Any]) -> None:
            response = web.json_response(body)
            await response.prepare(request)
            await response.write_eof()
            sent.append(response)

        try:
            await supervisor.upgrade(answer)  # on success this image ends in it
        except ControlError as exc:
            if sent:  # the exec itself failed after the answer: the log says so
                log.error("%s", exc)
                return sent[0]
            return web.json_response({"error": str(exc)}, status=409)
        raise AssertionError("Supervisor.upgrade returned")

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/upgrade", upgrade)
    app.router.add_post("/reload", reload)
    app.router.add_post("/restart", restart)
    app.router.add_post("/scale", scale)
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)
    app.router.add_get("/metrics", _metrics_handler(supervisor))
    _probes(app, supervisor)
    return app


async def _json_body(request: web.Request, fields: dict[str, type]) -> dict[str, Any]:
    """The request's JSON object with ``fields`` of the given types, or a 400."""
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="expected a JSON object\n")
    for name, kind in fields.items():
        if not isinstance(body.get(name), kind) or isinstance(body.get(name), bool):
            raise web.HTTPBadRequest(
                text=f"{name}: expected a {kind.__name__}, found {body.get(name)!r}\n"
            )
    return body


async def _run(operation: Awaitable[dict[str, Any]]) -> web.Response:
    """The JSON answer of a membership change, or its error as a 409."""
    try:
        return web.json_response(await operation)
    except ControlError as exc:
        return web.json_response({"error": str(exc)}, status=409)


def create_metrics_app(supervisor: Supervisor) -> web.Application:
    """The loopback TCP endpoint Prometheus scrapes."""

    async def targets(request: web.Request) -> web.Response:
        names = ["supervisor", *(n for n, c in supervisor.children.items() if c.admin)]
        return web.json_response(
            [{"targets": [request.host], "labels": {"lbstack_target": n}} for n in names]
        )

    app = web.Application()
    app.router.add_get("/metrics", _metrics_handler(supervisor))
    app.router.add_get("/targets", targets)
    _probes(app, supervisor)
    return app
