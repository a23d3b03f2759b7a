"""The command line every benchmark shares, and how it runs to an exit status."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from loadtests.report import RESULTS, STEP_ERRORS, say, summarize
from loadtests.scenarios import Scenario


def positive_int(text: str) -> int:
    """argparse type: a whole number ≥ 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, found {text!r}")
    return value


def seconds(text: str) -> float:
    """argparse type: a number of seconds ≥ 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds ≥ 0, found {text!r}")
    return value


def parser(
    module: str, doc: str | None, results: str, scenario: Scenario | None = None
) -> argparse.ArgumentParser:
    """The options every benchmark has, and a scenario's timing when it has one."""
    parser = argparse.ArgumentParser(
        prog=f"python -m loadtests.{module}", description=(doc or "").split("\n\n")[0]
    )
    if scenario is not None:
        parser.add_argument(
            "--duration", type=seconds, default=scenario.duration, help="measured s per run"
        )
        parser.add_argument("--warmup", type=seconds, default=scenario.warmup, help="s before")
        parser.add_argument(
            "--rounds", type=positive_int, default=scenario.rounds, help="rounds per system"
        )
    parser.add_argument("--json", type=Path, default=RESULTS / results, help="results JSON")
    parser.add_argument("--keep", action="store_true", help="keep temp dirs (configs, logs)")
    return parser


def timed(scenario: Scenario, args: argparse.Namespace) -> Scenario:
    """``scenario`` with the command line's duration, warm-up and rounds."""
    return replace(scenario, duration=args.duration, warmup=args.warmup, rounds=args.rounds)


def run_main(
    amain: Callable[[argparse.Namespace], Awaitable[int]],
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None = None,
) -> NoReturn:
    """Parse the command line, run ``amain`` and exit with its status.

    SIGTERM cancels it like Ctrl-C, so every process it started is stopped (143, 130);
    a system that could not be started is an error message and status 1.
    """

    async def run(args: argparse.Namespace) -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await amain(args)
        except STEP_ERRORS as exc:
            say(f"error: {summarize(str(exc))}")
            return 1

    args: Any = parser.parse_args(argv)
    try:
        status = asyncio.run(run(args))
    except KeyboardInterrupt:
        status = 130
    except asyncio.CancelledError:
        status = 143
    sys.exit(status)
