"""The package's exception hierarchy.

``LbstackError`` is the base of everything lbstack raises on purpose; the CLI turns
any of them into a one-line message and an exit status instead of a traceback.

    LbstackError
    ├── ConfigError        invalid config file or flag (exit status 2)
    ├── SocketError        a socket path or address cannot be used
    ├── StartupError       a child failed at boot; the stack gives up
    └── ControlError       the control socket did not answer or refused a command
"""

from __future__ import annotations


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
