"""The run directory and the socket names in it (a contract: scripts rely on them)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from lbstack.address import UNIX_PATH_MAX, Address
from lbstack.errors import ConfigError


class RunDir:
    """Names every socket of a stack under one directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _unix(self, filename: str) -> Address:
        return Address("unix", path=str(self.path / filename))

    @property
    def balancer(self) -> Address:
        return self._unix("balancer.sock")

    @property
    def control(self) -> Address:
        return self._unix("control.sock")

    @property
    def targets_file(self) -> Path:
        return self.path / "targets.json"

    def data(self, name: str) -> Address:
        """The data socket of a proxy or server (``proxy-0.sock``, ``server-0-1.sock``)."""
        return self._unix(f"{name}.sock")

    def admin(self, name: str) -> Address:
        """The admin socket of any child (``balancer-0.admin.sock`` ...)."""
        return self._unix(f"{name}.admin.sock")

    def successor_admin(self, name: str) -> Address:
        """Where a reload's new ``name`` answers until it takes over ``admin(name)``."""
        return self._unix(f"{name}.next.admin.sock")

    def retiring_admin(self, name: str) -> Address:
        """Where the old ``name`` still answers while it drains after a handover."""
        return self._unix(f"{name}.old.admin.sock")

    def check_length(self, longest_name: str) -> None:
        """Refuse a run dir whose socket paths would not fit in sun_path."""
        longest = str(self.path / f"{longest_name}.next.admin.sock")
        if len(longest.encode()) > UNIX_PATH_MAX:
            raise ConfigError(
                [
                    f"run_dir: socket paths would be {len(longest.encode())} bytes "
                    f"(e.g. {longest!r}), longer than the {UNIX_PATH_MAX}-byte limit of a "
                    f"unix socket path; found run dir {str(self.path)!r}, use a shorter one"
                ]
            )

    def prepare(self) -> None:
        """Create the directory (0700) and make sure we can create files in it."""
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.is_dir():
                raise ConfigError([f"run_dir: expected a directory, found a file at {self.path}"])
            with tempfile.NamedTemporaryFile(dir=self.path, prefix=".probe-"):
                pass
        except FileExistsError as exc:
            raise ConfigError(
                [f"run_dir: expected a directory, found a file at {self.path}"]
            ) from exc
        except OSError as exc:
            raise ConfigError(
                [f"run_dir: cannot create or write {str(self.path)!r}: {exc.strerror}"]
            ) from exc
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError([f"run_dir: {str(self.path)!r} is not writable"])
