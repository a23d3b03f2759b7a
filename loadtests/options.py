"""What the benchmark programs share on their command lines and in their reports."""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, found {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds > 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, found {text!r}")
    return value


def summarize(error: str) -> str:
    """One line for an error: the exception a log tail ends with, else its first line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return f"{lines[0][:100]} ... {line[:160]}"
    return lines[0][:200] if lines else "unknown error"


def run_main(main: Coroutine[Any, Any, int]) -> NoReturn:
    """Run a benchmark's ``amain`` and exit with its status (130 on Ctrl-C, 143 on SIGTERM)."""
    try:
        status = asyncio.run(main)
    except KeyboardInterrupt:
        status = 130
    except asyncio.CancelledError:  # SIGTERM
        status = 143
    sys.exit(status)
