"""The balancer: the stack's public entry, forwarding each request to a proxy.

With https listeners (the spec's ``tls_fds``) it terminates TLS with the certificates
of the config's ``[tls]`` (``lbstack.tls.CertificateStore``), exports when each expires
(``lbstack_tls_certificate_expiry_timestamp_seconds``), and its admin app serves:

* ``GET /tls``: ``{"certificates": [view, ...]}``, the certificates served now;
* ``POST /tls/reload``, with a ``[tls]`` table as JSON (no body: the one it runs
  with): reads the files again and serves them to new handshakes; established
  connections keep theirs. 200 and the certificates loaded; 422 with ``"problems"``
  when any can't be used, and the certificates served stay as they were.
"""

from __future__ import annotations

import dataclasses

from aiohttp import web
from pydantic import ValidationError

from lbstack.admin import METRICS
from lbstack.component import ChildSpec, Component
from lbstack.config import TLSConfig
from lbstack.errors import ConfigError
from lbstack.log import get_logger
from lbstack.metrics import CertificateCollector
from lbstack.tiers.router import create_router
from lbstack.tls import CertificateStore

log = get_logger("tls")


def create(spec: ChildSpec) -> Component:
    """The balancer component: the edge of the stack, so it sets X-Forwarded-Proto."""
    component = create_router(spec, spec.config.balancer, edge=True)
    if not spec.tls_fds:
        return component
    store = CertificateStore(spec.config.tls)
    metrics = component.admin[METRICS]
    metrics.registry.register(CertificateCollector(metrics.role, metrics.instance, store.expiries))
    component.admin.add_routes(tls_routes(store, spec.config.tls))
    return dataclasses.replace(component, tls=store.context)


def tls_routes(store: CertificateStore, settings: TLSConfig) -> list[web.RouteDef]:
    """``GET /tls`` and ``POST /tls/reload`` over ``store``, which runs ``settings``."""
    current = [settings]

    async def get_tls(request: web.Request) -> web.Response:
        return web.json_response({"certificates": store.views()})

    async def reload(request: web.Request) -> web.Response:
        new = current[0]
        if request.can_read_body:
            try:
                new = TLSConfig.model_validate_json(await request.read())
            except ValidationError as exc:
                problems = [
                    f"tls.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                    for e in exc.errors(include_url=False)
                ]
                return _refused(problems)
        try:
            store.reload(new)
        except ConfigError as exc:
            return _refused(exc.problems)
        current[0] = new
        log.info("certificates reloaded: %d served", len(store.certificates))
        return web.json_response({"certificates": store.views()})

    return [web.get("/tls", get_tls), web.post("/tls/reload", reload)]


def _refused(problems: list[str]) -> web.Response:
    log.error("certificates not reloaded, the current ones stay: %s", "; ".join(problems))
    return web.json_response(
        {"error": "certificates not reloaded: " + "; ".join(problems), "problems": problems},
        status=422,
    )
