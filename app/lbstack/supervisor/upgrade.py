"""Upgrading the supervisor in place: it re-executes itself and keeps everything else.

``lbstack upgrade`` (after installing a new lbstack) makes the supervisor ``execve``
its own command line again, like nginx's binary upgrade but without a second master:

* the **pid stays**, so the children are still its children (it reaps them, and their
  parent-death signal does not fire) and systemd's ``MainPID`` still holds;
* every **listening socket stays open**: its file descriptor survives the exec, and
  connections arriving meanwhile wait in its queue;
* the **state** the new image needs (the running config, which descriptor is which
  socket, every child's pid, restarts and drain state, how many upgrades so far) goes
  through a 0600 file in the run dir named by ``LBSTACK_RESUME``.

The new image adopts the running children (``Child.adopt``: a pidfd tells it when one
exits, and it is restarted as usual) instead of starting new ones, so no request
notices. The CLI then rolls the children onto the new code with ``restart --rolling``.
An upgrade runs with the membership lock held, so no reload or scale step is cut in
half, and only after ``python -m lbstack.supervisor.upgrade --check STATE`` — the *new* code
importing the whole supervisor and reading the state — succeeds: a broken install is
refused with its error instead of taking the stack down.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lbstack.address import Address
from lbstack.config import Config
from lbstack.errors import ControlError
from lbstack.log import get_logger
from lbstack.supervisor.topology import Topology

log = get_logger("supervisor")
STATE_ENV = "LBSTACK_RESUME"
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # the supervisor's
STATE_FILE = "upgrade.json"
CHECK_TIMEOUT = 30.0


class ChildState(BaseModel):
    """One child as the new image adopts it."""

    model_config = ConfigDict(frozen=True)

    name: str
    pid: int | None  # None: between two runs (back-off); the new image starts it
    restarts: int
    draining: bool
    started_at: float | None


class Resume(BaseModel):
    """Everything a re-executed supervisor takes over from the image before it."""

    model_config = ConfigDict(frozen=True)

    config: Config
    sockets: dict[str, int]  # address -> inherited file descriptor
    metrics_address: str | None
    children: tuple[ChildState, ...]
    started_at: float
    upgrades: int  # how many times this supervisor has re-executed itself
    # Signals the previous image received and had not acted on yet (a SIGHUP whose reload
    # waited for the upgrade among them): the new image acts on them.
    signals: tuple[int, ...] = ()


async def upgrade(
    snapshot: Callable[[], Resume],
    state: Path,
    stopping: Callable[[], bool],
    answer: Callable[[], Awaitable[None]],
) -> None:
    """Check the new code, ``answer`` the client, re-execute the supervisor. Returns
    only by raising ControlError, with the stack as it was.

    ``snapshot`` is what the new image takes over, written to the file ``state``;
    ``stopping`` whether the stack began to stop (then the upgrade is abandoned). The
    caller holds a membership change: nothing changes between snapshot and exec."""
    try:
        _write(state, snapshot())
        await _check(state, stopping)
    except BaseException:
        _discard(state)
        raise
    # From here until the new image's handlers are in place a signal waits, blocked (the
    # mask survives the exec): a SIGHUP or SIGTERM in between would otherwise take its
    # default action and end the supervisor. One received before this is in the
    # snapshot's ``signals``.
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        await answer()
        # Again, with no await between it and the exec: a child restarted meanwhile
        # must be adopted by its new pid, not its old one.
        resume = snapshot()
        _write(state, resume)
        log.info("upgrade %d: re-executing the supervisor (pid %d)", resume.upgrades, os.getpid())
        _exec(state, list(resume.sockets.values()))
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        _discard(state)
        raise


def state_of(
    topology: Topology,
    *,
    metrics_address: Address | None,
    started_at: float,
    upgrades: int,
    signals: tuple[int, ...],
) -> Resume:
    """What a re-executed supervisor needs to take over the stack ``topology`` models."""
    return Resume(
        config=topology.config,
        sockets=topology.sockets.descriptors(),
        metrics_address=None if metrics_address is None else str(metrics_address),
        children=tuple(
            ChildState(
                name=c.name,
                pid=c.pid,
                restarts=c.restarts,
                draining=c.draining,
                started_at=c.started_at,
            )
            for c in topology
        ),
        started_at=started_at,
        upgrades=upgrades,
        signals=signals,
    )


async def adopt(topology: Topology, resume: Resume) -> bool:
    """In the new image: watch the children the previous one started, and start any that
    was between two runs. Whether every one became ready."""
    states = {c.name: c for c in resume.children}
    adopted = 0
    for child in topology:
        state = states.get(child.name)
        if state is not None:
            child.restarts, child.draining = state.restarts, state.draining
            child.started_at = state.started_at
        if state is not None and state.pid is not None:
            child.adopt(state.pid)
            adopted += 1
        else:
            child.start()
    results = await asyncio.gather(*(c.wait_ready() for c in topology))
    log.info(
        "upgrade %d: supervisor re-executed (pid %d), %d children adopted, %d started",
        resume.upgrades,
        os.getpid(),
        adopted,
        len(topology.children) - adopted,
    )
    return all(results)


def _discard(state: Path) -> None:
    state.unlink(missing_ok=True)


def _write(state: Path, resume: Resume) -> None:
    descriptor = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(resume.model_dump_json())


async def _check(state: Path, stopping: Callable[[], bool]) -> None:
    """Run the installed code's own check of ``state``; ControlError with its output,
    or if the stack began to stop meanwhile (a SIGTERM wins)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "lbstack.supervisor.upgrade",
        "--check",
        str(state),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), CHECK_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ControlError(
            f"upgrade refused: the new code's check took over {CHECK_TIMEOUT:.0f}s"
        ) from None
    if process.returncode != 0:
        text = output.decode(errors="replace").strip()
        raise ControlError(f"upgrade refused, the stack runs on unchanged: {text}")
    if stopping():
        raise ControlError("upgrade abandoned: the stack is stopping")


def _exec(state: Path, descriptors: list[int]) -> None:
    """Replace this process's image with a fresh start of the same command line."""
    for descriptor in descriptors:
        os.set_inheritable(descriptor, True)
    sys.stdout.flush()
    sys.stderr.flush()
    env = {**os.environ, STATE_ENV: str(state)}
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as exc:
        for descriptor in descriptors:
            os.set_inheritable(descriptor, False)
        raise ControlError(f"upgrade failed, the stack runs on unchanged: {exc}") from exc


def take_state() -> Resume | None:
    """In a re-executed supervisor: the state its predecessor left (read once, removed;
    children never see the variable). None in a supervisor started afresh."""
    path = os.environ.pop(STATE_ENV, None)
    if path is None:
        return None
    state = Path(path)
    try:
        return Resume.model_validate_json(state.read_text())
    finally:
        state.unlink(missing_ok=True)


# What the new image and its children import: the check imports them all.
NEW_IMAGE_IMPORTS = ("lbstack.cli", "lbstack.supervisor.arbiter", "lbstack.worker")


def main(argv: list[str] | None = None) -> int:
    """``--check STATE``: can this code take over from that state? Exit 0 if so."""
    parser = argparse.ArgumentParser(prog="python -m lbstack.supervisor.upgrade")
    parser.add_argument("--check", type=Path, required=True, metavar="STATE")
    args = parser.parse_args(argv)
    try:
        for module in NEW_IMAGE_IMPORTS:
            importlib.import_module(module)

        Resume.model_validate_json(args.check.read_text())
    except Exception as exc:  # what the new image would fail on, in a line
        print(f"the installed lbstack cannot take over: {exc.__class__.__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
