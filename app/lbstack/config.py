"""The one configuration model: defaults, validation, TOML loading and CLI overrides.

Everything configurable is defined here once, as a frozen pydantic model. The
supervisor validates it up front; children receive it as JSON and validate the same
model again, so no component parses options of its own.
"""

from __future__ import annotations

import math
import os
import re
import ssl
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from lbstack import tls
from lbstack.address import Address, parse_address
from lbstack.errors import ConfigError

# The routing policies lbstack.routing registers (a test keeps the two in step).
PolicyName = Literal["round_robin", "least_outstanding", "p2c_ewma"]

_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
# The unit is optional (seconds), so "0.05" from a command line means what 0.05 does.
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ns|us|µs|ms|s|m|h)?\s*$")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """Seconds from a number of seconds or a string like ``250ms``, ``2s``, ``1.5m``."""
    if isinstance(value, bool):
        raise PydanticCustomError("duration", 'expected a duration like "250ms" or "2s"')
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION_RE.match(value)):
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    else:
        raise PydanticCustomError(
            "duration", 'expected a duration like "250ms", "2s" or a number of seconds'
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise PydanticCustomError("duration", "expected a non-negative, finite duration")
    return seconds


def parse_size(value: object) -> int:
    """Bytes from an integer or a string like ``64KiB``, ``1GiB``."""
    if isinstance(value, bool):
        raise PydanticCustomError("size", 'expected a size like "64KiB" or a number of bytes')
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, str) and (match := _SIZE_RE.match(value)):
        unit = match.group(2).lower()
        if unit in _SIZE_UNITS:
            return int(match.group(1)) * _SIZE_UNITS[unit]
    raise PydanticCustomError("size", 'expected a size like "64KiB", "1GiB" or a byte count')


def _address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError(
            "address", "expected 'unix:/path', 'tcp://host:port' or 'https://host:port'"
        )
    try:
        return parse_address(value)
    except ValueError as exc:
        raise PydanticCustomError("address", str(exc)) from exc


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
AddressField = Annotated[Address, BeforeValidator(_address), PlainSerializer(str, return_type=str)]


class Model(BaseModel):
    """Base of every config section: immutable, and unknown keys are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Timeouts(Model):
    """Timeouts of one forwarding tier (balancer or proxy)."""

    connect: Duration = Field(2.0, description="Connecting to an upstream.")
    first_byte: Duration = Field(
        30.0, description="From the request sent upstream to the response headers."
    )
    idle: Duration = Field(
        60.0, description="Longest pause between two body chunks, either direction."
    )
    client_keepalive: Duration = Field(
        75.0,
        description="How long an idle client connection is kept open; also bounds how long a "
        "client may take to send its request headers.",
    )
    pool_idle: Duration = Field(
        15.0,
        description="How long an idle upstream connection stays pooled. Keep it below the "
        "upstream's client_keepalive so a pooled connection is never closed under us.",
    )
    per_try: Duration = Field(
        0.0,
        description="For idempotent requests: response headers within this long, else the "
        "try is abandoned and the request retried on another upstream; 0 means only "
        "first_byte applies.",
    )
    queue: Duration = Field(
        1.0,
        description="Longest wait for a free upstream slot when every upstream is at "
        "max_in_flight_per_upstream; then 503.",
    )


class Limits(Model):
    """Request limits of one forwarding tier."""

    max_header_size: Size = Field(8190, gt=0, description="Longest request line or header field.")
    max_headers: int = Field(128, gt=0, description="Most header fields in one request.")
    max_body_size: Size = Field(
        0, description="Largest request body in bytes (413 beyond it); 0 means no limit."
    )
    max_concurrent: int = Field(
        4096, gt=0, description="Requests in flight in one process; beyond it, 503."
    )
    max_connections_per_upstream: int = Field(
        0, ge=0, description="Pooled connections per upstream; 0 means no limit."
    )
    max_in_flight_per_upstream: int = Field(
        0,
        ge=0,
        description="Requests in flight to one upstream from this process; 0 means no limit. "
        "When every upstream is at it, requests wait in the queue.",
    )
    queue_size: int = Field(
        1024, ge=0, description="Requests that may wait for a free upstream; beyond it, 503."
    )


class HealthCheck(Model):
    """Active health checks of a tier's upstreams."""

    interval: Duration = Field(
        1.0, description="Time between two checks of one upstream; 0 turns checks off."
    )
    timeout: Duration = Field(0.5, description="A check not answered 2xx within this fails.")
    rise: int = Field(2, ge=1, description="Consecutive passed checks that bring an upstream in.")
    fall: int = Field(2, ge=1, description="Consecutive failed checks that take it out.")
    traffic_interval: Duration = Field(
        10.0,
        description="Longest time an upstream goes unchecked while real requests to it "
        "succeed: live traffic already proves it healthy, so its checks wait. Idle, "
        "failing, ejected and unhealthy upstreams are checked every interval. At most "
        "interval (e.g. 0): every check is made.",
    )


class Ejection(Model):
    """Passive ejection: taking out an upstream that fails real requests."""

    consecutive_failures: int = Field(
        5, ge=0, description="Failures in a row (connect, reset, timeout, 5xx) that eject; 0: off."
    )
    base_time: Duration = Field(
        1.0, description="First ejection's length; it doubles with each ejection in a row."
    )
    max_time: Duration = Field(30.0, description="Longest ejection.")
    panic_threshold: float = Field(
        0.5,
        ge=0,
        le=1,
        description="When fewer than this share of upstreams are in, health is ignored and "
        "every upstream takes traffic, so ejecting too many never takes the group out.",
    )


class Retries(Model):
    """When and how often a request goes to another upstream."""

    attempts: int = Field(3, ge=1, description="Tries per request, the first included.")
    budget_ratio: float = Field(
        0.2, ge=0, le=1, description="Retries may add at most this share of requests."
    )
    budget_min_per_second: float = Field(
        10.0, ge=0, description="Retries always allowed per second, whatever the ratio."
    )
    statuses: tuple[int, ...] = Field(
        (502, 503, 504),
        description="Upstream answers that an idempotent request is retried on elsewhere.",
    )
    reached_attempts: int = Field(
        2,
        ge=1,
        description="Most tries of one request that may have reached an upstream (it "
        "answered with one of statuses, lost the connection after the request was sent, "
        "or timed out); tries that never reached one (connect failures) don't count. "
        "With the balancer's empty statuses, one client request reaches at most this "
        "many servers.",
    )


def _pair(cert: Path | None, key: Path | None) -> None:
    if (cert is None) != (key is None):
        given, missing = ("cert", "key") if key is None else ("key", "cert")
        raise PydanticCustomError(
            "tls",
            "{missing}: expected a {missing} with the {given}, found only the {given}",
            {"missing": missing, "given": given},
        )


class UpstreamTLS(Model):
    """TLS to a tier's upstreams at ``https://`` addresses (others are plain)."""

    ca_file: Path | None = Field(
        None,
        description="PEM file of the CA certificates upstreams are verified against; "
        "default: the system's trust store.",
    )
    server_name: str = Field(
        "",
        description="The name sent (SNI) and checked in the upstream's certificate; "
        "default: the host of its address.",
    )
    cert: Path | None = Field(
        None, description="Client certificate (PEM) for upstreams that require one (mTLS)."
    )
    key: Path | None = Field(None, description="The client certificate's private key (PEM).")
    verify: bool = Field(
        True,
        description="Verify the upstream's certificate and name. false only for tests: "
        "anyone on the path can then read and change the traffic (logged as a warning).",
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> UpstreamTLS:
        _pair(self.cert, self.key)
        return self


class Tunnels(Model):
    """Upgraded connections (WebSocket) through a tier: a byte tunnel once the upstream
    answers ``101 Switching Protocols``."""

    protocols: tuple[str, ...] = Field(
        ("websocket",),
        description="Upgrade tokens that are tunnelled; a request upgrading to another "
        "is forwarded as a plain request, without its Upgrade.",
    )
    max: int = Field(1024, ge=0, description="Most tunnels open in one process; beyond it, 503.")
    idle_timeout: Duration = Field(
        300.0, description="A tunnel with no byte either way for this long is closed."
    )


class TierConfig(Model):
    """One forwarding tier: the balancer or every proxy."""

    policy: PolicyName = Field("p2c_ewma", description="Routing policy.")
    weights: dict[str, float] = Field(
        {}, description='Routing weight per upstream name (default 1), e.g. {"server-0-2" = 2}.'
    )
    slow_start: Duration = Field(
        5.0, description="New and re-admitted upstreams ramp up to full share over this long."
    )
    decay: Duration = Field(
        2.0, description="Time constant of the peak-EWMA latency estimate (p2c_ewma)."
    )
    scrape_interval: Duration = Field(
        1.0,
        description="How often the upstreams' /metrics are read to fold their own load into "
        "routing; 0 turns it off.",
    )
    scrape_max_rate: float = Field(
        32.0,
        ge=0,
        description="Most scrapes per second one router makes: with more upstreams than "
        "this × scrape_interval, each is scraped every upstreams / this seconds instead. "
        "0: no bound.",
    )
    access_log: str = Field(
        "",
        description="JSON-lines access log: a file path ({name} becomes the component's "
        'name), "-" for stderr, or "" for none.',
    )
    timeouts: Timeouts = Timeouts()
    limits: Limits = Limits()
    health: HealthCheck = HealthCheck()
    ejection: Ejection = Ejection()
    retries: Retries = Retries()
    tunnels: Tunnels = Tunnels()
    upstream_tls: UpstreamTLS = UpstreamTLS()


class ExchangeConfig(Model):
    """How balancers read each other's load view and fold it into their routing."""

    enabled: bool = Field(
        True,
        description="Balancers poll each other's GET /load and count the others' requests "
        "in flight to each proxy as load; only in effect with balancers > 1.",
    )
    interval: Duration = Field(0.25, description="Time between two polls of one peer.")
    timeout: Duration = Field(
        0.5, description="A poll not answered within this fails; routing never waits for it."
    )
    stale_after: Duration = Field(
        1.5,
        description="A peer's view older than this is ignored; from half this age its "
        "figures fade out linearly.",
    )

    @model_validator(mode="after")
    def _fresh_within_stale(self) -> ExchangeConfig:
        if self.interval <= 0:
            raise PydanticCustomError(
                "exchange",
                "interval: expected a duration above 0 (set enabled = false to turn the "
                "exchange off), found {found}s",
                {"found": self.interval},
            )
        if self.timeout <= 0:
            raise PydanticCustomError(
                "exchange",
                "timeout: expected a duration above 0, found {found}s",
                {"found": self.timeout},
            )
        if self.stale_after <= self.interval:
            raise PydanticCustomError(
                "exchange",
                "stale_after: expected more than interval ({interval}s), found {found}s",
                {"interval": self.interval, "found": self.stale_after},
            )
        return self


class BalancerRetries(Retries):
    """The balancer's retries: a 5xx answer is retried at the proxies, not here too."""

    statuses: tuple[int, ...] = Field(
        (),
        description="Upstream answers that an idempotent request is retried on elsewhere. "
        "None by default at the balancer: a response-level retry happens at one tier only, "
        "so one client request never fans out.",
    )


class BalancerConfig(TierConfig):
    """The balancer tier: a forwarding tier, plus the load exchange between balancers."""

    retries: BalancerRetries = BalancerRetries()
    exchange: ExchangeConfig = ExchangeConfig()


class Simulation(Model):
    """The work a simulated application server pretends to do per request."""

    latency: Duration = Field(0.0, description="Added latency per request (mean or median).")
    latency_distribution: Literal["fixed", "uniform", "exponential", "lognormal"] = Field(
        "fixed",
        description="fixed; uniform on [0, 2×latency]; exponential with mean latency; "
        "lognormal with median latency and shape latency_sigma.",
    )
    latency_sigma: float = Field(0.5, ge=0, le=5, description="Shape of the lognormal latency.")
    cpu: Duration = Field(0.0, description="CPU time burnt per request.")
    response_size: Size = Field(0, description="Padding bytes added to each response body.")
    error_rate: float = Field(
        0.0, ge=0, le=1, description="Share of requests answered with an error."
    )
    error_status: int = Field(500, ge=400, le=599, description="Status of a simulated error.")


class ServerConfig(Model):
    """What the servers of a group are and how they are run."""

    kind: Literal["simulated", "command", "address"] = Field(
        "simulated",
        description="simulated: the built-in application; command: a command the supervisor "
        "runs per server; address: servers something else runs.",
    )
    command: str = Field(
        "",
        description="For kind=command: the command line, with {socket} for the unix socket "
        "path it must listen on and {name} for the server's name.",
    )
    addresses: tuple[AddressField, ...] = Field(
        (), description="For kind=address: the servers' addresses."
    )
    health_path: str = Field(
        "/healthz", description="For command and address servers: the HTTP path that says ready."
    )
    keepalive: Duration = Field(
        75.0, description="For simulated servers: idle keep-alive of client connections."
    )
    simulation: Simulation = Simulation()

    @model_validator(mode="after")
    def _kind_fields(self) -> ServerConfig:
        if self.kind == "command":
            if "{socket}" not in self.command:
                raise PydanticCustomError(
                    "command",
                    "command: expected a command line containing {socket} (kind='command'), "
                    "found '{found}'",
                    {"found": self.command},
                )
        elif self.command:
            raise PydanticCustomError(
                "command",
                "command: expected no command unless kind='command', found kind='{kind}'",
                {"kind": self.kind},
            )
        if self.kind == "address" and not self.addresses:
            raise PydanticCustomError(
                "addresses",
                "addresses: expected at least one address (kind='address'), found none",
            )
        if self.kind != "address" and self.addresses:
            raise PydanticCustomError(
                "addresses",
                "addresses: expected no addresses unless kind='address', found kind='{kind}'",
                {"kind": self.kind},
            )
        if not self.health_path.startswith("/"):
            raise PydanticCustomError(
                "health_path",
                "health_path: expected a path starting with '/', found '{found}'",
                {"found": self.health_path},
            )
        return self


class Autoscale(Model):
    """How the supervisor grows and shrinks a server group with its load (like the HPA)."""

    enabled: bool = Field(False, description="Scale this group automatically.")
    min: int = Field(1, ge=1, le=1024, description="Fewest servers.")
    max: int = Field(10, ge=1, le=1024, description="Most servers.")
    signal: Literal["in_flight", "p99", "cpu"] = Field(
        "in_flight",
        description="The load measured: requests in flight per server, the proxy's p99 "
        "latency to its servers (seconds), or CPU per server (cores).",
    )
    target: float = Field(
        4.0, gt=0, description="The signal's value per server the group is sized for."
    )
    tolerance: float = Field(
        0.1, ge=0, lt=1, description="No change while observed/target is within 1 ± this."
    )
    interval: Duration = Field(2.0, description="Time between two decisions.")
    window: Duration = Field(10.0, description="The signal is averaged over this long.")
    scale_up_window: Duration = Field(
        0.0, description="Scale up to the lowest recommendation of this long (0: at once)."
    )
    scale_down_window: Duration = Field(
        60.0, description="Scale down only to the highest recommendation of this long."
    )
    max_step_up: int = Field(4, ge=1, description="Most servers one step adds.")
    max_step_down: int = Field(1, ge=1, description="Most servers one step removes.")
    hold: Duration = Field(
        60.0, description="After `lbstack scale` by hand, no automatic step for this long."
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise PydanticCustomError(
                "autoscale",
                "min: expected at most max ({max}), found {min}",
                {"max": self.max, "min": self.min},
            )
        return self


class GroupConfig(Model):
    """Overrides for one proxy's group; unset fields come from the top level."""

    servers: int | None = Field(None, ge=1, le=1024, description="Servers in this group.")
    server: ServerConfig = ServerConfig()
    autoscale: Autoscale = Autoscale()


class CertificateFiles(Model):
    """One certificate the https listeners serve, for the names it holds."""

    cert: Path = Field(description="The certificate (PEM), its chain after it.")
    key: Path = Field(description="Its private key (PEM, unencrypted).")


def _tls_version(value: object) -> object:
    # TOML's 1.2 is a float: take it for the "1.2" it means.
    return str(value) if isinstance(value, float) else value


def _ciphers(value: object) -> object:
    if isinstance(value, str):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(value)
        except ssl.SSLError as exc:
            raise PydanticCustomError(
                "ciphers",
                "expected an OpenSSL cipher list that selects at least one cipher, found '{found}'",
                {"found": value},
            ) from exc
    return value


class TLSConfig(Model):
    """The certificates and settings of the balancers' https listeners."""

    cert: Path | None = Field(
        None, description="The certificate (PEM, its chain after it), when there is one."
    )
    key: Path | None = Field(None, description="Its private key (PEM, unencrypted).")
    certificates: tuple[CertificateFiles, ...] = Field(
        (),
        description="Several certificates ([[tls.certificates]] with cert and key), chosen "
        "per connection by the name the client asks for (SNI) among each one's "
        "subjectAltName DNS names (else its CN); the first serves clients that ask for "
        "none or an unknown name. After cert/key when both are given.",
    )
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = Field(
        "1.2", description='Oldest TLS version accepted: "1.2" or "1.3".'
    )
    ciphers: Annotated[str, BeforeValidator(_ciphers)] = Field(
        "ECDHE+AESGCM:ECDHE+CHACHA20",
        description="TLS 1.2 cipher suites (OpenSSL syntax); TLS 1.3 suites are OpenSSL's.",
    )

    @model_validator(mode="after")
    def _cert_with_key(self) -> TLSConfig:
        _pair(self.cert, self.key)
        return self

    @property
    def configured(self) -> bool:
        """Whether any certificate is given."""
        return self.cert is not None or bool(self.certificates)


class SupervisorConfig(Model):
    """How the supervisor starts, restarts and stops children."""

    graceful_timeout: Duration = Field(
        10.0, description="How long a stopping child may finish in-flight work before SIGKILL."
    )
    drain_window: Duration = Field(
        2.0,
        description="Part of graceful_timeout a stopping child keeps its idle keep-alive "
        "connections open, answering any request on them with Connection: close, before "
        "closing them.",
    )
    ready_timeout: Duration = Field(15.0, description="How long a child may take to become ready.")
    restart_backoff_initial: Duration = Field(0.1, description="First restart delay.")
    restart_backoff_max: Duration = Field(10.0, description="Longest restart delay.")
    stable_after: Duration = Field(
        10.0, description="A child that ran this long is stable: its back-off starts over."
    )
    boot_failures: int = Field(
        5,
        ge=1,
        description="Consecutive failures before ready that stop the stack while it boots; "
        "later they fail only the scale step or reload that started the child.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level of the supervisor and every child."
    )

    @model_validator(mode="after")
    def _drain_within_grace(self) -> SupervisorConfig:
        if self.drain_window >= self.graceful_timeout:
            raise PydanticCustomError(
                "drain_window",
                "drain_window: expected less than graceful_timeout ({graceful}s), found {found}s",
                {"graceful": self.graceful_timeout, "found": self.drain_window},
            )
        return self


class Config(Model):
    """The whole stack."""

    run_dir: Path | None = Field(
        None,
        description="Where sockets live; default $XDG_RUNTIME_DIR/lbstack or /tmp/lbstack-<uid>.",
    )
    balancers: int = Field(1, ge=1, le=64, description="Balancer processes sharing the listeners.")
    proxies: int = Field(2, ge=1, le=256, description="Reverse proxies, one per server group.")
    servers_per_proxy: int = Field(3, ge=1, le=1024, description="Servers behind each proxy.")
    listen: tuple[AddressField, ...] = Field(
        (),
        description="Extra balancer listeners beside balancer.sock, e.g. tcp://127.0.0.1:8080; "
        "https://0.0.0.0:8443 terminates TLS with the certificates of [tls].",
    )
    metrics_listen: AddressField | None = Field(
        Address("tcp", host="127.0.0.1", port=9464),
        description="Loopback TCP address where the supervisor serves every component's metrics.",
    )
    balancer: BalancerConfig = BalancerConfig()
    proxy: TierConfig = TierConfig()
    server: ServerConfig = ServerConfig()
    groups: tuple[GroupConfig, ...] = Field(
        (), description="Per-proxy overrides, in proxy order; when given, they define the proxies."
    )
    autoscale: Autoscale = Autoscale()
    tls: TLSConfig = TLSConfig()
    supervisor: SupervisorConfig = SupervisorConfig()

    @model_validator(mode="before")
    @classmethod
    def _merge_group_defaults(cls, data: Any) -> Any:
        """Each group's server table is the top-level one with the group's keys on top."""
        if not isinstance(data, dict) or not isinstance(data.get("groups"), list | tuple):
            return data
        groups = []
        for group in data["groups"]:
            merged_group = group
            for table in ("server", "autoscale"):
                base = data.get(table, {})
                if (
                    isinstance(merged_group, Mapping)
                    and isinstance(base, Mapping)
                    and isinstance(merged_group.get(table, {}), Mapping)
                ):
                    top = merged_group.get(table, {})
                    merged_group = {**merged_group, table: _deep_merge(base, top)}
            groups.append(merged_group)
        merged = {**data, "groups": groups}
        if groups and "proxies" in data and data["proxies"] != len(groups):
            raise PydanticCustomError(
                "groups",
                "proxies: expected the number of [[groups]] ({n}) or no proxies key, "
                "found {proxies}",
                {"proxies": data["proxies"], "n": len(groups)},
            )
        if groups:
            merged["proxies"] = len(groups)
        return merged

    @model_validator(mode="after")
    def _weights_name_upstreams(self) -> Config:
        # Servers may be added at runtime (lbstack scale): any index of a group is valid.
        groups = "|".join(str(g.index) for g in self.layouts())
        tiers = (
            ("balancer", re.compile(rf"proxy-({groups})"), f"proxy-<0..{self.proxies - 1}>"),
            ("proxy", re.compile(rf"server-({groups})-\d+"), "server-<group>-<index>"),
        )
        for tier, pattern, known in tiers:
            for name, weight in getattr(self, tier).weights.items():
                if not pattern.fullmatch(name):
                    raise PydanticCustomError(
                        "weights",
                        "{tier}.weights: expected an upstream of the {tier} tier "
                        "({known}), found '{name}'",
                        {"tier": tier, "known": known, "name": name},
                    )
                if not weight > 0:
                    raise PydanticCustomError(
                        "weights",
                        "{tier}.weights.{name}: expected a weight above 0, found {weight}",
                        {"tier": tier, "name": name, "weight": weight},
                    )
        return self

    @model_validator(mode="after")
    def _https_has_certificates(self) -> Config:
        https = [str(a) for a in self.listen if a.is_tls]
        if https and not self.tls.configured:
            raise PydanticCustomError(
                "tls",
                "tls: expected cert and key (or [[tls.certificates]]) for the https "
                "listener {listener}, found none",
                {"listener": https[0]},
            )
        return self

    def group(self, index: int) -> GroupLayout:
        """The effective layout of proxy ``index``'s group."""
        override = self.groups[index] if index < len(self.groups) else None
        server = override.server if override else self.server
        autoscale = override.autoscale if override else self.autoscale
        if server.kind == "address":
            count = len(server.addresses)
        elif override and override.servers is not None:
            count = override.servers
        else:
            count = self.servers_per_proxy
        return GroupLayout(index=index, servers=count, server=server, autoscale=autoscale)

    def layouts(self) -> list[GroupLayout]:
        return [self.group(i) for i in range(self.proxies)]

    def resolved_run_dir(self) -> Path:
        if self.run_dir is not None:
            return self.run_dir
        return default_run_dir()


class GroupLayout(BaseModel):
    """A proxy group as it is run: its index, server count and server config."""

    model_config = ConfigDict(frozen=True)

    index: int
    servers: int
    server: ServerConfig
    autoscale: Autoscale

    @property
    def name(self) -> str:
        return f"proxy-{self.index}"


def default_run_dir() -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "lbstack"
    return Path(f"/tmp/lbstack-{os.getuid()}")


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(errors: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for error in errors.errors(include_url=False):
        path = ".".join(str(part) for part in error["loc"]) or "(top level)"
        found = error.get("input")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            problems.append(f"{prefix}{path}: unknown field (expected one of the documented keys)")
            continue
        if error["type"] == "missing":
            problems.append(f"{prefix}{path}: required field is missing")
            continue
        if not error["loc"] and "found" in message:
            # A whole-model check: its message names the field and what it found.
            problems.append(f"{prefix}{message}")
            continue
        message = message[0].lower() + message[1:] if message else message
        if "expected" not in message:
            message = f"expected: {message}"
        if "found" not in message:
            shown = f"a {type(found).__name__}" if isinstance(found, dict | list) else repr(found)
            message = f"{message}; found {shown}"
        problems.append(f"{prefix}{path}: {message}")
    return problems


def validate(data: Mapping[str, Any], source: str = "") -> Config:
    """Validate raw settings into a Config, or raise ConfigError listing every problem.

    The files it names (certificates, keys, CAs) are checked too: they must be
    usable now. (A child validates only the model again: see ``from_json``.)
    """
    prefix = f"{source}: " if source else ""
    try:
        config = Config.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, prefix)) from exc
    problems = tls.problems(config)
    if problems:
        raise ConfigError([prefix + p for p in problems])
    return config


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise ConfigError([f"{path}: no such config file"]) from exc
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config file: {exc.strerror}"]) from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from exc


def load(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Load the TOML file (if any), apply CLI overrides on top, validate once."""
    data: dict[str, Any] = read_toml(path) if path is not None else {}
    for dotted, value in (overrides or {}).items():
        target = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = value
    return validate(data, str(path) if path is not None else "")


def from_json(text: str) -> Config:
    """The config a child receives from its supervisor."""
    return Config.model_validate_json(text)
