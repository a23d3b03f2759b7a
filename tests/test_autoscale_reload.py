"""On the real stack: ``lbstack reload`` changes a group's autoscaling policy, turns it
off (the group goes to the config's size) and on again."""

from __future__ import annotations

from lbstack.testing import RunningStack, running_stack
from tests.harness import cli, until

BASE = """
proxies = 1
servers_per_proxy = 2
[proxy.health]
interval = "200ms"
"""
# Idle and on target's far side, but a long scale-down window: no step while we look.
POLICY = """
[autoscale]
enabled = {enabled}
min = 1
max = {max}
target = {target}
interval = "200ms"
scale_down_window = "5m"
"""


def config(enabled: bool = True, max: int = 4, target: float = 4.0) -> str:
    return BASE + POLICY.format(enabled=str(enabled).lower(), max=max, target=target)


async def _reload(stack: RunningStack, text: str) -> None:
    (stack.run_dir.parent / "lbstack.toml").write_text(text)
    out = await cli("reload", "--run-dir", str(stack.run_dir), timeout=120)
    assert out.returncode == 0, out.stderr


async def _evaluating(stack: RunningStack, target: float, after: int = 0) -> int:
    """Until proxy-0 is evaluated with ``target`` more than ``after`` times; the count."""
    seen = 0

    async def check() -> bool:
        nonlocal seen
        view = (await stack.status()).autoscale.get("proxy-0")
        if view is None or view.target != target or view.reason is None:
            return False
        seen = view.evaluations
        return seen > after

    await until(check, f"proxy-0 evaluated with target {target}")
    return seen


async def test_reload_changes_turns_off_and_on_a_groups_autoscaling() -> None:
    async with running_stack(config=config()) as stack:
        await _evaluating(stack, 4.0, after=2)
        await _reload(stack, config(max=6, target=2.0))
        # The policy changed: its loop starts over (a new count) with the new figures.
        await _evaluating(stack, 2.0)
        view = (await stack.status()).autoscale["proxy-0"]
        assert (view.max, view.target) == (6, 2.0), view

        # Off: the group is the config's again, its size set by the reload.
        await _reload(
            stack, config(enabled=False).replace("servers_per_proxy = 2", "servers_per_proxy = 3")
        )
        assert "proxy-0" not in (await stack.status()).autoscale
        status = await stack.status()
        assert status.names("server") == [
            "server-0-0",
            "server-0-1",
            "server-0-2",
        ]

        await _reload(stack, config(target=3.0))
        await _evaluating(stack, 3.0)
        logs = stack.logs()
        assert "proxy-0: autoscaling policy changed" in logs
        assert "proxy-0: autoscaling turned off" in logs
