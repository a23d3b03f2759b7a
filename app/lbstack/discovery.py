"""DNS discovery: the addresses behind a name, resolved again as its TTL runs out.

A ``Resolver`` asks DNS (aiodns over c-ares; the nameservers of ``[discovery]``, or the
system's) what a ``DnsName`` stands for: its A and AAAA records at the name's port, or
its SRV records, each at its target's addresses and the port the record gives (the
target's addresses from the answer's additional section when it has them, else asked
for). An ``Answer`` holds the addresses and the smallest TTL of the records read.

A ``Source`` follows one set of addresses for a router and hands every new set to
``on_change``: fixed addresses once, at start; a name at start and then every TTL,
clamped to ``[min_ttl, max_ttl]``. A resolution that fails (timeout, SERVFAIL,
NXDOMAIN, no nameserver answering) or finds no address keeps the **last good set** —
DNS never empties a pool — is counted, logged when the state changes (a warning when
it starts failing, info when it recovers), and tried again after ``min_ttl``.

Metrics (label ``source``, the name as configured): ``lbstack_discovery_resolutions_total``
by ``result`` (ok, failed, empty), ``lbstack_discovery_addresses`` (the set in use),
``lbstack_discovery_ttl_seconds`` (the clamped TTL) and
``lbstack_discovery_last_success_timestamp_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import aiodns
import pycares
from aiodns.error import ARES_ENODATA, ARES_ENOTFOUND
from prometheus_client import Counter, Gauge

from lbstack.address import Address
from lbstack.client import cancel
from lbstack.config import Discovery, DnsName
from lbstack.errors import LbstackError
from lbstack.log import get_logger
from lbstack.metrics import BASE, ComponentMetrics

log = get_logger("discovery")

Result = Literal["ok", "failed", "empty"]
# Where a set of addresses comes from, and who is told of each new set.
Origin = DnsName | tuple[Address, ...]
OnChange = Callable[[tuple[Address, ...]], None]
RESULTS: Final[tuple[Result, ...]] = ("ok", "failed", "empty")
SOURCE: Final = (*BASE, "source")
# c-ares gets half the timeout per try and two tries: one lost UDP datagram is resent.
_TRIES: Final = 2


class DiscoveryError(LbstackError):
    """A name could not be resolved into addresses: ``result`` is ``failed`` (no
    answer, SERVFAIL, NXDOMAIN...) or ``empty`` (an answer without any address)."""

    def __init__(self, message: str, result: Result = "failed") -> None:
        super().__init__(message)
        self.result = result


class _NoSuchName(DiscoveryError):
    """NXDOMAIN: the name does not exist."""


@dataclass(frozen=True, slots=True)
class Answer:
    """What a name stands for now: its addresses (sorted), and the smallest record TTL."""

    addresses: tuple[Address, ...]
    ttl: float


class Resolver:
    """Resolves ``DnsName``s with the nameservers and timeout of ``settings``.

    Each resolution opens a c-ares channel of its own and closes it: c-ares caches
    answers for their TTL, which would keep a name's old records past ``max_ttl``, and
    pycares offers no way to turn its cache off. (A channel costs far less than the
    round trips it makes, at most once a ``min_ttl`` per name.)
    """

    def __init__(self, settings: Discovery) -> None:
        self._settings = settings

    def _channel(self) -> aiodns.DNSResolver:
        return aiodns.DNSResolver(
            # c-ares takes "ip", "ip:port" and "[ipv6]:port" as they are.
            nameservers=list(self._settings.nameservers) or None,
            timeout=self._settings.timeout / _TRIES,
            tries=_TRIES,
        )

    async def resolve(self, name: DnsName) -> Answer:
        """``name``'s addresses now; ``DiscoveryError`` when there are none to be had."""
        dns = self._channel()
        try:
            async with asyncio.timeout(self._settings.timeout):
                if name.srv:
                    found = await _srv(dns, name.name)
                else:
                    assert name.port is not None  # a dns:// name always has its port
                    found = [(ip, name.port, ttl) for ip, ttl in await _hosts(dns, name.name)]
        except _NoSuchName as exc:
            raise DiscoveryError(f"{name}: no such name (NXDOMAIN)") from exc
        except TimeoutError as exc:
            raise DiscoveryError(f"{name}: no answer within {self._settings.timeout:g} s") from exc
        finally:
            await dns.close()
        if not found:
            raise DiscoveryError(f"{name}: the answer has no address", "empty")
        addresses = {Address("tcp", host=ip, port=port) for ip, port, _ in found}
        return Answer(tuple(sorted(addresses, key=str)), min(ttl for *_, ttl in found))


async def _query(dns: aiodns.DNSResolver, host: str, qtype: str) -> pycares.DNSResult:
    """One query; an empty answer (NODATA) is an empty result, not an error."""
    try:
        return await dns.query_dns(host, qtype)
    except aiodns.error.DNSError as exc:
        code = exc.args[0] if exc.args else None
        text = exc.args[1] if len(exc.args) > 1 else repr(exc)
        if code == ARES_ENODATA:
            return pycares.DNSResult(answer=[], authority=[], additional=[])
        if code == ARES_ENOTFOUND:
            raise _NoSuchName(f"{qtype} {host}") from exc
        raise DiscoveryError(f"{qtype} {host}: {text}") from exc


async def _hosts(dns: aiodns.DNSResolver, host: str) -> list[tuple[str, float]]:
    """The A and AAAA records of ``host``, each ``(ip, ttl)``: the answer of each
    family is read, so a name with only one of them is no failure."""
    answers = await asyncio.gather(
        _query(dns, host, "A"), _query(dns, host, "AAAA"), return_exceptions=True
    )
    missing = 0
    found: list[tuple[str, float]] = []
    for answer in answers:
        if isinstance(answer, _NoSuchName):
            missing += 1
        elif isinstance(answer, BaseException):
            raise answer
        else:
            found += _addresses(answer.answer, host)
    if missing == len(answers):
        raise _NoSuchName(host)
    return found


async def _srv(dns: aiodns.DNSResolver, name: str) -> list[tuple[str, int, float]]:
    """Each SRV record's target addresses at its port, ``(ip, port, ttl)``: the TTL
    the smaller of the SRV record's and the address record's."""
    result = await _query(dns, name, "SRV")
    records = [
        (r.data.target.rstrip(".").lower(), r.data.port, float(r.ttl))
        for r in result.answer
        if isinstance(r.data, pycares.SRVRecordData) and r.data.target.rstrip(".")
    ]
    given = {target: _addresses(result.additional, target) for target, *_ in records}
    asked = [target for target, found in given.items() if not found]
    targets = await asyncio.gather(*(_target(dns, target) for target in asked))
    for target, found in zip(asked, targets, strict=True):
        given[target] = found
    return [
        (ip, port, min(srv_ttl, ttl))
        for target, port, srv_ttl in records
        for ip, ttl in given[target]
    ]


async def _target(dns: aiodns.DNSResolver, target: str) -> list[tuple[str, float]]:
    """An SRV target's addresses; one that does not exist has none."""
    try:
        return await _hosts(dns, target)
    except _NoSuchName:
        return []


def _addresses(records: Sequence[pycares.DNSRecord], host: str) -> list[tuple[str, float]]:
    """The A and AAAA records of ``host`` among ``records``, each ``(ip, ttl)``. An answer
    holds the CNAMEs it followed too: their targets' records count, with their TTLs."""
    cnames = [
        (r.data.cname.rstrip(".").lower(), float(r.ttl))
        for r in records
        if isinstance(r.data, pycares.CNAMERecordData)
    ]
    names = {host, *(cname for cname, _ in cnames)}
    floor = min((ttl for _, ttl in cnames), default=float("inf"))
    return [
        (r.data.addr, min(float(r.ttl), floor))
        for r in records
        if isinstance(r.data, pycares.ARecordData | pycares.AAAARecordData)
        and r.name.rstrip(".").lower() in names
    ]


class DiscoveryMetrics:
    """The discovery series of a router, one set per source."""

    def __init__(self, metrics: ComponentMetrics) -> None:
        registry = metrics.registry
        self._base = (metrics.role, metrics.instance)
        self.resolutions = Counter(
            "lbstack_discovery_resolutions",
            "Resolutions of each discovery source's name, by result (ok, failed: no "
            "answer, SERVFAIL, NXDOMAIN; empty: an answer without addresses).",
            (*SOURCE, "result"),
            registry=registry,
        )
        self.addresses = Gauge(
            "lbstack_discovery_addresses",
            "Addresses in the set in use from each discovery source (the last good one).",
            SOURCE,
            registry=registry,
        )
        self.ttl = Gauge(
            "lbstack_discovery_ttl_seconds",
            "Time until each discovery source's name is resolved again after a success "
            "(its smallest record TTL, clamped to [min_ttl, max_ttl]).",
            SOURCE,
            registry=registry,
        )
        self.last_success = Gauge(
            "lbstack_discovery_last_success_timestamp_seconds",
            "When each discovery source's name last resolved to addresses (unix time; 0: never).",
            SOURCE,
            registry=registry,
        )

    def labels(self, source: str) -> tuple[str, str, str]:
        return (*self._base, source)


class Source:
    """One set of addresses a router follows: fixed ones, or a name re-resolved every TTL.

    ``on_change(addresses)`` is called with each set that differs from the last (for
    fixed addresses, once at ``start``); never with an empty set. ``purpose`` says what
    the set is for in ``/status`` (``upstreams``, ``peers``). A name is resolved with
    ``resolver`` and counted in ``metrics``; fixed addresses need neither.
    """

    def __init__(
        self,
        origin: Origin,
        on_change: OnChange,
        *,
        purpose: str,
        settings: Discovery,
        resolver: Resolver | None = None,
        metrics: DiscoveryMetrics | None = None,
    ) -> None:
        self.origin = origin
        self.name = str(origin) if isinstance(origin, DnsName) else "fixed"
        self.purpose = purpose
        self._on_change = on_change
        self._settings = settings
        self._resolver = resolver
        self._metrics = metrics
        self.addresses: tuple[Address, ...] = () if isinstance(origin, DnsName) else origin
        self.ttl: float | None = None
        self.state: Result | None = None
        self.last_error = ""
        self.last_success = 0.0  # unix time
        self.counts = dict.fromkeys(RESULTS, 0)
        self._task: asyncio.Task[None] | None = None
        if metrics is not None and isinstance(origin, DnsName):
            labels = metrics.labels(self.name)
            metrics.addresses.labels(*labels).set_function(lambda: len(self.addresses))
            metrics.last_success.labels(*labels).set_function(lambda: self.last_success)
            metrics.ttl.labels(*labels)
            for result in RESULTS:
                metrics.resolutions.labels(*labels, result)

    async def start(self) -> None:
        """Hand over the first set (a name: resolved once, within the timeout), then
        follow the name in the background."""
        if not isinstance(self.origin, DnsName):
            self._on_change(self.addresses)
            return
        delay = await self.refresh()
        self._task = asyncio.create_task(self._follow(delay), name=f"discovery {self.name}")

    async def close(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def _follow(self, delay: float) -> None:
        while True:
            await asyncio.sleep(delay)
            delay = await self.refresh()

    async def refresh(self) -> float:
        """Resolve the name once and apply the answer; the seconds until the next time.

        Never raises but for cancellation: discovery must not take the router down.
        """
        assert isinstance(self.origin, DnsName) and self._resolver is not None
        settings = self._settings
        try:
            answer = await self._resolver.resolve(self.origin)
        except DiscoveryError as exc:
            self._failed(exc.result, str(exc))
            return settings.min_ttl
        except Exception as exc:  # a bug: say so loudly, but keep following
            log.exception("resolving %s crashed", self.name)
            self._failed("failed", repr(exc))
            return settings.min_ttl
        ttl = min(max(answer.ttl, settings.min_ttl), settings.max_ttl)
        self._count("ok")
        self.ttl, self.last_success, self.last_error = ttl, time.time(), ""
        if self._metrics is not None:
            self._metrics.ttl.labels(*self._metrics.labels(self.name)).set(ttl)
        if self.state not in (None, "ok"):
            log.info("%s resolves again: %d addresses", self.name, len(answer.addresses))
        self.state = "ok"
        if answer.addresses != self.addresses:
            old, self.addresses = set(self.addresses), answer.addresses
            log.info(
                "%s (%s): %d addresses, %d new, %d gone; next in %g s",
                self.name,
                self.purpose,
                len(answer.addresses),
                len(set(answer.addresses) - old),
                len(old - set(answer.addresses)),
                ttl,
            )
            self._on_change(answer.addresses)
        return ttl

    def _failed(self, result: Result, problem: str) -> None:
        self._count(result)
        self.last_error = problem
        if self.state != result:
            log.warning(
                "%s: %s; keeping the last good set (%d addresses), trying again every %g s",
                self.name,
                problem,
                len(self.addresses),
                self._settings.min_ttl,
            )
        self.state = result

    def _count(self, result: Result) -> None:
        self.counts[result] += 1
        if self._metrics is not None:
            self._metrics.resolutions.labels(*self._metrics.labels(self.name), result).inc()

    def status(self) -> dict[str, Any]:
        """The source as ``/status`` shows it: its name, the set in use, TTL, last error."""
        return {
            "source": self.name,
            "for": self.purpose,
            "addresses": [str(a) for a in self.addresses],
            "state": self.state or ("fixed" if self.name == "fixed" else "resolving"),
            "ttl": self.ttl,
            "last_success": self.last_success or None,
            "last_error": self.last_error or None,
            "resolutions": dict(self.counts),
        }


__all__ = [
    "Answer",
    "DiscoveryError",
    "DiscoveryMetrics",
    "OnChange",
    "Origin",
    "Resolver",
    "Source",
]
