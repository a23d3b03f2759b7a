"""A proxy's group of servers: what they are, what a simulated one does, and how the
group is sized (by hand or by the autoscaler)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from lbstack.config.fields import AddressField, Duration, Model, Size
from lbstack.config.network import DnsField


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

    kind: Literal["simulated", "command", "address", "dns"] = Field(
        "simulated",
        description="simulated: the built-in application; command: a command the supervisor "
        "runs per server; address: servers something else runs; dns: servers something else "
        "runs, found (and followed) by DNS.",
    )
    command: str = Field(
        "",
        description="For kind=command: the command line, with {socket} for the unix socket "
        "path it must listen on and {name} for the server's name.",
    )
    addresses: tuple[AddressField, ...] = Field(
        (), description="For kind=address: the servers' addresses."
    )
    discover: DnsField | None = Field(
        None,
        description="For kind=dns: dns://NAME:PORT (every A/AAAA record is a server at "
        "PORT) or dns+srv://NAME (every SRV record is one, at the port it gives).",
    )
    admin_api: bool = Field(
        True,
        description="For kind=dns: the servers found are lbstack's (tier=server), with an "
        "admin API at their data port + network.admin_offset that is scraped for load; "
        "false for servers of your own, health-checked at health_path.",
    )
    health_path: str = Field(
        "/healthz",
        description="For command, address and dns servers: the HTTP path that says ready.",
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
        if (self.kind == "dns") != (self.discover is not None):
            raise PydanticCustomError(
                "discover",
                "discover: expected a dns:// or dns+srv:// name exactly when kind='dns', "
                "found kind='{kind}' and discover={found}",
                {"kind": self.kind, "found": str(self.discover) if self.discover else "none"},
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
