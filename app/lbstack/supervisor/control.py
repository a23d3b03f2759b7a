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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lbstack.api import (
    DrainRequest,
    ReloadRequest,
    Request,
    RestartRequest,
    ScaleRequest,
    UndrainRequest,
)
from lbstack.client import fetch
from lbstack.errors import ConfigError, ControlError, InvalidRequest
from lbstack.log import get_logger
from lbstack.supervisor.telemetry import target_groups, target_names

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from lbstack.supervisor.reload import Reloader
    from lbstack.supervisor.scaling import Scaler
    from lbstack.supervisor.topology import Topology

log = get_logger("supervisor")

SCRAPE_TIMEOUT = 5.0
Answer = Callable[[dict[str, Any]], Awaitable[None]]
R = TypeVar("R", bound=Request)


@dataclass(frozen=True)
class ControlPlane:
    """What the control socket and the metrics endpoint act on."""

    topology: Topology  # scrape targets and readiness
    scaler: Scaler  # scale, drain, undrain
    reloader: Reloader  # reload, rolling restart
    registry: CollectorRegistry  # the supervisor's own metrics
    status: Callable[[], dict[str, Any]]  # the stack as ``lbstack status --json`` shows it
    # Re-execute the supervisor: answers through its argument, then this image ends;
    # ControlError if it can't.
    upgrade: Callable[[Answer], Awaitable[None]]


def _metrics_handler(plane: ControlPlane) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def metrics(request: web.Request) -> web.Response:
        target = request.query.get("target")
        if target is None or target == "supervisor":
            return web.Response(
                body=generate_latest(plane.registry),
                headers={"Content-Type": CONTENT_TYPE_LATEST},
            )
        child = plane.topology.children.get(target)
        if child is None or child.admin is None:
            known = ", ".join(target_names(plane.topology))
            return web.Response(status=404, text=f"unknown target {target!r}; known: {known}\n")
        try:
            status, body = await fetch(child.admin, "/metrics", timeout=SCRAPE_TIMEOUT)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return web.Response(status=503, text=f"{target} did not answer: {exc!r}\n")
        if status != 200:
            return web.Response(status=503, text=f"{target} answered {status}\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return metrics


def _probes(app: web.Application, plane: ControlPlane) -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def readyz(request: web.Request) -> web.Response:
        ready = all(c.state == "ready" for c in plane.topology)
        return web.json_response(
            {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
        )

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)


def create_control_app(plane: ControlPlane) -> web.Application:
    """The control socket's app."""

    async def status(request: web.Request) -> web.Response:
        return web.json_response(plane.status())

    async def scale(request: web.Request) -> web.Response:
        body = await _parse(request, ScaleRequest)
        return await _run(plane.scaler.scale(body.group, body.servers))

    async def drain(request: web.Request) -> web.Response:
        body = await _parse(request, DrainRequest)
        return await _run(plane.scaler.drain(body.name, force=body.force))

    async def undrain(request: web.Request) -> web.Response:
        body = await _parse(request, UndrainRequest)
        return await _run(plane.scaler.undrain(body.name))

    async def reload(request: web.Request) -> web.Response:
        body = await _parse(request, ReloadRequest)
        try:
            return await _run(plane.reloader.reload(dry_run=body.dry_run))
        except ConfigError as exc:
            return web.json_response({"error": str(exc), "problems": exc.problems}, status=422)

    async def restart(request: web.Request) -> web.Response:
        body = await _parse(request, RestartRequest)
        return await _run(plane.reloader.restart(body.names))

    async def upgrade(request: web.Request) -> web.StreamResponse:
        sent: list[web.StreamResponse] = []

        async def answer(body: dict[str, Any]) -> None:
            response = web.json_response(body)
            await response.prepare(request)
            await response.write_eof()
            sent.append(response)

        try:
            await plane.upgrade(answer)  # on success this image ends in it
        except ControlError as exc:
            if sent:  # the exec itself failed after the answer: the log says so
                log.error("%s", exc)
                return sent[0]
            return web.json_response({"error": str(exc)}, status=409)
        raise AssertionError("upgrade returned")

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/upgrade", upgrade)
    app.router.add_post("/reload", reload)
    app.router.add_post("/restart", restart)
    app.router.add_post("/scale", scale)
    app.router.add_post("/drain", drain)
    app.router.add_post("/undrain", undrain)
    app.router.add_get("/metrics", _metrics_handler(plane))
    _probes(app, plane)
    return app


async def _parse(request: web.Request, model: type[R]) -> R:
    """The request body as ``model`` (the one the clients send), or a 400 naming each
    bad field, what was expected and what was found."""
    try:
        return model.parse(await request.read())
    except InvalidRequest as exc:
        raise web.HTTPBadRequest(text=f"{exc}\n") from exc


async def _run(operation: Awaitable[dict[str, Any]]) -> web.Response:
    """The JSON answer of a membership change, or its error as a 409."""
    try:
        return web.json_response(await operation)
    except ControlError as exc:
        return web.json_response({"error": str(exc)}, status=409)


def create_metrics_app(plane: ControlPlane) -> web.Application:
    """The loopback TCP endpoint Prometheus scrapes."""

    async def targets(request: web.Request) -> web.Response:
        return web.json_response(target_groups(request.host, plane.topology))

    app = web.Application()
    app.router.add_get("/metrics", _metrics_handler(plane))
    app.router.add_get("/targets", targets)
    _probes(app, plane)
    return app
