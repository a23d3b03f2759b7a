"""A test PKI made with the ``openssl`` command line: CAs, and certificates they sign."""

from __future__ import annotations

import itertools
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_serials = itertools.count(1000)


@dataclass(frozen=True)
class Pair:
    """A certificate and its key."""

    cert: Path
    key: Path

    def subject_cn(self) -> str:
        return _openssl("x509", "-in", str(self.cert), "-noout", "-subject").split("=")[-1].strip()

    def not_after(self) -> float:
        """The certificate's notAfter (unix time), as openssl reads it."""
        text = _openssl("x509", "-in", str(self.cert), "-noout", "-enddate")
        return ssl.cert_time_to_seconds(text.split("=", 1)[1].strip())

    def serial(self) -> int:
        text = _openssl("x509", "-in", str(self.cert), "-noout", "-serial")
        return int(text.split("=", 1)[1], 16)

    def copy_to(self, cert: Path, key: Path) -> None:
        """Write this pair over the files ``cert`` and ``key`` (a renewal, say)."""
        shutil.copyfile(self.cert, cert)
        shutil.copyfile(self.key, key)


class CA:
    """A certificate authority in ``directory``; ``pem`` is what clients trust."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        directory.mkdir(parents=True, exist_ok=True)
        self.pem = directory / f"{name}.pem"
        self.key = directory / f"{name}.key"
        _openssl(
            "req", "-x509", *_NEW_KEY, "-keyout", str(self.key), "-out", str(self.pem),
            "-days", "30", "-subj", f"/CN={name}",
        )  # fmt: skip

    def issue(
        self,
        file: str,
        common_name: str,
        dns: Sequence[str] = (),
        *,
        ip: Sequence[str] = (),
        days: int = 30,
        organization: str = "",
    ) -> Pair:
        """A certificate for ``dns`` names and ``ip`` addresses (server and client use).

        ``days`` may be negative: a certificate that expired that long ago.
        """
        cert, key = self.directory / f"{file}.pem", self.directory / f"{file}.key"
        csr, ext = self.directory / f"{file}.csr", self.directory / f"{file}.ext"
        subject = f"/CN={common_name}" + (f"/O={organization}" if organization else "")
        _openssl("req", "-new", *_NEW_KEY, "-keyout", str(key), "-out", str(csr), "-subj", subject)
        sans = [f"DNS:{n}" for n in dns] + [f"IP:{a}" for a in ip]
        lines = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        _openssl(
            "x509", "-req", "-in", str(csr), "-CA", str(self.pem), "-CAkey", str(self.key),
            "-set_serial", str(next(_serials)), "-days", str(days), "-extfile", str(ext),
            "-out", str(cert),
        )  # fmt: skip
        return Pair(cert, key)


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _openssl(*args: str) -> str:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr}")
    return done.stdout
