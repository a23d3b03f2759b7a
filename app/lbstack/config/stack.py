"""The whole stack: how many of each tier, its listeners, its supervisor, its groups."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from lbstack.address import Address
from lbstack.config.certificates import TLSConfig
from lbstack.config.fields import AddressField, Duration, Model
from lbstack.config.network import AdminConfig, Discovery, Network, Tier
from lbstack.config.servers import Autoscale, GroupConfig, GroupLayout, ServerConfig
from lbstack.config.tiers import BalancerConfig, TierConfig


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
    tier: Tier = Field(
        "all",
        description="What this host runs: all (the whole stack), or one tier of a stack over "
        "several hosts: balancer, proxy (the proxies and their servers) or server.",
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
    network: Network = Network()
    discovery: Discovery = Discovery()
    admin: AdminConfig = AdminConfig()
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

    @model_validator(mode="after")
    def _tier_has_what_it_needs(self) -> Config:
        def refuse(field: str, message: str, **found: object) -> PydanticCustomError:
            return PydanticCustomError(field, message, found)

        upstreams = self.balancer.upstreams
        if self.tier == "balancer" and upstreams == ():
            raise refuse(
                "tier",
                "balancer.upstreams: expected the proxies' addresses or a dns:// name with "
                "tier='balancer', found none",
            )
        if self.tier in ("all", "proxy") and upstreams != ():
            raise refuse(
                "tier",
                "balancer.upstreams: expected none with tier='{tier}' (the balancers send to "
                "this stack's proxies), found {found}",
                tier=self.tier,
                found=str(upstreams),
            )
        if self.tier == "server" and self.proxies != 1:
            raise refuse(
                "tier",
                "proxies: expected 1 with tier='server' (one group of servers, at "
                "network.port + k), found {found}",
                found=self.proxies,
            )
        if self.tier == "server":
            kinds = sorted({g.server.kind for g in self.layouts()} - {"simulated"})
            if kinds:
                raise refuse(
                    "tier",
                    "server.kind: expected 'simulated' with tier='server' (its servers listen "
                    "on TCP for proxies elsewhere), found '{kind}'",
                    kind=kinds[0],
                )
        if self.tier != "all" and not self.network.loopback and self.admin.token_file is None:
            raise refuse(
                "admin",
                "admin.token_file: expected a token file: tier='{tier}' serves admin APIs on "
                "{bind}, which is not loopback",
                tier=self.tier,
                bind=self.network.bind,
            )
        return self

    def group(self, index: int) -> GroupLayout:
        """The effective layout of proxy ``index``'s group."""
        override = self.groups[index] if index < len(self.groups) else None
        server = override.server if override else self.server
        autoscale = override.autoscale if override else self.autoscale
        if server.kind == "address":
            count = len(server.addresses)
        elif server.kind == "dns":
            count = 0  # as many as the name has records, any time
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
