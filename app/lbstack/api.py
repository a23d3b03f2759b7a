"""The messages of the control API and the admin API, as typed models.

The supervisor serves the **control API** on ``<run-dir>/control.sock``; every child
serves an **admin API** on ``<run-dir>/<name>.admin.sock``. These models are what
both sides agree on: the clients in ``lbstack.client`` return them, and servers
validate requests with them.

Control API (supervisor)::

    GET  /status     StackStatus        what `lbstack status --json` prints (a contract)
    POST /scale      ScaleRequest       -> ScaleResult
    POST /drain      DrainRequest       -> DrainResult     409 {"error"} when refused
    POST /undrain    UndrainRequest     -> DrainResult
    POST /reload     ReloadRequest      -> ReloadResult    422 {"error", "problems"}: bad config
    POST /restart    RestartRequest     -> RestartResult
    POST /upgrade    UpgradeRequest     -> UpgradeStarted  (then the supervisor re-executes)
    GET  /metrics    Prometheus text;   GET /healthz, /readyz: 200 or 503

Admin API (each child)::

    GET  /status                       RouterStatus (balancer, proxy) or ServerStatus
    GET  /metrics, /healthz, /readyz   as the control API's
    GET  /upstreams                    UpstreamList           (routers)
    POST /upstreams                    UpstreamSpec -> UpstreamView, 201
    GET  /upstreams/{name}             UpstreamView; POST .../drain, .../undrain,
                                       .../recycle and DELETE answer it too
    GET  /load                         LoadReport             (routers; see lbstack.peering)
    GET  /fault, POST /fault           FaultState             (simulated servers)

Requests are strict (an int is not a bool, a string is not an int) and refuse unknown
fields, so that a typo is a 400 rather than a silently ignored option; a server reads
one with ``Model.parse(body)``, which raises ``InvalidRequest`` with one line per bad
field. Responses are lenient the other way: a field they don't declare is kept (and
written back by ``to_json``), and fields a supervisor from an older release leaves out
have defaults, so a client can still talk to the stack it is about to upgrade.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lbstack.component import UpstreamSpec
from lbstack.config import AddressField, Simulation
from lbstack.errors import InvalidRequest

# ---- requests ------------------------------------------------------------------------


class Request(BaseModel):
    """A control API request body: strict types, no unknown fields."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @classmethod
    def parse(cls, body: bytes) -> Self:
        """The request in a body (an empty one is ``{}``); ``InvalidRequest`` naming
        each bad field, what was expected and what was found."""
        try:
            return cls.model_validate_json(body.strip() or b"{}")
        except ValidationError as exc:
            raise InvalidRequest(request_problems(exc, cls.model_fields)) from exc


class ScaleRequest(Request):
    """``POST /scale``: grow or shrink ``group`` (``proxy-0``) to ``servers`` servers."""

    group: str
    servers: int


class DrainRequest(Request):
    """``POST /drain``: no new requests to ``name``; ``force`` even if it is the last
    upstream its router has."""

    name: str
    force: bool = False


class UndrainRequest(Request):
    """``POST /undrain``: ``name`` takes new requests again."""

    name: str


class ReloadRequest(Request):
    """``POST /reload``: re-read the config; ``dry_run`` only says what would change."""

    dry_run: bool = False


class RestartRequest(Request):
    """``POST /restart``: replace these children one at a time (every one when empty)."""

    names: list[str]


class UpgradeRequest(Request):
    """``POST /upgrade``: no fields."""


def request_problems(error: ValidationError, known: Iterable[str] = ()) -> list[str]:
    """One line per problem of a request body: ``field: expected ..., found ...``.

    ``known``: the fields the request has, named when an unknown one is found.
    """
    lines = []
    for problem in error.errors(include_url=False):
        field = _field(problem["loc"])
        kind, value = problem["type"], problem.get("input")
        if kind == "missing":
            expected, found = "a value (required)", "nothing"
        elif kind == "extra_forbidden":
            names = ", ".join(known)
            expected = f"one of the fields {names}" if names else "no fields"
            found = "an unknown field"
        elif kind == "json_invalid":
            reason = problem.get("ctx", {}).get("error", "")
            expected, found = "a JSON object", f"invalid JSON ({reason})"
        else:
            expected = _EXPECTED.get(kind) or problem["msg"].removeprefix("Input should be ")
            found = _describe(value)
        lines.append(f"{field}: expected {expected}, found {found}")
    return lines


_EXPECTED = {
    "bool_type": "true or false",
    "int_type": "an integer",
    "string_type": "a string",
    "list_type": "a list",
    "model_type": "a JSON object",
    "dict_type": "a JSON object",
}


def _field(location: tuple[int | str, ...]) -> str:
    """``("names", 0)`` -> ``names[0]``; the body itself is ``(body)``."""
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(body)"


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a list"
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# ---- responses -----------------------------------------------------------------------


class Response(BaseModel):
    """An answer: fields it does not declare are kept, and ``to_json`` writes it back."""

    model_config = ConfigDict(extra="allow", frozen=True)

    def to_json(self) -> dict[str, Any]:
        """The JSON object this was read from: the fields it had, in the server's order
        where the model declares them (those it doesn't, after)."""
        return self.model_dump(mode="json", exclude_unset=True)


Role = Literal["supervisor", "balancer", "proxy", "server"]


class ComponentStatus(Response):
    """One process of the stack in ``GET /status`` (the supervisor is one too).

    ``state``: ``starting``, ``ready``, ``draining``, ``backoff``, ``stopping``,
    ``stopped``, ``failed`` or ``external`` (a server something else runs).
    """

    name: str
    role: Role
    group: str | None = None  # the proxy a server belongs to, e.g. "proxy-0"
    pid: int | None = None
    state: str = "unknown"
    restarts: int = 0
    listen: list[AddressField] = []
    admin: AddressField | None = None  # None: no admin API (a server the user runs)
    started_at: float | None = None  # Unix time of the current process's start
    last_exit: str | None = None  # how the previous process ended
    upgrades: int = 0  # the supervisor's: `lbstack upgrade`s since it started


class AutoscaleStatus(Response):
    """One autoscaled group: its policy, how many evaluations so far, the last decision
    (the decision's fields are absent until the first one)."""

    signal: str
    target: float
    tolerance: float
    min: int
    max: int
    evaluations: int
    problem: str | None = None  # why the last evaluation could not decide
    current: int | None = None
    observed: float | None = None
    recommendation: int | None = None
    desired: int | None = None
    reason: str | None = None


class StackStatus(Response):
    """``GET /status`` of the control API: what ``lbstack status --json`` prints."""

    run_dir: str = ""
    balancer: list[AddressField] = []  # balancer.sock, then the extra listeners
    metrics: AddressField | None = None  # the Prometheus endpoint, if any
    components: list[ComponentStatus]
    autoscale: dict[str, AutoscaleStatus] = {}  # by group

    def component(self, name: str) -> ComponentStatus:
        """The component ``name``; KeyError naming the known ones if there is none."""
        for component in self.components:
            if component.name == name:
                return component
        raise KeyError(f"no component {name!r}; known: {', '.join(self.names())}")

    def names(self, *roles: Role) -> list[str]:
        """The components' names, only those of ``roles`` if given."""
        return [c.name for c in self.components if not roles or c.role in roles]


class ScaleResult(Response):
    """``POST /scale``: the group's servers now."""

    group: str
    servers: list[str]


class DrainResult(Response):
    """``POST /drain`` says ``drained``, ``POST /undrain`` says ``undrained``."""

    drained: str | None = None
    undrained: str | None = None


class ReloadResult(Response):
    """``POST /reload``: what changed (with ``dry_run``: what would)."""

    dry_run: bool = False
    replaced: list[str] = []  # children replaced with the new config
    balancers: list[str] = []  # "+balancer-2" started, "-balancer-1" stopped
    scaled: dict[str, int] = {}  # groups resized to the config's size
    certificates: list[str] = []  # balancers that re-read their certificates


class RestartResult(Response):
    """``POST /restart``: the children replaced, in order."""

    replaced: list[str]


class UpgradeStarted(Response):
    """``POST /upgrade``: sent just before the supervisor re-executes itself."""

    upgrading: int  # the supervisor's pid, which it keeps


class Probe(Response):
    """``GET /healthz`` and ``/readyz`` (``status``: alive, ready, not ready, draining)."""

    status: str
    instance: str | None = None


# ---- the admin API of routers (balancers and proxies) -------------------------------


class ReportedLoad(Response):
    """What an upstream says of its own load in its metrics, as last scraped."""

    in_flight: float
    latency: float
    health: float
    age: float | None  # seconds since the scrape; None before the first


class UpstreamView(Response):
    """One upstream of a router: where it is, its gate (health, drain, ejection), its load."""

    name: str
    address: AddressField
    admin: AddressField | None = None
    weight: float = 1.0
    effective_weight: float = 1.0  # the weight routing uses now (ramping in slow start)
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    cost: float | None = None  # the policy's cost, for policies that have one
    latency_ewma: float = 0.0
    reported: ReportedLoad | None = None
    healthy: bool = True
    available: bool = True  # routing may send it requests
    draining: bool = False
    ejected_for_seconds: float = 0.0
    ejections: int = 0
    consecutive_failures: int = 0
    slow_start_remaining_seconds: float = 0.0
    checks_skipped: int = 0
    peer_in_flight: float | None = None  # a balancer with peers: what they have in flight


class UpstreamList(Response):
    """``GET /upstreams``."""

    upstreams: list[UpstreamView]


class Tunnels(Response):
    """Upgraded connections (WebSocket) a router relays."""

    open: int
    max: int


class PeerUpstream(Response):
    """One upstream as a peer balancer last reported it."""

    in_flight: float
    requests: int
    latency: float
    available: bool


class PeerStatus(Response):
    """Another balancer, as this one polls its ``/load``."""

    name: str
    address: AddressField
    up: bool  # its view is fresh enough to route with
    age: float | None
    weight: float
    errors: int
    last_error: str | None = None
    pid: int | None = None
    seq: int | None = None
    in_flight: float | None = None
    upstreams: dict[str, PeerUpstream] = {}


class RouterStatus(Response):
    """``GET /status`` of a balancer or a proxy: every input of its routing decisions."""

    name: str
    role: Literal["balancer", "proxy"]
    state: str
    in_flight: int
    queued: int = 0
    policy: str
    panic: bool = False  # too few healthy upstreams: routing ignores health
    retry_budget: float = 0.0
    tunnels: Tunnels | None = None
    upstreams: list[UpstreamView]
    peers: list[PeerStatus] = []  # balancers with peers only


class UpstreamLoad(Response):
    """One upstream in a router's ``GET /load``: the router's own figures."""

    name: str
    in_flight: int
    requests: int
    errors: int
    latency_ewma: float
    latency_age: float | None
    available: bool
    healthy: bool
    ejected: bool
    draining: bool


class LoadReport(Response):
    """``GET /load`` of a router: its own load, numbered, which peer balancers poll."""

    name: str
    role: str
    pid: int
    seq: int  # views this process has served
    time: float
    interval: float
    in_flight: int
    upstreams: list[UpstreamLoad]


# ---- the admin API of simulated servers ---------------------------------------------


class ServerStatus(Response):
    """``GET /status`` of a simulated server."""

    name: str
    role: Literal["server"]
    state: str  # "ready", or "hanging" while a hang fault is on
    in_flight: int
    requests: int
    received: dict[str, int] = {}  # requests by method, counted on arrival
    held: int = 0  # requests held by a hang fault
    simulation: Simulation


class FaultState(Response):
    """``GET /fault`` and the answer of ``POST /fault``; a crash fault adds
    ``crashing`` and the ``exit_status`` the server is about to exit with."""

    simulation: Simulation
    configured: Simulation
    hanging: bool
    held: int
    crashing: bool = False
    exit_status: int | None = None


ChildStatus = Annotated[RouterStatus | ServerStatus, Field(discriminator="role")]


__all__ = [
    "AutoscaleStatus",
    "ChildStatus",
    "ComponentStatus",
    "DrainRequest",
    "DrainResult",
    "FaultState",
    "LoadReport",
    "PeerStatus",
    "PeerUpstream",
    "Probe",
    "ReloadRequest",
    "ReloadResult",
    "ReportedLoad",
    "Request",
    "Response",
    "RestartRequest",
    "RestartResult",
    "RouterStatus",
    "ScaleRequest",
    "ScaleResult",
    "ServerStatus",
    "StackStatus",
    "Tunnels",
    "UndrainRequest",
    "UpgradeRequest",
    "UpgradeStarted",
    "UpstreamList",
    "UpstreamLoad",
    "UpstreamSpec",
    "UpstreamView",
]
