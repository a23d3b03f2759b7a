"""Talking to a running stack from a load generator: socket URLs, status, faults, kills.

``StackControl`` reads the supervisor's ``GET /status`` on ``<run-dir>/control.sock``,
posts faults to a simulated server's ``/fault`` on its admin socket (what
``lbstack fault`` sends) and SIGKILLs a component by name. It is synchronous, on
``requests`` over unix sockets: in a Locust process gevent has made sockets and
sleeps cooperative, so a greenlet can call it without holding up the simulated users.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import requests_unixsocket

UNIX_SCHEME = "http+unix://"
POLL_INTERVAL = 0.1


class StackControlError(Exception):
    """The stack's control or admin socket refused or did not answer as expected."""


def unix_url(socket_path: Path | str, path: str = "") -> str:
    """The ``http+unix://`` URL of ``path`` on the unix socket ``socket_path``."""
    return f"{UNIX_SCHEME}{quote(str(socket_path), safe='')}{path}"


class StackControl:
    """The control and admin sockets of the stack running in ``run_dir``."""

    def __init__(self, run_dir: Path, *, timeout: float = 5.0) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self._session = requests_unixsocket.Session()

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, socket_name: str, path: str, body: Any = None) -> Any:
        socket = self.run_dir / socket_name
        try:
            response = self._session.request(
                method, unix_url(socket, path), json=body, timeout=self.timeout
            )
            answer = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise StackControlError(f"{method} {path} on {socket}: {exc!r}") from exc
        if response.status_code >= 400:
            raise StackControlError(
                f"{method} {path} on {socket}: expected 2xx, found {response.status_code}: {answer}"
            )
        return answer

    def status(self) -> dict[str, Any]:
        """The supervisor's status: run dir, listeners and every component."""
        answer = self._request("GET", "control.sock", "/status")
        if not isinstance(answer, dict):
            raise StackControlError(f"GET /status: expected a JSON object, found {answer!r}")
        return answer

    def component(self, name: str) -> dict[str, Any]:
        """One component's entry in the status (name, role, pid, state ...)."""
        components = self.status().get("components", [])
        for component in components:
            if component.get("name") == name:
                return dict(component)
        known = ", ".join(str(c.get("name")) for c in components)
        raise StackControlError(f"no component {name!r} in {self.run_dir}; known: {known}")

    def fault(self, server: str, changes: dict[str, Any]) -> dict[str, Any]:
        """POST ``changes`` to a simulated server's ``/fault``; its fault state back."""
        answer = self._request("POST", f"{server}.admin.sock", "/fault", changes)
        return dict(answer) if isinstance(answer, dict) else {"answer": answer}

    def kill(self, name: str) -> int:
        """SIGKILL the component ``name`` (its pid from the status); the pid killed."""
        component = self.component(name)
        pid = component.get("pid")
        if component.get("role") == "supervisor" or not isinstance(pid, int):
            raise StackControlError(f"{name} has no child process to kill: {component}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError as exc:
            raise StackControlError(f"{name} (pid {pid}) was already gone") from exc
        return pid

    def wait_replaced(self, name: str, old_pid: int, timeout: float) -> dict[str, Any]:
        """Poll until ``name`` is ready again with a pid other than ``old_pid``."""
        deadline = time.monotonic() + timeout
        while True:
            component = self.component(name)
            if component.get("state") == "ready" and component.get("pid") != old_pid:
                return component
            if time.monotonic() >= deadline:
                raise StackControlError(
                    f"{name} not ready again within {timeout:g} s after pid {old_pid} "
                    f"was killed: {component}"
                )
            time.sleep(POLL_INTERVAL)  # polling with a deadline; gevent makes it cooperative
