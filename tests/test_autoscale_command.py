"""On the real stack: a group of the user's own servers (gunicorn running ``tests.apps``,
no admin socket, no ``/metrics``) grows under a load step and shrinks back to ``min``
after it, with every signal: in-flight and p99 from the proxy, CPU from ``/proc``."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from lbstack.testing import RunningStack, running_stack
from tests.harness import scale_events, short_tmpdir, statuses, steady_load, until

GUNICORN = Path(sys.executable).parent / "gunicorn"
# --keep-alive above the proxy's pool_idle (15 s): a pooled connection is never closed
# under the proxy (gunicorn's default is 2 s).
COMMAND = (
    f"{GUNICORN} tests.apps:app -k aiohttp.GunicornWebWorker --bind unix:{{socket}} "
    "--no-control-socket --workers 1 --keep-alive 30"
)
MIN_EVALUATIONS = 8  # evaluations watched at min once the load has gone
STEP = re.compile(r"proxy-0: (.*) \((\w+) ([\d.]+|none), target [\d.]+\): (\d+) -> (\d+) servers$")


def config(**autoscale: Any) -> str:
    fields = "\n".join(f"{key} = {value!r}" for key, value in autoscale.items())
    return f"""
proxies = 1
servers_per_proxy = {autoscale["min"]}
[proxy]
slow_start = "200ms"
[proxy.health]
interval = "200ms"
[server]
kind = "command"
command = "{COMMAND}"
[autoscale]
enabled = true
interval = "300ms"
window = "1s"
scale_down_window = "2s"
{fields}
"""


async def _view(stack: RunningStack) -> dict[str, Any]:
    status = await stack.status()
    servers = [c for c in status.components if c.role == "server"]
    assert all(c.admin is None for c in servers)  # the user's own: no admin, no /metrics
    return {"servers": [c.name for c in servers], **status.autoscale["proxy-0"].to_json()}


async def _grow_and_shrink(
    stack: RunningStack, *, signal: str, path: str, workers: int, low: int, high: int
) -> list[tuple[int, int]]:
    """Load until the group reaches ``high``, then none until it is back at ``low`` and
    stays there; the scale steps taken, from the log. Checks the bounds all along."""
    sizes: list[int] = []

    async def at(count: int) -> bool:
        view = await _view(stack)
        sizes.append(len(view["servers"]))
        assert view["signal"] == signal, view
        return len(view["servers"]) == count and view.get("current") == count

    async with steady_load(stack, workers=workers, path=path) as seen:
        await until(lambda: at(high), f"the group to grow to {high} servers", timeout=60)
        grown = await _view(stack)
        # Still above the target at max: the recommendation is capped, no further step.
        start = grown["evaluations"]

        async def capped() -> bool:
            view = await _view(stack)
            assert len(view["servers"]) == high, view
            return bool(view["evaluations"] >= start + 3 and "capped at max" in view["reason"])

        await until(capped, "decisions capped at max under load", timeout=30)
        served = {key.split(":", 1)[1] for key in seen}
    await until(lambda: at(low), f"the group to shrink back to {low}", timeout=60)
    start = (await _view(stack))["evaluations"]

    async def held_at_min() -> bool:
        view = await _view(stack)
        assert len(view["servers"]) == low and view["desired"] == low, view
        return bool(view["evaluations"] >= start + MIN_EVALUATIONS)

    await until(held_at_min, f"{MIN_EVALUATIONS} evaluations at min", timeout=30)
    view = await _view(stack)
    # Idle (an idle server's CPU is small, not nil): min holds whatever the rule says.
    assert view["reason"].startswith("load below target"), view
    assert min(sizes) >= low and max(sizes) <= high, sizes
    assert statuses(seen) == {"200"}, seen  # zero failed requests, growing and shrinking
    assert {f"server-0-{i}" for i in range(high)} <= served, served  # the new ones served

    steps = []
    for line in stack.logs().splitlines():
        match = STEP.search(line)
        if match is not None:
            assert match[2] == signal and match[3] != "none", line
            steps.append((int(match[4]), int(match[5])))
    events = await scale_events(stack, "proxy-0")
    assert events == {
        "up": sum(b - a for a, b in steps if b > a),
        "down": sum(a - b for a, b in steps if b < a),
    }, (events, steps)
    return steps


async def test_own_servers_scale_on_in_flight_from_the_proxy() -> None:
    # 20 clients at 500 ms: ~10 in flight per server at 2, 5 at 4, over a target of 3 (a
    # long latency keeps the figure steady on a busy host, and the request rate low). One
    # server per step up (max_step_up), never more than 4 (max), one per step down, never
    # below 2.
    policy = {"min": 2, "max": 4, "target": 3.0, "max_step_up": 1, "max_step_down": 1}
    async with running_stack(config=config(**policy)) as stack:
        steps = await _grow_and_shrink(
            stack, signal="in_flight", path="/slow/500", workers=20, low=2, high=4
        )
        # Idle, the rule wants 0 servers; min keeps 2, and says so once.
        floored = "proxy-0: load below target, floored at min 2 (in_flight 0.000, target 3): "
        assert stack.logs().count(floored + "stays at 2 servers") == 1, stack.logs()
    assert steps == [(2, 3), (3, 4), (4, 3), (3, 2)], steps


async def test_own_servers_scale_on_p99_from_the_proxy() -> None:
    # Every request takes 100 ms, twice the target: the group grows to max, and shrinks
    # when an idle proxy reports no latency.
    policy = {"min": 1, "max": 2, "signal": "p99", "target": 0.05, "max_step_up": 1}
    async with running_stack(config=config(**policy)) as stack:
        steps = await _grow_and_shrink(
            stack, signal="p99", path="/slow/100", workers=4, low=1, high=2
        )
    assert steps == [(1, 2), (2, 1)], steps


async def test_own_servers_scale_on_the_cpu_of_their_process_trees() -> None:
    # gunicorn's master does nothing; its worker, a child process, burns 20 ms of CPU per
    # request: a single server under 4 clients uses far more than the 0.2 cores targeted.
    policy = {"min": 1, "max": 2, "signal": "cpu", "target": 0.2, "max_step_up": 1}
    async with running_stack(config=config(**policy)) as stack:
        steps = await _grow_and_shrink(
            stack, signal="cpu", path="/cpu/20", workers=4, low=1, high=2
        )
    assert steps == [(1, 2), (2, 1)], steps


async def test_a_step_whose_server_cannot_start_backs_off_and_the_group_recovers() -> None:
    """New servers can't start while the gate file is gone: each failed step is logged,
    the next one waits twice as long (not one try per interval, each spawning servers
    that fail), the stack and the running server carry on, and once servers can start
    again the group grows."""
    gate = short_tmpdir() / "gate"
    gate.touch()
    gated = f"sh -c 'test -e {gate} && exec {COMMAND}'"
    policy = {"min": 1, "max": 2, "target": 1.0, "max_step_up": 1}
    text = config(**policy).replace(f'command = "{COMMAND}"', f'command = "{gated}"')
    text += '[supervisor]\nboot_failures = 2\nrestart_backoff_initial = "10ms"\n'
    async with running_stack(config=text) as stack:
        gate.unlink()
        async with steady_load(stack, workers=6, path="/slow/200") as seen:

            async def failed() -> bool:
                return "proxy-0: scaling to 2 failed" in stack.logs()

            await until(failed, "a failed scale step", timeout=60)
            start = (await _view(stack))["evaluations"]

            async def evaluated() -> bool:
                return bool((await _view(stack))["evaluations"] >= start + 20)

            await until(evaluated, "20 more evaluations", timeout=60)
            # One try per interval would have failed about once per evaluation.
            failures = stack.logs().count("proxy-0: scaling to 2 failed")
            assert failures <= 5, failures
            assert "failed step(s), next try in" in stack.logs()
            assert stack.process.returncode is None
            gate.touch()

            async def grown() -> bool:
                return len((await _view(stack))["servers"]) == 2

            await until(grown, "the group to grow once servers can start", timeout=90)
        assert statuses(seen) == {"200"}, seen
