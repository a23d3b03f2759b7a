"""The autoscaler: its decision rule (pure, with a clock the test moves) and, on the real
stack, a load step that grows a group and its end that shrinks it back."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from prometheus_client import generate_latest

from app.config import Autoscale
from app.metrics import Metrics
from app.supervisor.autoscaler import Recommender, Signal
from tests.conftest import FakeClock
from tests.harness import running_stack, statuses, steady_load, until


def policy(**fields: object) -> Autoscale:
    base: dict[str, object] = {"enabled": True, "min": 1, "max": 10, "target": 4.0}
    return Autoscale.model_validate({**base, **fields})


def test_desired_is_current_times_observed_over_target() -> None:
    rec = Recommender(policy(max_step_up=10))
    decision = rec.decide(0.0, current=2, observed=10.0)
    assert (decision.recommendation, decision.desired) == (5, 5)
    assert decision.reason == "load above target"


def test_within_tolerance_nothing_changes() -> None:
    rec = Recommender(policy(tolerance=0.1))
    for observed in (3.7, 4.0, 4.39):
        assert rec.decide(0.0, current=3, observed=observed).desired == 3


def test_min_max_and_step_limits_hold() -> None:
    rec = Recommender(policy(max=6, max_step_up=2))
    assert rec.decide(0.0, current=2, observed=40.0).desired == 4  # +2 at most
    assert Recommender(policy(max=6, max_step_up=9)).decide(0, 2, 40.0).desired == 6
    down = Recommender(policy(min=2, max_step_down=1, scale_down_window=0))
    assert down.decide(0.0, current=5, observed=0.0).desired == 4  # -1 at most
    assert (
        Recommender(policy(min=2, max_step_down=9, scale_down_window=0)).decide(0.0, 5, 0.0).desired
        == 2
    )


def test_scale_down_takes_the_highest_recommendation_in_its_window() -> None:
    rec = Recommender(policy(scale_down_window=30, max_step_down=10))
    assert rec.decide(0.0, current=4, observed=4.0).desired == 4  # on target: rec 4
    # The load falls: the recommendation is 1, but 4 was recommended within 30 s.
    held = rec.decide(10.0, current=4, observed=1.0)
    assert (held.recommendation, held.desired) == (1, 4)
    assert "scale-down window" in held.reason
    assert rec.decide(31.0, current=4, observed=1.0).desired == 1


def test_missing_data_never_scales_down() -> None:
    rec = Recommender(policy(scale_down_window=0))
    decision = rec.decide(0.0, current=5, observed=None)
    assert decision.desired == 5 and decision.reason == "no data: holding"


def test_the_signal_averages_over_its_window_and_reads_real_metrics() -> None:
    clock = FakeClock()
    signal = Signal(policy(window=10), clock)
    servers = {}
    for name, in_flight in (("server-0-0", 2), ("server-0-1", 6)):
        metrics = Metrics("server", name)
        metrics.in_flight.set(in_flight)
        servers[name] = generate_latest(metrics.registry).decode()
    signal.add(signal.sample(servers, None))
    assert signal.observed() == 4.0
    clock.advance(5)
    signal.add(8.0)
    assert signal.observed() == 6.0
    clock.advance(6)  # the first sample is now older than the window
    signal.add(None)
    assert signal.observed() == 8.0
    clock.advance(11)
    signal.add(None)
    assert signal.observed() is None


AUTOSCALED = """
proxies = 1
servers_per_proxy = 1
[server.simulation]
latency = "100ms"
[proxy]
slow_start = "200ms"
[proxy.health]
interval = "200ms"
[autoscale]
enabled = true
min = 1
max = 3
target = 2
interval = "300ms"
window = "1s"
scale_down_window = "2s"
max_step_up = 2
"""


async def test_a_load_step_grows_the_group_and_its_end_shrinks_it() -> None:
    async with running_stack(config=AUTOSCALED) as stack:

        def servers(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                status = await stack.status()
                return sum(1 for c in status["components"] if c["role"] == "server") == count

            return check

        async with steady_load(stack, workers=12, path="/step") as seen:
            await until(servers(3), "the group to grow to 3 servers", timeout=45)
            status = await stack.status()
            assert status["autoscale"]["proxy-0"]["target"] == 2
        await until(servers(1), "the group to shrink back to 1 server", timeout=45)
        assert statuses(seen) == {"200"}, seen
        decisions = [line for line in stack.logs().splitlines() if "proxy-0: load" in line]
        assert any("1 -> 3 servers" in line for line in decisions), decisions
        assert any(line.endswith("-> 1 servers") for line in decisions), decisions
        json.dumps(status)  # the status with the autoscaler's view is JSON
