"""A forwarding tier's sections: the proxies' and the balancer's (the same, plus the
load exchange between balancers)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lbstack.config.certificates import UpstreamTLS
from lbstack.config.fields import Duration, Model, Size
from lbstack.config.network import UpstreamSource

# The routing policies lbstack.routing registers (a test keeps the two in step).
PolicyName = Literal["round_robin", "least_outstanding", "p2c_ewma"]


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
    peers: UpstreamSource = Field(
        (),
        description="Balancers on other hosts (tier=balancer), by their admin API: "
        "tcp:// addresses, or dns://NAME:PORT / dns+srv://NAME, followed as they change. "
        "This host's own balancers are peers anyway.",
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

    upstreams: UpstreamSource = Field(
        (),
        description="With tier=balancer: the proxies, as tcp:// addresses or dns://NAME:PORT "
        "/ dns+srv://NAME (followed as the records change). With tier=all: none (the "
        "stack's own proxies).",
    )
    retries: BalancerRetries = BalancerRetries()
    exchange: ExchangeConfig = ExchangeConfig()
