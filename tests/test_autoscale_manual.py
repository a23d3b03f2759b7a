"""On the real stack: ``lbstack scale`` by hand on an autoscaled group stands for the
policy's ``hold``, then the autoscaler takes the group back."""

from __future__ import annotations

import json
from typing import Any

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, until

HELD_EVALUATIONS = 5  # evaluations seen held, each of which would otherwise shrink

# Idle, with no scale-down window: without the hold, the first evaluation after the
# manual scale would start shrinking the group.
IDLE = """
proxies = 1
servers_per_proxy = 1
[proxy.health]
interval = "200ms"
[autoscale]
enabled = true
min = 1
max = 4
interval = "300ms"
window = "600ms"
scale_down_window = "0s"
max_step_down = 1
hold = "6s"
"""


async def _view(stack: RunningStack) -> dict[str, Any]:
    status = await stack.status()
    return {"servers": status.names("server"), **status.autoscale["proxy-0"].to_json()}


async def test_a_manual_scale_stands_for_the_hold_then_the_policy_takes_over() -> None:
    async with running_stack(config=IDLE) as stack:

        async def evaluated() -> bool:
            return bool((await _view(stack))["evaluations"] >= 2)

        await until(evaluated, "the autoscaler's first evaluations")
        out = await cli("scale", "proxy-0", "3", "--run-dir", str(stack.run_dir), timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["servers"] == ["server-0-0", "server-0-1", "server-0-2"]
        start = (await _view(stack))["evaluations"]
        held: list[int] = []

        async def held_for_a_while() -> bool:
            view = await _view(stack)
            if view["evaluations"] > start:
                assert view["reason"] == "held after a manual scale", view
                assert view["current"] == view["desired"] == 3, view
                assert len(view["servers"]) == 3, view
                held.append(view["evaluations"])
            return bool(view["evaluations"] >= start + HELD_EVALUATIONS)

        await until(held_for_a_while, f"{HELD_EVALUATIONS} evaluations held", timeout=30)
        assert held, "no evaluation seen during the hold"

        async def shrunk() -> bool:
            return bool((await _view(stack))["servers"] == ["server-0-0"])

        await until(shrunk, "the policy to take the idle group back to min", timeout=60)
        view = await _view(stack)
        assert view["reason"].startswith("load below target"), view
        steps = [
            line.rsplit(": ", 1)[1]
            for line in stack.logs().splitlines()
            if "proxy-0: load below target" in line and " -> " in line
        ]
        assert steps == ["3 -> 2 servers", "2 -> 1 servers"], steps
