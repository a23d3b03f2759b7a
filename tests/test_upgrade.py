"""``lbstack upgrade``: the supervisor re-executes itself, keeps its pid, sockets and
children, and the children roll onto the new code, losing no request (real processes)."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import psutil
from aiohttp import web

from lbstack.api import ComponentStatus
from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, router_status, serving, short_tmpdir, steady_load, until
from tests.test_reload import only_200s, pids, served_after

TOPOLOGY = ("--proxies", "2", "--servers-per-proxy", "2")
SOURCE = Path(__file__).resolve().parent.parent / "app" / "lbstack"


async def _supervisor(stack: RunningStack) -> ComponentStatus:
    return await stack.component("supervisor")


async def test_upgrade_re_executes_the_supervisor_and_rolls_the_children_losing_no_request() -> (
    None
):
    async with running_stack(*TOPOLOGY, "--balancers", "2") as stack:
        before = await pids(stack)
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            out = await cli("upgrade", "--run-dir", str(stack.run_dir), timeout=180)
            assert out.returncode == 0, out.stderr
            await served_after(stack, seen, 50)
        only_200s(seen)
        after = await pids(stack)
        assert after["supervisor"] == before["supervisor"]  # the same process, re-executed
        assert (await _supervisor(stack)).upgrades == 1
        children = set(before) - {"supervisor"}
        assert set(after) == set(before)
        assert all(before[n] != after[n] for n in children), (before, after)
        assert "upgrade 1: supervisor re-executed" in stack.logs()
        assert not (stack.run_dir / "upgrade.json").exists()
        assert await stack.stop() == 0


async def test_a_re_executed_supervisor_adopts_its_children_and_still_supervises_them() -> None:
    async with running_stack(*TOPOLOGY) as stack:
        run_dir = ("--run-dir", str(stack.run_dir))
        # Membership the config doesn't say: a scale step and a drain.
        assert (await cli("scale", "proxy-0", "3", *run_dir)).returncode == 0
        assert (await cli("drain", "server-1-1", *run_dir)).returncode == 0
        before = await pids(stack)
        async with steady_load(stack, workers=4, posts=True) as seen:
            await served_after(stack, seen, 50)
            out = await cli("upgrade", "--supervisor-only", *run_dir, timeout=60)
            assert out.returncode == 0, out.stderr
            await served_after(stack, seen, 50)
        only_200s(seen)
        assert await pids(stack) == before  # every child adopted, none restarted
        assert (await stack.component("server-1-1")).state == "draining"
        assert (await stack.component("server-0-2")).state == "ready"

        # An adopted child that dies is seen (through its pidfd) and restarted.
        await stack.kill("server-0-0")
        await stack.wait_for("server-0-0", not_pid=before["server-0-0"])
        assert "server-0-0 died: killed by SIGKILL" in stack.logs()

        # And the re-executed supervisor stops them all, as the one before would have.
        now = await pids(stack)
        children = [psutil.Process(pid) for name, pid in now.items() if name != "supervisor"]
        assert await stack.stop() == 0
        assert not [p.pid for p in children if p.is_running() and p.status() != "zombie"]


async def test_a_broken_install_is_refused_and_the_stack_runs_on() -> None:
    """The stack runs from a copy of the code; a syntax error in the copy stands for a
    broken install: the upgrade is refused with the error, nothing changes; once the
    copy is mended the upgrade goes through."""
    code = short_tmpdir()
    shutil.copytree(SOURCE, code / "lbstack", ignore=shutil.ignore_patterns("__pycache__"))
    async with running_stack(*TOPOLOGY, cwd=code) as stack:
        run_dir = ("--run-dir", str(stack.run_dir))
        before = await pids(stack)
        child = code / "lbstack" / "worker.py"
        good = child.read_text()
        child.write_text(good + "\ndef broken(:\n")
        out = await cli("upgrade", *run_dir, timeout=60)
        assert out.returncode == 1, out.stdout
        assert "upgrade refused, the stack runs on unchanged" in out.stderr, out.stderr
        assert "SyntaxError" in out.stderr, out.stderr
        assert await pids(stack) == before
        assert (await _supervisor(stack)).upgrades == 0
        child.write_text(good)
        out = await cli("upgrade", "--supervisor-only", *run_dir, timeout=60)
        assert out.returncode == 0, out.stderr
        assert (await _supervisor(stack)).upgrades == 1
    shutil.rmtree(code, ignore_errors=True)


async def test_sighups_during_the_upgrade_are_kept_and_acted_on_after_it() -> None:
    """A SIGHUP while the upgrade holds the membership lock waits as a pending reload,
    and one right at the exec (where its default action would end the supervisor) is
    blocked across it: the new image acts on both."""
    config = '[proxy]\npolicy = "p2c_ewma"\n'
    async with running_stack(*TOPOLOGY, config=config) as stack:
        (stack.run_dir.parent / "lbstack.toml").write_text(
            config.replace("p2c_ewma", "least_outstanding")
        )
        upgrading = asyncio.create_task(
            cli("upgrade", "--supervisor-only", "--run-dir", str(stack.run_dir), timeout=60)
        )

        async def checking() -> bool:  # the new code's check runs: the lock is held
            return any(
                "lbstack.supervisor.upgrade" in " ".join(p.info["cmdline"] or [])
                for p in psutil.process_iter(["cmdline"])
            )

        await until(checking, "the upgrade's check to run")
        stack.process.send_signal(signal.SIGHUP)

        async def execing() -> bool:
            return "upgrade 1: re-executing" in stack.logs()

        await until(execing, "the exec")
        stack.process.send_signal(signal.SIGHUP)
        out = await upgrading
        assert out.returncode == 0, out.stderr

        async def both() -> bool:  # the second may find the first still running
            logs = stack.logs()
            return logs.count("reload done") + logs.count("already running; ignored") >= 2

        await until(both, "both SIGHUPs acted on", timeout=60)
        assert "reload done" in stack.logs()
        assert stack.process.returncode is None, stack.logs()
        assert (await router_status(stack, "proxy-0")).policy == "least_outstanding"
        assert (await _supervisor(stack)).upgrades == 1


async def test_a_supervisor_from_before_upgrades_gets_a_clear_answer() -> None:
    """A stack whose supervisor has no ``POST /upgrade`` (and says no ``upgrades``):
    the command says what to do instead, exit 1."""
    run_dir = short_tmpdir()

    async def status(request: web.Request) -> web.Response:
        return web.json_response(
            {"components": [{"name": "supervisor", "role": "supervisor", "pid": 1}]}
        )

    app = web.Application()
    app.router.add_get("/status", status)
    async with serving(app, run_dir / "control.sock"):
        out = await cli("upgrade", "--run-dir", str(run_dir))
    shutil.rmtree(run_dir, ignore_errors=True)
    assert out.returncode == 1, out.stdout
    assert "predates `lbstack upgrade`" in out.stderr, out.stderr
    assert "lbstack restart --rolling" in out.stderr, out.stderr
