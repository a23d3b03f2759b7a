"""``lbstack.testing``: the helper that starts a real stack for tests and benchmarks."""

from __future__ import annotations

import shutil

import pytest

from lbstack.errors import StartupError
from lbstack.testing import running_stack, short_tmpdir


async def test_a_stack_that_cannot_start_says_why_and_leaves_its_workdir() -> None:
    workdir = short_tmpdir()
    try:
        with pytest.raises(StartupError, match="exited with status 2") as failed:
            async with running_stack(config="proxies = 0\n", workdir=workdir):
                raise AssertionError("started")
        assert "proxies" in str(failed.value)  # the log comes with it
        assert "proxies" in (workdir / "stack.log").read_text()  # a given workdir is kept
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def test_a_stack_logs_its_banner_and_stops_cleanly() -> None:
    async with running_stack("--proxies", "1", "--servers-per-proxy", "1") as stack:
        assert "lbstack up:" in stack.banner
        assert await stack.control.ready()
        assert (await stack.wait_for("server-0-0")).role == "server"
        assert stack.log_problems() == []
        assert await stack.stop() == 0
        assert await stack.stop() == 0  # again: nothing to do
    assert not stack.workdir.exists()  # a temp workdir goes
