"""Listening and upstream addresses: ``unix:/path``, ``tcp://host:port`` or ``https://host:port``.

``https`` is TCP with TLS: a balancer listener that terminates TLS (``[tls]`` in the
config), or an upstream reached over TLS (a tier's ``upstream_tls``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Literal

# sun_path is 108 bytes including the terminating NUL.
UNIX_PATH_MAX = 107


@dataclass(frozen=True, slots=True)
class Address:
    """Where a component listens or an upstream is reached."""

    scheme: Literal["unix", "tcp", "https"]
    path: str = ""
    host: str = ""
    port: int = 0

    @classmethod
    def unix(cls, path: str) -> Address:
        return parse_address(f"unix:{path}")

    @property
    def is_unix(self) -> bool:
        return self.scheme == "unix"

    @property
    def is_tls(self) -> bool:
        return self.scheme == "https"

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def http_base(self) -> str:
        """The base URL a client uses (unix sockets are reached with a dummy host)."""
        if self.is_unix:
            return "http://localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.is_tls else 'http'}://{host}:{self.port}"


def parse_address(text: str) -> Address:
    """Parse ``unix:/abs/path``, ``tcp://host:port`` or ``https://host:port``; raise
    ValueError saying what is wrong."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise ValueError(f"expected an absolute socket path after 'unix:', found {text!r}")
        if len(path.encode()) > UNIX_PATH_MAX:
            raise ValueError(
                f"unix socket path is {len(path.encode())} bytes, longer than the "
                f"{UNIX_PATH_MAX}-byte limit: {path!r} (use a shorter run dir)"
            )
        return Address("unix", path=path)
    scheme, sep, rest = text.partition("://")
    if sep and scheme in ("tcp", "https"):
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
            ipaddress.IPv6Address(host)  # raises ValueError with a clear message
        else:
            host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected {scheme}://host:port, found {text!r}")
        if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
            raise ValueError(f"expected a port number 0-65535 in {text!r}, found {port_text!r}")
        if ":" in host and not rest.startswith("["):
            raise ValueError(f"expected an IPv6 host in brackets, {scheme}://[{host}]:port")
        return Address("https" if scheme == "https" else "tcp", host=host, port=int(port_text))
    raise ValueError(
        f"expected 'unix:/path', 'tcp://host:port' or 'https://host:port', found {text!r}"
    )
