"""Closed-loop HTTP load with wrk, and alternating rounds of it over several systems.

wrk runs ``connections`` keep-alive connections, each sending its next request as soon
as the previous answer arrives. A small Lua script's ``done()`` prints the figures as
JSON on wrk's last output line; latencies are in microseconds. Every run is bounded:
wrk's own ``-d`` plus a subprocess timeout.

Two sets of latency figures come back. Before ``done()`` wrk "corrects" its histogram
for coordinated omission (``stats_correct`` in wrk's ``stats.c``): every latency longer
than the mean interval between two requests of one connection also adds synthetic
samples at that latency minus 1, 2, ... intervals. Those corrected figures are what
``wrk --latency`` prints (``wrk``). The script then undoes the correction in place,
``raw[n] = corrected[n] - corrected[n + interval]``, to give the latencies the requests
actually had (``measured``). The interval depends on each system's own throughput, so
the two can rank systems differently; both are kept.

``rounds`` runs every system of a scenario in alternating rounds (a, b, a, b ...) and
reads each system's CPU time around every run: CPU per request per tier.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.report import BenchError, Report, Row
from loadtests.scenarios import Scenario, Wrk
from loadtests.topology import System, cpu_per_request, run_program

# wrk counts a response with status > 399 in errors.status; a latency above --timeout
# is not recorded but counted in errors.timeout. The FFI view of wrk's histogram is
# wrk 4.x's `stats` struct (count, limit, min, max, data[]); it is checked against
# wrk's own min, max and count before use, and `measured` is null when it does not fit.
REPORT_LUA = """\
-- Written by loadtests.wrk: the run's figures as JSON on the last line.
local ffi = require("ffi")
ffi.cdef[[ typedef struct { uint64_t count, limit, min, max; } loadtests_wrk_stats; ]]
local connections = @CONNECTIONS@

local function figures(latency)
  return string.format(
    '{"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "mean_us": %.1f, ' ..
    '"max_us": %d}',
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.mean, latency.max)
end

-- Undo wrk's coordinated-omission correction in place; the sample count, or nil.
local function uncorrect(latency, duration, requests)
  local per_connection = math.floor(requests / connections)
  if per_connection < 1 then return nil end
  local interval = math.floor(duration / per_connection)
  local s = ffi.cast("loadtests_wrk_stats **", latency)[0]
  local lo, hi = tonumber(s.min), tonumber(s.max)
  if lo ~= latency.min or hi ~= latency.max or hi >= tonumber(s.limit) then return nil end
  local data = ffi.cast("uint64_t *", s) + 4
  local total = 0
  for n = lo, hi do total = total + tonumber(data[n]) end
  if total ~= tonumber(s.count) then return nil end
  local removed = 0
  for n = math.max(lo, interval + 1), hi - interval do
    local here, extra = tonumber(data[n]), tonumber(data[n + interval])
    if extra > here then return nil end
    data[n] = here - extra
    removed = removed + extra
  end
  s.count = s.count - removed
  return tonumber(s.count)
end

done = function(summary, latency, requests)
  local e = summary.errors
  local corrected = figures(latency)
  local measured, samples = "null", -1
  local ok, count = pcall(uncorrect, latency, summary.duration, summary.requests)
  if ok and count then
    measured, samples = figures(latency), count
  end
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "requests_per_s": %.2f, ' ..
    '"non_2xx": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
    '"timeouts": %d, "samples": %d, "measured": %s, "wrk": %s}\\n',
    summary.requests, summary.duration, summary.bytes,
    summary.requests / (summary.duration / 1e6), e.status,
    e.connect, e.read, e.write, e.timeout, samples, measured, corrected))
end
"""


class WrkError(BenchError):
    """wrk failed, overran its time or printed no figures."""


@dataclass(frozen=True)
class WrkResult:
    """One wrk run's figures; latencies in µs.

    ``latency`` is what the requests measured (wrk's correction undone), or wrk's own
    figures when that could not be done (``measured`` false); ``wrk_latency`` is always
    wrk's coordinated-omission-corrected figures, as ``wrk --latency`` prints them.
    """

    requests: int
    duration_us: int
    bytes: int
    requests_per_s: float
    non_2xx: int  # responses with status >= 400, as wrk counts them
    connect_errors: int
    read_errors: int
    write_errors: int
    timeouts: int
    samples: int  # latencies recorded once the correction is undone; -1 if it was not
    latency: dict[str, float]
    wrk_latency: dict[str, float]
    measured: bool

    @classmethod
    def from_json(cls, line: str) -> WrkResult:
        """Parse the JSON line ``REPORT_LUA`` prints."""
        data: dict[str, Any] = json.loads(line)
        corrected, raw = data.pop("wrk"), data.pop("measured")
        return cls(**data, latency=raw or corrected, wrk_latency=corrected, measured=bool(raw))

    def figures(self) -> Row:
        """The row a report prints: rate, latencies in ms, errors (non-2xx and socket)."""
        socket = self.connect_errors + self.read_errors + self.write_errors + self.timeouts
        return {
            "requests": self.requests,
            "req_per_s": round(self.requests_per_s, 1),
            **{f"p{p}_ms": self.latency[f"p{p}_us"] / 1000 for p in ("50", "90", "99", "999")},
            "errors": self.non_2xx + socket,
            "wrk_p99_ms": self.wrk_latency["p99_us"] / 1000,
        }


async def run_wrk(
    url: str,
    workdir: Path,
    duration: float,
    connections: int,
    *,
    threads: int = 2,
    timeout: int = 10,
    grace: float = 20.0,
) -> WrkResult:
    """Load ``url`` for ``duration`` (whole) seconds and return the figures.

    ``timeout`` is wrk's per-request timeout: slower requests count as timeouts and
    drop out of the percentiles, so keep it above the longest stall under test. The
    subprocess is killed if it outlives ``duration + timeout + grace`` seconds.
    """
    seconds = max(1, round(duration))
    script = workdir / f"report-c{connections}.lua"
    script.write_text(REPORT_LUA.replace("@CONNECTIONS@", str(connections)))
    status, out, err = await run_program(
        "wrk",
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={seconds}s",
        f"--timeout={timeout}s",
        f"--script={script}",
        url,
        timeout=seconds + timeout + grace,
    )
    lines = out.strip().splitlines()
    if status != 0 or not lines:
        raise WrkError(f"wrk against {url} failed (status {status}): {err.strip() or out}")
    try:
        return WrkResult.from_json(lines[-1])
    except (ValueError, TypeError) as exc:
        raise WrkError(f"wrk printed no figures; its last line: {lines[-1]!r}") from exc


async def rounds(
    systems: Sequence[System],
    scenario: Scenario,
    report: Report,
    workdir: Path,
    *,
    table: str = "runs",
    during: Callable[[], AbstractAsyncContextManager[Row]] | None = None,
    timeout: int = 10,
) -> list[Row]:
    """Every system at each of the scenario's connection counts, in alternating rounds
    after a warm-up each: each run's figures and every tier's CPU µs per request.

    ``during`` wraps each measured run (a fault timer, say); what it yields joins the
    row. A run wrk could not make becomes a row with an ``error``.
    """
    load = scenario.load
    assert isinstance(load, Wrk), load
    for system in systems:
        if scenario.warmup > 0:
            await run_wrk(system.url, workdir, scenario.warmup, load.connections[-1])
    rows = []
    for round_ in range(1, scenario.rounds + 1):
        for system in systems:
            for c in load.connections:
                row: Row = {"system": system.name, "round": round_, "c": c}
                before = system.cpu()
                try:
                    async with during() if during else contextlib.nullcontext({}) as extra:
                        result = await run_wrk(
                            system.url, workdir, scenario.duration, c, timeout=timeout
                        )
                except WrkError as exc:
                    report.error(f"{system.name} c={c} round {round_}", exc)
                    rows.append(report.row(table, {**row, "error": str(exc)}))
                    continue
                row |= result.figures() | cpu_per_request(before, system.cpu(), result.requests)
                rows.append(report.row(table, row | extra))
    return rows
