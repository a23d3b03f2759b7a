"""A stack over several hosts: which tier this host runs, how other hosts reach it,
where its upstreams are found (fixed addresses or DNS), and the admin API's token."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, PlainSerializer, model_validator
from pydantic_core import PydanticCustomError

from lbstack.address import Address
from lbstack.config.fields import AddressField, Duration, Model

Tier = Literal["all", "balancer", "proxy", "server"]
DNS_SCHEME = "dns://"
SRV_SCHEME = "dns+srv://"


@dataclass(frozen=True)
class DnsName:
    """Upstreams found by DNS: every A/AAAA record of ``name`` at ``port``, or (``srv``)
    every SRV record of ``name``, with the port each record gives."""

    name: str
    port: int | None  # None for SRV: the records give the ports
    srv: bool = False

    def __str__(self) -> str:
        if self.srv:
            return f"{SRV_SCHEME}{self.name}"
        return f"{DNS_SCHEME}{self.name}:{self.port}"


def parse_dns_name(text: str) -> DnsName:
    """``dns://NAME:PORT`` or ``dns+srv://NAME``; ValueError saying what is wrong."""
    expected = "dns://NAME:PORT (A/AAAA records) or dns+srv://NAME (SRV records)"
    if text.startswith(SRV_SCHEME):
        name = text[len(SRV_SCHEME) :].rstrip(".")
        if not _hostname(name):
            raise ValueError(f"expected {expected}, found {text!r}")
        return DnsName(name, None, srv=True)
    if text.startswith(DNS_SCHEME):
        name, _, port = text[len(DNS_SCHEME) :].rpartition(":")
        name = name.rstrip(".")
        if not _hostname(name) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"expected {expected}, found {text!r}")
        return DnsName(name, int(port))
    raise ValueError(f"expected {expected}, found {text!r}")


def _hostname(name: str) -> bool:
    labels = name.split(".")
    return (
        bool(name)
        and len(name) <= 253
        and all(
            0 < len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
            for label in labels
        )
    )


def _dns_or_addresses(value: object) -> object:
    """A ``dns://`` or ``dns+srv://`` string becomes a DnsName; a list stays addresses."""
    if isinstance(value, str) and value.startswith(("dns://", "dns+srv://")):
        return parse_dns_name(value)
    if isinstance(value, str):
        return (value,)  # one address
    return value


def _dns(value: object) -> object:
    return parse_dns_name(value) if isinstance(value, str) else value


DnsField = Annotated[DnsName, BeforeValidator(_dns), PlainSerializer(str, return_type=str)]


# Where a router's upstreams are: fixed addresses, or a name to resolve (and follow).
def _source_json(source: DnsName | tuple[Address, ...]) -> str | list[str]:
    return str(source) if isinstance(source, DnsName) else [str(a) for a in source]


UpstreamSource = Annotated[
    DnsName | tuple[AddressField, ...],
    BeforeValidator(_dns_or_addresses),
    PlainSerializer(_source_json),
]


def _nameserver(value: object) -> object:
    if not isinstance(value, str):
        return value
    if value.startswith("[") and "]:" in value:  # [IPv6]:PORT
        host, _, port = value[1:].partition("]:")
    elif value.count(":") == 1:  # IPv4:PORT
        host, _, port = value.partition(":")
    else:  # an address alone
        host, port = value, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(
            f"expected an IP address, optionally with :PORT, found {value!r}"
        ) from None
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"expected a port from 1 to 65535, found {port!r}")
    return value


Nameserver = Annotated[str, BeforeValidator(_nameserver)]


class Discovery(Model):
    """How DNS names of upstreams are resolved and followed."""

    nameservers: tuple[Nameserver, ...] = Field(
        (),
        description="Nameservers to ask, as IP or IP:PORT; none: the system's (/etc/resolv.conf).",
    )
    min_ttl: Duration = Field(
        1.0, gt=0, description="A name is re-resolved no sooner than this, whatever its TTL."
    )
    max_ttl: Duration = Field(
        30.0, gt=0, description="A name is re-resolved no later than this, whatever its TTL."
    )
    timeout: Duration = Field(2.0, gt=0, description="A query not answered within this fails.")

    @model_validator(mode="after")
    def _ttl_order(self) -> Discovery:
        if self.max_ttl < self.min_ttl:
            raise PydanticCustomError(
                "discovery",
                "max_ttl: expected at least min_ttl ({min}s), found {max}s",
                {"min": self.min_ttl, "max": self.max_ttl},
            )
        return self


class Network(Model):
    """How other hosts reach this host's tier, when it runs one tier (``tier``)."""

    bind: str = Field(
        "127.0.0.1",
        description="The IP address the tier's TCP listeners bind (0.0.0.0: every one).",
    )
    port: int = Field(
        8080,
        ge=1,
        le=65535,
        description="The data port of the tier's first proxy or server; the k-th listens "
        "on port + k. (Balancers listen on `listen`.)",
    )
    admin_offset: int = Field(
        1000,
        ge=1,
        le=64535,
        description="Each child's admin API is also on TCP at its data port + admin_offset "
        "(balancer k: port + k + admin_offset), and a discovered upstream's admin API is "
        "looked for at its data port + admin_offset.",
    )

    @model_validator(mode="after")
    def _bind_is_an_address(self) -> Network:
        try:
            ipaddress.ip_address(self.bind)
        except ValueError:
            raise PydanticCustomError(
                "network", "bind: expected an IP address, found {found!r}", {"found": self.bind}
            ) from None
        return self

    @property
    def loopback(self) -> bool:
        return ipaddress.ip_address(self.bind).is_loopback


class AdminConfig(Model):
    """Who may use an admin API reached over TCP."""

    token_file: Path | None = Field(
        None,
        description="A file holding the token every admin request over TCP must carry "
        "(Authorization: Bearer <token>), but GET /healthz and /readyz; needed when a "
        "tier's network.bind is not loopback. Admin sockets on disk are mode 0600.",
    )

    def token(self) -> str | None:
        """The token, read from its file now; None when there is none."""
        if self.token_file is None:
            return None
        return self.token_file.read_text().strip()


def check_token_file(path: Path) -> str | None:
    """Why ``path`` can't be the admin token's file, or None when it can."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        return f"admin.token_file: expected a readable file, found {path} ({exc.strerror})"
    if len(token) < 16:
        return f"admin.token_file: expected a token of 16 characters or more in {path}"
    return None
