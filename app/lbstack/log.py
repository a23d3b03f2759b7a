"""Named loggers and the one logging setup every process uses."""

from __future__ import annotations

import logging
import sys


def get_logger(name: str) -> logging.Logger:
    """A logger under the ``lbstack`` namespace (``lbstack.supervisor`` ...)."""
    return logging.getLogger(f"lbstack.{name}")


def setup(level: str, instance: str) -> None:
    """Log to stderr, each line tagged with the process's component name."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s.%(msecs)03d %(levelname)-7s {instance:<12} %(message)s",
            datefmt="%H:%M:%S",
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is off (it is costly on the hot path); its errors stay.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
