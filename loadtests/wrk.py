"""Closed-loop HTTP load with wrk, its figures read back as a ``WrkResult``.

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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class WrkError(Exception):
    """wrk is missing, failed, overran its time or printed no figures."""


@dataclass(frozen=True)
class Latency:
    """Latency percentiles of one run, in microseconds."""

    p50_us: int
    p90_us: int
    p99_us: int
    p999_us: int
    mean_us: float
    max_us: int


@dataclass(frozen=True)
class WrkResult:
    """One wrk run's figures.

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
    latency: Latency
    wrk_latency: Latency
    measured: bool

    @property
    def socket_errors(self) -> int:
        """Connect, read and write errors and timeouts (wrk's "Socket errors")."""
        return self.connect_errors + self.read_errors + self.write_errors + self.timeouts

    @classmethod
    def from_json(cls, line: str) -> WrkResult:
        """Parse the JSON line ``REPORT_LUA`` prints."""
        data: dict[str, Any] = json.loads(line)
        corrected = Latency(**data.pop("wrk"))
        raw = data.pop("measured")
        measured = Latency(**raw) if raw is not None else corrected
        return cls(**data, latency=measured, wrk_latency=corrected, measured=raw is not None)


def find_wrk() -> str | None:
    """The wrk executable, or None when wrk is not installed."""
    return shutil.which("wrk")


async def wrk_version(wrk: str) -> str:
    """``wrk 4.1.0 [epoll]``: the first line of ``wrk -v``."""
    process = await asyncio.create_subprocess_exec(
        wrk,
        "-v",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 10.0)
    first = out.decode(errors="replace").splitlines()[:1]
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


async def run_wrk(
    url: str,
    *,
    workdir: Path,
    duration: int,
    connections: int = 64,
    threads: int = 2,
    timeout: int = 10,
    wrk: str = "wrk",
    grace: float = 20.0,
) -> WrkResult:
    """Load ``url`` for ``duration`` whole seconds and return the figures.

    ``timeout`` is wrk's per-request timeout: slower requests count as timeouts and
    drop out of the percentiles, so keep it above the longest stall under test. The
    subprocess is killed if it outlives ``duration + timeout + grace`` seconds.
    """
    if duration < 1:
        raise WrkError(f"wrk needs a duration of at least 1 s, found {duration}")
    script = workdir / f"report-c{connections}.lua"
    script.write_text(REPORT_LUA.replace("@CONNECTIONS@", str(connections)))
    process = await asyncio.create_subprocess_exec(
        wrk,
        f"--threads={min(threads, connections)}",
        f"--connections={connections}",
        f"--duration={duration}s",
        f"--timeout={timeout}s",
        f"--script={script}",
        url,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), duration + timeout + grace)
    except (TimeoutError, asyncio.CancelledError) as exc:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise WrkError(f"wrk against {url} overran {duration + timeout + grace:g} s") from None
    text = out.decode(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if process.returncode != 0 or not lines:
        raise WrkError(
            f"wrk against {url} failed (status {process.returncode}): "
            f"{err.decode(errors='replace').strip() or text.strip()}"
        )
    try:
        return WrkResult.from_json(lines[-1])
    except (ValueError, TypeError) as exc:
        raise WrkError(f"wrk printed no figures; its last line: {lines[-1]!r}") from exc
