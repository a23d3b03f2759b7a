"""Benchmark results: kept as JSON, printed as tables beside each target's PASS or MISS.

A benchmark fills one ``Report``: named tables of flat rows (a run, a phase, a second),
``figures`` (the numbers its targets are judged on), notes and errors. A row is printed
as one line when it is recorded; ``finish`` prints the summary tables (``shown``), every
target of the benchmark from ``loadtests.scenarios.TARGETS`` with its figure and verdict,
the notes and errors, and writes the JSON. A verdict is printed, never asserted.

Row keys name their unit (``p99_ms``, ``cpu_us_front``, ``req_per_s``); values are plain
numbers, so every table prints the same way.

``python -m loadtests.report loadtests/results/bench.json ...`` prints saved results again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import psutil
from rich.console import Console
from rich.table import Table

from lbstack.errors import LbstackError
from loadtests.scenarios import TARGETS, Target

RESULTS = Path(__file__).resolve().parent / "results"
Row = dict[str, Any]
T = TypeVar("T")


class BenchError(Exception):
    """A step of a benchmark could not be carried out."""


# What a failed step may raise: the step is reported and the benchmark goes on.
STEP_ERRORS = (BenchError, LbstackError, OSError, psutil.Error)
console = Console(highlight=False, width=None if sys.stdout.isatty() else 180)


def say(text: str) -> None:
    """One line of progress."""
    console.print(text, markup=False)


def cell(value: Any) -> str:
    """A value as a table shows it: three significant digits or so, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        size = abs(value)
        return f"{value:,.0f}" if size >= 100 else f"{value:.{1 if size >= 10 else 2}f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return " → ".join(cell(v) for v in value)
    return str(value)


def header(key: str) -> str:
    return key.replace("_per_s", "/s").replace("_", " ")


def summarize(error: str) -> str:
    """One line for an error: the exception a log tail ends with, else its first line."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception): ", line):
            return f"{lines[0][:100]} ... {line[:160]}"
    return lines[0][:200] if lines else "unknown error"


def medians(rows: Sequence[Row], by: Sequence[str]) -> list[Row]:
    """One row per value of ``by``: the number of runs, each figure's median and each
    count's (a whole number's: requests, errors) sum."""
    groups: dict[tuple[Any, ...], list[Row]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault(tuple(row.get(key) for key in by), []).append(row)
    summary = []
    for key, group in groups.items():
        out: Row = {**dict(zip(by, key, strict=True)), "runs": len(group)}
        for name, value in group[0].items():
            if name not in out and name != "round" and isinstance(value, int | float):
                known = [r[name] for r in group if isinstance(r.get(name), int | float)]
                counts = all(isinstance(v, int) and not isinstance(v, bool) for v in known)
                out[name] = sum(known) if counts else statistics.median(known)
        summary.append(out)
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def find(rows: Sequence[Row], **match: Any) -> Row:
    """The first row whose values include ``match``; ``{}`` if there is none."""
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), {})


def _host() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class Report:
    """One benchmark run's results."""

    benchmark: str
    options: dict[str, Any]
    tables: dict[str, list[Row]] = field(default_factory=dict)
    shown: dict[str, list[str] | None] = field(default_factory=dict)  # printed: columns
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # step -> why it failed
    log_problems: dict[str, list[str]] = field(default_factory=dict)  # lbstack's warnings
    host: dict[str, Any] = field(default_factory=_host)
    generated_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        self._began = time.monotonic()

    def row(self, table: str, row: Row) -> Row:
        """Record a row of ``table`` and print it as one line."""
        rows = self.tables.setdefault(table, [])
        rows.append(row)
        say(f"[{table} {len(rows)}] " + "  ".join(f"{header(k)} {cell(v)}" for k, v in row.items()))
        return row

    def table(self, name: str, rows: list[Row], columns: Sequence[str] | None = None) -> list[Row]:
        """Set a table that ``finish`` prints (a summary): ``columns`` of it, or all."""
        self.tables[name] = rows
        self.shown[name] = list(columns) if columns is not None else None
        return rows

    def error(self, step: str, error: BaseException | str) -> None:
        self.errors[step] = str(error)
        say(f"! {step} failed: {summarize(str(error))}")

    async def step(self, name: str, work: Awaitable[T]) -> T | None:
        """Run one step of the benchmark; a failure is reported and the next step goes on."""
        try:
            return await work
        except STEP_ERRORS as exc:
            self.error(name, exc)
            return None

    def verdicts(self) -> list[tuple[Target, Any]]:
        return [(t, self.figures.get(t.figure)) for t in TARGETS if t.benchmark == self.benchmark]

    def print(self) -> None:
        """The summary tables, the figures, the targets' verdicts, notes and errors."""
        for name, columns in self.shown.items():
            console.print(render(name, self.tables.get(name, []), columns))
        targeted = {t.figure for t, _ in self.verdicts()}
        other = {k: v for k, v in self.figures.items() if k not in targeted}
        if other:
            say("figures: " + ";  ".join(f"{header(k)} {cell(v)}" for k, v in other.items()))
        for target, value in self.verdicts():
            say(
                f"target (figure only, not asserted): {target.verdict(value)}  {target.what}: "
                f"{cell(value)} (target {target.bound})"
            )
        for note in self.notes:
            say(f"  * {note}")
        for step, error in self.errors.items():
            say(f"  ! {step} failed: {summarize(error)}")
        for name, lines in self.log_problems.items():
            say(f"  ! lbstack log ({name}): {len(lines)} warning/error lines, first: {lines[0]}")

    def finish(self, path: Path) -> int:
        """Print everything, write the JSON; 1 if a step failed, else 0."""
        self.host["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        self.host["wall_s"] = round(time.monotonic() - self._began, 1)
        self.print()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2, default=str) + "\n")
        say(f"wrote {path} ({self.host['wall_s']} s)")
        return 1 if self.errors else 0

    @classmethod
    def load(cls, path: Path) -> Report:
        data = json.loads(path.read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def render(title: str, rows: Sequence[Row], columns: Sequence[str] | None = None) -> Table:
    """A table of ``rows``: the ``columns``, or one for every key any row has."""
    table = Table(title=title)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    for column in columns:
        text = any(isinstance(row.get(column), str) for row in rows)
        table.add_column(header(column), justify="left" if text else "right")
    for row in rows:
        table.add_row(*(cell(row.get(column)) for column in columns))
    return table


def main(argv: Sequence[str] | None = None) -> None:
    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        sys.exit("usage: python -m loadtests.report RESULTS.json ...")
    for path in paths:
        say(f"{path}:")
        Report.load(Path(path)).print()


if __name__ == "__main__":
    main()
