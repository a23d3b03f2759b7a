"""Upstreams that follow a source: a router's set moved to the addresses a
``lbstack.discovery.Source`` names, through the very changes the admin API makes.

An address that appears joins as ``POST /upstreams`` adds one (slow start, health
checks, scrapes); one that vanishes is drained as ``POST /upstreams/{name}/drain`` does
(no new request, those in flight finish) and removed once nothing is in flight to it,
or after ``grace`` seconds; one that comes back while draining is undrained (slow
start again). Only the upstreams it added are its own: a name the router has from
elsewhere (the supervisor, the admin API) is left alone.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Iterable
from typing import Final

from lbstack.address import Address
from lbstack.client import cancel
from lbstack.component import UpstreamSpec
from lbstack.config import UpstreamTLS
from lbstack.forwarding import Forwarder, UnknownUpstream, UpstreamConflict
from lbstack.identity import address_name
from lbstack.log import get_logger

log = get_logger("discovery")

# How often a leaving upstream is checked for its last request being over.
IDLE_POLL: Final = 0.05
_MAX_PORT: Final = 65535


def upstream_spec(
    address: Address,
    *,
    admin_offset: int | None,
    health_path: str = "/healthz",
    tls: bool = False,
) -> UpstreamSpec:
    """The upstream at ``address``, named after it (``lbstack.identity.address_name``).

    Its admin API is on the same host at its port + ``admin_offset``, over TCP (none for
    a unix socket, beyond port 65535, or when ``admin_offset`` is None: a server of the
    user's own, health-checked at ``health_path``). ``tls``: a ``tcp://`` address is reached as
    ``https://`` (the tier has ``upstream_tls`` set).
    """
    admin = None
    if not address.is_unix:
        if tls and address.scheme == "tcp":
            address = dataclasses.replace(address, scheme="https")
        if admin_offset is not None and address.port + admin_offset <= _MAX_PORT:
            admin = Address("tcp", host=address.host, port=address.port + admin_offset)
    return UpstreamSpec(
        name=address_name(address), address=address, admin=admin, health_path=health_path
    )


def tls_configured(settings: UpstreamTLS) -> bool:
    """Whether a tier's ``upstream_tls`` is set at all (differs from its defaults): then
    discovered upstreams are reached over TLS."""
    return settings != UpstreamTLS()


class Reconciler:
    """Moves ``forwarder``'s upstreams to the addresses of each ``apply``."""

    def __init__(
        self,
        forwarder: Forwarder,
        spec: Callable[[Address], UpstreamSpec],
        *,
        grace: float,
        source: str = "",
    ) -> None:
        self._forwarder = forwarder
        self._spec = spec
        self._grace = grace
        self._source = source
        self.owned: set[str] = set()  # the upstreams this added and has not removed
        self._leaving: dict[str, asyncio.Task[None]] = {}
        self._refused: set[str] = set()  # names already taken, said once

    def apply(self, addresses: Iterable[Address]) -> None:
        """Make the upstreams of ``addresses`` the ones routed to (synchronously)."""
        wanted = {spec.name: spec for spec in map(self._spec, addresses)}
        for name, spec in wanted.items():
            if name in self._leaving:
                self._return(spec)
            elif name not in self.owned:
                self._add(spec)
        for name in sorted(self.owned - wanted.keys() - self._leaving.keys()):
            self._leave(name)

    @property
    def leaving(self) -> frozenset[str]:
        """The upstreams drained because their address went, not yet removed."""
        return frozenset(self._leaving)

    async def close(self) -> None:
        """Stop waiting for leaving upstreams (the router is stopping with them)."""
        tasks = list(self._leaving.values())
        self._leaving.clear()
        await asyncio.gather(*(cancel(task) for task in tasks))

    def _add(self, spec: UpstreamSpec) -> None:
        try:
            self._forwarder.add_upstream(spec)
        except UpstreamConflict:
            if spec.name not in self._refused:
                self._refused.add(spec.name)
                log.warning(
                    "%s names %s, which the router has already: left as it is",
                    self._source,
                    spec.name,
                )
            return
        except RuntimeError:  # the router is stopping
            return
        self.owned.add(spec.name)
        log.info("upstream %s found by %s", spec.name, self._source)

    def _leave(self, name: str) -> None:
        try:
            upstream = self._forwarder.drain(name)
        except UnknownUpstream:  # removed through the admin API meanwhile
            self.owned.discard(name)
            return
        log.info(
            "upstream %s gone from %s: draining, removed once idle (%d in flight) or within %g s",
            name,
            self._source,
            upstream.in_flight,
            self._grace,
        )
        task = asyncio.create_task(self._remove_when_idle(name), name=f"leaving {name}")
        self._leaving[name] = task

    def _return(self, spec: UpstreamSpec) -> None:
        name = spec.name
        self._leaving.pop(name).cancel()
        try:
            self._forwarder.undrain(name)
        except UnknownUpstream:  # removed through the admin API meanwhile
            self.owned.discard(name)
            self._add(spec)
            return
        log.info("upstream %s back in %s: undrained", name, self._source)

    async def _remove_when_idle(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._grace
        upstream = self._forwarder.find(name)
        # Polled: counting down to zero on the hot path would cost every request.
        while upstream is not None and upstream.in_flight > 0:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(IDLE_POLL)
        del self._leaving[name]
        self.owned.discard(name)
        try:
            removed = self._forwarder.remove_upstream(name)
        except (UnknownUpstream, UpstreamConflict) as exc:  # changed through the admin API
            log.info("upstream %s not removed: %s", name, exc)
            return
        if removed.in_flight:
            log.warning(
                "upstream %s removed %g s after it left %s with %d requests in flight",
                name,
                self._grace,
                self._source,
                removed.in_flight,
            )


__all__ = ["IDLE_POLL", "Reconciler", "tls_configured", "upstream_spec"]
