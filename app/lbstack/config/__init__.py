"""The one configuration model: defaults, validation, TOML loading and CLI overrides.

Everything configurable is defined in this package once, as frozen pydantic models. The
supervisor validates it up front; children receive it as JSON and validate the same
model again, so no component parses options of its own. Import it from here
(``from lbstack.config import Config``); the modules hold it by part:

``fields``
    The value types (durations, sizes, addresses) and ``Model``, every section's base.
``tiers``
    A forwarding tier's sections: ``TierConfig`` (the proxies), ``BalancerConfig``.
``servers``
    A group's servers, their simulation, their autoscaling; ``GroupLayout``.
``certificates``
    TLS: the https listeners' certificates, and TLS to upstreams.
``network``
    A stack over several hosts: the tier this host runs, its TCP ports, DNS discovery
    of upstreams, the admin token.
``stack``
    ``Config``, the whole stack, and its ``SupervisorConfig``.
``loading``
    ``load``, ``validate``, ``from_json``: settings in, a ``Config`` or every problem out.
"""

from lbstack.config.certificates import CertificateFiles, TLSConfig, UpstreamTLS
from lbstack.config.fields import (
    AddressField,
    Duration,
    Model,
    Size,
    parse_duration,
    parse_size,
)
from lbstack.config.loading import from_json, load, read_toml, validate
from lbstack.config.network import (
    AdminConfig,
    Discovery,
    DnsName,
    Network,
    Tier,
    UpstreamSource,
    parse_dns_name,
)
from lbstack.config.servers import (
    Autoscale,
    GroupConfig,
    GroupLayout,
    ServerConfig,
    Simulation,
)
from lbstack.config.stack import Config, SupervisorConfig, default_run_dir
from lbstack.config.tiers import (
    BalancerConfig,
    BalancerRetries,
    Ejection,
    ExchangeConfig,
    HealthCheck,
    Limits,
    PolicyName,
    Retries,
    TierConfig,
    Timeouts,
    Tunnels,
)

__all__ = [
    "AddressField",
    "AdminConfig",
    "Autoscale",
    "BalancerConfig",
    "BalancerRetries",
    "CertificateFiles",
    "Config",
    "Discovery",
    "DnsName",
    "Duration",
    "Ejection",
    "ExchangeConfig",
    "GroupConfig",
    "GroupLayout",
    "HealthCheck",
    "Limits",
    "Model",
    "Network",
    "PolicyName",
    "Retries",
    "ServerConfig",
    "Simulation",
    "Size",
    "SupervisorConfig",
    "TLSConfig",
    "Tier",
    "TierConfig",
    "Timeouts",
    "Tunnels",
    "UpstreamSource",
    "UpstreamTLS",
    "default_run_dir",
    "from_json",
    "load",
    "parse_dns_name",
    "parse_duration",
    "parse_size",
    "read_toml",
    "validate",
]
