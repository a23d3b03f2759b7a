"""TLS: the certificates a balancer serves on its https listeners, and TLS to upstreams.

**Listeners.** A balancer with an ``https://`` listener serves it with the
``CertificateStore``'s ``context``. That context is the same object for the life of
the process (aiohttp's site holds it); it picks a certificate per handshake in its SNI
callback: the certificate whose subjectAltName DNS names (else its CN) match the name
the client asked for, ``*.`` wildcards for one label, else the first certificate.
``reload`` re-reads the files and swaps the certificates in one step: new handshakes
get the new ones, established connections keep the session they have.

**Upstreams.** ``upstream_context`` is the client context of a tier's ``upstream_tls``
for an ``https://`` upstream (one per process and settings), ``None`` for any other.

**Checks.** ``problems`` checks every file the config names, as ``lbstack up`` and a
reload do before anything starts: readable, PEM, the key matching its certificate, the
certificate valid now. Each problem names its field, what was expected and what was
found.

Below the ``ssl`` module's public API, once: ``_ssl._test_decode_cert`` reads a
certificate file's names and validity (the standard library has no public way to read
a PEM certificate, and we take no dependency for it); pinned by ``tests/test_tls.py``.
"""

from __future__ import annotations

import _ssl
import functools
import os
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from lbstack.address import Address
from lbstack.errors import ConfigError
from lbstack.log import get_logger

if TYPE_CHECKING:
    from lbstack.config.certificates import TLSConfig, UpstreamTLS
    from lbstack.config.stack import Config

log = get_logger("tls")

ALPN: Final = ["http/1.1"]
MIN_VERSIONS: Final = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# A certificate closer than this to its end is logged as a warning when loaded.
EXPIRY_WARNING: Final = 14 * 86400.0
# The standard library's only reader of a PEM certificate file (its own tests use it).
_decode_certificate: Callable[[str], dict[str, Any]] = _ssl._test_decode_cert  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Certificate:
    """One certificate loaded: its files, the names it serves, its validity, its context."""

    cert: Path
    key: Path
    names: tuple[str, ...]
    not_before: float
    not_after: float
    context: ssl.SSLContext

    def view(self) -> dict[str, Any]:
        return {
            "cert": str(self.cert),
            "names": list(self.names),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "expires": _utc(self.not_after),
        }


class _Problem(Exception):
    """One thing wrong with a file the config names (a line of a ConfigError)."""


def server_context(settings: TLSConfig) -> ssl.SSLContext:
    """A server context with the listener settings and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    configure(context, settings)
    return context


def configure(context: ssl.SSLContext, settings: TLSConfig) -> None:
    """Apply the listener settings to a server context (for its new connections)."""
    context.minimum_version = MIN_VERSIONS[settings.min_version]
    context.set_ciphers(settings.ciphers)  # TLS 1.2 suites; 1.3's are OpenSSL's own
    context.set_alpn_protocols(ALPN)


def certificate_entries(settings: TLSConfig) -> list[tuple[str, Path, Path]]:
    """``(field, cert, key)`` of every certificate ``settings`` names, in order."""
    entries = []
    if settings.cert is not None and settings.key is not None:
        entries.append(("tls", settings.cert, settings.key))
    entries += [
        (f"tls.certificates.{i}", c.cert, c.key) for i, c in enumerate(settings.certificates)
    ]
    return entries


def load_certificates(settings: TLSConfig) -> tuple[Certificate, ...]:
    """Every certificate ``settings`` names, each in a context of its own.

    ``ConfigError`` listing every problem when any file can't be used.
    """
    loaded, problems = _load_all(settings, time.time())
    if problems:
        raise ConfigError(problems)
    if not loaded:
        raise ConfigError(["tls: expected cert and key, or [[tls.certificates]], found none"])
    return tuple(loaded)


def _load_all(settings: TLSConfig, now: float) -> tuple[list[Certificate], list[str]]:
    """The certificates ``settings`` names that load, and what is wrong with the others."""
    loaded, problems = [], []
    for field, cert, key in certificate_entries(settings):
        try:
            loaded.append(_load(field, cert, key, server_context(settings), now))
        except _Problem as exc:
            problems.append(str(exc))
    return loaded, problems


def _load(field: str, cert: Path, key: Path, context: ssl.SSLContext, now: float) -> Certificate:
    """Check and load one certificate and its key into ``context``."""
    _readable(f"{field}.cert", cert, "a PEM certificate file")
    _readable(f"{field}.key", key, "a PEM private key file")
    try:
        decoded = _decode_certificate(str(cert))
    except (ssl.SSLError, OSError) as exc:
        raise _Problem(
            f"{field}.cert: expected a PEM certificate, found a file that is not one ({cert})"
        ) from exc
    not_before = ssl.cert_time_to_seconds(str(decoded["notBefore"]))
    not_after = ssl.cert_time_to_seconds(str(decoded["notAfter"]))
    if now < not_before:
        raise _Problem(
            f"{field}.cert: expected a certificate valid now, found one not valid before "
            f"{_utc(not_before)} ({cert})"
        )
    if now >= not_after:
        raise _Problem(
            f"{field}.cert: expected a certificate valid now, found one that expired on "
            f"{_utc(not_after)} ({cert})"
        )
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            found = f"the key of another certificate ({key})"
        else:
            found = f"a file that is not one, or an encrypted one ({key})"
        raise _Problem(
            f"{field}.key: expected the unencrypted PEM private key of {cert}, found {found}"
        ) from exc
    return Certificate(cert, key, _names(decoded), not_before, not_after, context)


def _readable(field: str, path: Path, what: str) -> None:
    if not path.exists():
        raise _Problem(f"{field}: expected {what}, found no such file ({path})")
    if not path.is_file():
        raise _Problem(f"{field}: expected {what}, found something that is not a file ({path})")
    if not os.access(path, os.R_OK):
        raise _Problem(f"{field}: expected {what}, found a file we may not read ({path})")


def _no_password() -> bytes:
    # An encrypted key must fail to load, never prompt on the terminal.
    return b""


def _names(decoded: dict[str, Any]) -> tuple[str, ...]:
    """The DNS names a certificate serves: its subjectAltName DNS entries, else its CN."""
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            names += [value.lower() for key, value in rdn if key == "commonName"]
    return tuple(names)


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class CertificateStore:
    """A balancer's certificates and the one context its https listeners serve."""

    def __init__(self, settings: TLSConfig) -> None:
        """Load every certificate (``ConfigError`` if one can't be)."""
        self.context = server_context(settings)
        self.context.sni_callback = self._select
        self.certificates: tuple[Certificate, ...] = ()
        self._by_name: dict[str, ssl.SSLContext] = {}
        self.reload(settings)

    def reload(self, settings: TLSConfig) -> tuple[Certificate, ...]:
        """Read the certificates again, from the files ``settings`` names; the stored
        ones stay if any can't be used (``ConfigError``)."""
        certificates = load_certificates(settings)
        by_name: dict[str, ssl.SSLContext] = {}
        for certificate in reversed(certificates):  # the first to name a host serves it
            for name in certificate.names:
                by_name[name] = certificate.context
        default = certificates[0]
        # The listener's own context serves clients the callback leaves alone; its
        # settings and certificate apply to new handshakes only.
        configure(self.context, settings)
        self.context.load_cert_chain(default.cert, default.key, password=_no_password)
        self.certificates, self._by_name = certificates, by_name
        now = time.time()
        for certificate in certificates:
            log.info(
                "certificate %s for %s, valid until %s",
                certificate.cert,
                ", ".join(certificate.names) or "(no name)",
                _utc(certificate.not_after),
            )
            if certificate.not_after - now < EXPIRY_WARNING:
                log.warning(
                    "certificate %s expires in %.1f days",
                    certificate.cert,
                    (certificate.not_after - now) / 86400,
                )
        return certificates

    def context_for(self, server_name: str | None) -> ssl.SSLContext:
        """The context of the certificate for ``server_name`` (the default's if none)."""
        by_name = self._by_name
        if server_name:
            name = server_name.lower().rstrip(".")
            found = by_name.get(name)
            if found is None and "." in name:
                found = by_name.get("*." + name.split(".", 1)[1])
            if found is not None:
                return found
        return self.certificates[0].context

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any
    ) -> None:
        connection.context = self.context_for(server_name)

    def views(self) -> list[dict[str, Any]]:
        return [c.view() for c in self.certificates]

    def expiries(self) -> Iterator[tuple[str, float]]:
        """``(cert path, notAfter)`` of each certificate served now (the metric's)."""
        for certificate in self.certificates:
            yield str(certificate.cert), certificate.not_after


# ---- TLS to upstreams --------------------------------------------------------------


@functools.cache
def client_context(settings: UpstreamTLS) -> ssl.SSLContext:
    """The client context for a tier's https upstreams (made once per process)."""
    if settings.verify:
        ca_file = None if settings.ca_file is None else str(settings.ca_file)
        context = ssl.create_default_context(cafile=ca_file)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "upstream_tls.verify = false: https upstreams are NOT authenticated; anyone "
            "on the path can read and change this traffic"
        )
    if settings.cert is not None and settings.key is not None:
        context.load_cert_chain(settings.cert, settings.key, password=_no_password)
    context.set_alpn_protocols(ALPN)
    return context


def upstream_context(settings: UpstreamTLS, address: Address) -> ssl.SSLContext | None:
    """The client context for ``address``: ``settings``' if it is https, else None."""
    return client_context(settings) if address.is_tls else None


# ---- checks --------------------------------------------------------------------------


def problems(config: Config, now: float | None = None) -> list[str]:
    """What is wrong with the files the config names (empty when they all work), at
    ``now`` (unix time; default: now)."""
    now = time.time() if now is None else now
    _, found = _load_all(config.tls, now)
    for tier in ("balancer", "proxy"):
        found += _upstream_problems(f"{tier}.upstream_tls", getattr(config, tier).upstream_tls, now)
    return found


def _upstream_problems(field: str, settings: UpstreamTLS, now: float) -> Iterator[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if settings.ca_file is not None:
        try:
            _readable(f"{field}.ca_file", settings.ca_file, "a PEM file of CA certificates")
            context.load_verify_locations(cafile=settings.ca_file)
        except _Problem as exc:
            yield str(exc)
        except ssl.SSLError:
            yield (
                f"{field}.ca_file: expected a PEM file of CA certificates, found a file "
                f"without any ({settings.ca_file})"
            )
    if settings.cert is not None and settings.key is not None:
        try:
            _load(field, settings.cert, settings.key, context, now)
        except _Problem as exc:
            yield str(exc)
