"""TLS settings: the certificates of the https listeners, and TLS to upstreams."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from lbstack.config.fields import Model


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
