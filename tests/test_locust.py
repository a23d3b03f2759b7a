"""The Locust load tests (loadtests/locustfile.py) against a real stack.

Locust runs as a subprocess only: it imports gevent, whose monkey-patching must never
reach the test process. Each run is short and bounded twice, by Locust's ``--run-time``
and by a subprocess timeout. The steady run is given a p95 bar no machine misses, so
a timing never decides whether it passes; only the deliberately impossible bar does.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from lbstack.testing import running_stack

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"
GRACE = 60.0  # seconds a run may take beyond its --run-time (start-up, shutdown)
# The first line of the summary's request table: "Aggregated  <requests>  <failures>(...".
AGGREGATED = re.compile(r"^\s*Aggregated\s+(\d+)\s+(\d+)\(", re.MULTILINE)


@dataclass(frozen=True)
class LocustRun:
    returncode: int
    output: str

    @property
    def requests_and_failures(self) -> tuple[int, int]:
        match = AGGREGATED.search(self.output)
        assert match is not None, f"no summary in Locust's output:\n{self.output}"
        return int(match.group(1)), int(match.group(2))


async def locust(*args: str, run_time: int) -> LocustRun:
    """Run the locustfile headless for ``run_time`` s with ARGS; its exit status and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--only-summary",
        "--run-time",
        f"{run_time}s",
        *args,
        cwd=ROOT,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), run_time + GRACE)
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    assert process.returncode is not None
    return LocustRun(process.returncode, out.decode(errors="replace"))


@pytest.mark.timeout(150)
async def test_steady_run_passes_with_every_answer_checked() -> None:
    async with running_stack() as stack:
        run = await locust(
            "--scenario",
            "steady",
            "--lbstack-run-dir",
            str(stack.run_dir),
            "-u",
            "4",
            "-r",
            "4",
            "--max-p95-ms",
            "60000",
            run_time=10,
        )
    assert run.returncode == 0, run.output
    requests, failures = run.requests_and_failures
    assert requests > 0, run.output
    assert failures == 0, run.output
    assert "GET /echo" in run.output and "POST /upload" in run.output, run.output
    assert "gevent" not in sys.modules  # Locust stayed in its own process


@pytest.mark.timeout(150)
async def test_a_threshold_missed_makes_the_exit_status_nonzero() -> None:
    async with running_stack() as stack:
        run = await locust(
            "--lbstack-socket",
            stack.socket,
            "-u",
            "2",
            "-r",
            "2",
            "--max-p95-ms",
            "0.001",
            run_time=3,
        )
    assert run.returncode != 0, run.output
    requests, failures = run.requests_and_failures
    assert requests > 0 and failures == 0, run.output
    assert re.search(r"run failed: p95 \d+ ms above 0.001 ms", run.output), run.output


@pytest.mark.timeout(150)
async def test_a_wrong_answer_is_a_failure_even_with_status_200() -> None:
    async with running_stack() as stack:
        # A server's own socket answers 200 with the echo, but without the X-Request-Id
        # the balancer adds: every request must be counted as failed.
        run = await locust(
            "--lbstack-socket",
            str(stack.run_dir / "server-0-0.sock"),
            "-u",
            "2",
            "-r",
            "2",
            "--max-p95-ms",
            "60000",
            run_time=3,
        )
    assert run.returncode != 0, run.output
    requests, failures = run.requests_and_failures
    assert requests > 0 and failures == requests, run.output
    assert "missing X-Served-By ('server-0-0') or X-Request-Id (None)" in run.output
