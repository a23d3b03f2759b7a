"""The package's exception hierarchy.

``LbstackError`` is the base of everything lbstack raises on purpose; the CLI turns
any of them into a one-line message and an exit status instead of a traceback.

    LbstackError
    ├── ConfigError        invalid config file or flag (exit status 2)
    ├── SocketError        a socket path or address cannot be used
    ├── StartupError       a child failed at boot; the stack gives up
    └── ControlError       the control socket did not answer or refused a command
        ├── APIConnectionError   nothing answered on a control or admin socket in time
        ├── APIStatusError       it answered with an error status (``status``, ``message``,
        │                        ``problems``)
        └── InvalidRequest       (server side) a request body that does not validate
"""

from __future__ import annotations

from typing import Any


class LbstackError(Exception):
    """Base class of every error lbstack raises deliberately."""

    exit_status = 1


class ConfigError(LbstackError):
    """The configuration (file or flags) is invalid."""

    exit_status = 2

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


class SocketError(LbstackError):
    """A listening address cannot be bound or is in use by a live server."""


class StartupError(LbstackError):
    """A child process could not be started or kept failing at boot."""


class ControlError(LbstackError):
    """A command sent to a running stack failed."""


class APIConnectionError(ControlError):
    """Nothing answered on a control or admin socket: no such socket, connection refused,
    reset, or no answer within the timeout. The low-level error is the ``__cause__``."""


class APIStatusError(ControlError):
    """A control or admin API answered with an error status (4xx, 5xx).

    ``message`` is the server's ``error`` (or its whole text when it sent no JSON),
    ``problems`` what it listed beside it (one per bad field or config line), ``body``
    the answer as it was (JSON, or ``{"error": text}``).
    """

    def __init__(
        self, where: str, status: int, message: str, problems: list[Any], body: Any
    ) -> None:
        self.status = status
        self.message = message
        self.problems = problems
        self.body = body
        super().__init__(f"{where} answered {status}: {message}")


class InvalidRequest(ControlError):
    """A request to the control API whose body does not validate (the server answers 400).

    ``problems`` has one line per field: what was expected and what was found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))
