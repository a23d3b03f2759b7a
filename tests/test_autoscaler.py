"""The autoscaler: its decision rule and signals (pure, with a clock the test moves), the
CPU of a real process tree and, on the real stack, a load step that grows a group and
its end that shrinks it back. More real-stack cases: ``tests/test_autoscale_*.py``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Awaitable, Callable

from prometheus_client import generate_latest

from lbstack.config import Autoscale
from lbstack.metrics import Metrics, UpstreamMetrics
from lbstack.supervisor.autoscaler import Reading, Recommender, Signal
from lbstack.supervisor.telemetry import tree_cpu_seconds
from lbstack.testing import running_stack
from tests.conftest import FakeClock
from tests.harness import statuses, steady_load, until


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


def test_a_fresh_group_is_not_shrunk_within_its_scale_down_window() -> None:
    # Like the HPA, the history starts with the size at start: a stack that has just come
    # up idle keeps its servers for the window, then shrinks one step at a time.
    rec = Recommender(policy(scale_down_window=5, max_step_down=1), seed=(0.0, 3))
    held = rec.decide(1.0, current=3, observed=0.0)
    assert (held.recommendation, held.desired) == (1, 3)
    assert rec.decide(6.0, current=3, observed=0.0).desired == 2
    # With no window, the seed holds nothing.
    assert Recommender(policy(scale_down_window=0), seed=(0.0, 3)).decide(1.0, 3, 0.0).desired == 2


def test_a_recommendation_beyond_min_or_max_says_so() -> None:
    up = Recommender(policy(max=3)).decide(0.0, current=3, observed=40.0)
    assert (up.recommendation, up.desired, up.reason) == (
        3,
        3,
        "load above target, capped at max 3",
    )
    down = Recommender(policy(min=2, scale_down_window=0)).decide(0.0, current=2, observed=0.0)
    assert (down.desired, down.reason) == (2, "load below target, floored at min 2")


def _proxy_text(in_flight: dict[str, int], latencies: dict[str, list[float]]) -> str:
    """A proxy's /metrics text with these per-upstream figures."""
    metrics = Metrics("proxy", "proxy-0")
    upstream = UpstreamMetrics(metrics)
    for name, count in in_flight.items():
        upstream.in_flight.labels("proxy", "proxy-0", name).set(count)
    for name, values in latencies.items():
        for value in values:
            upstream.latency.labels("proxy", "proxy-0", name).observe(value)
    return generate_latest(metrics.registry).decode()


def test_in_flight_comes_from_the_proxy_and_averages_over_its_window() -> None:
    clock = FakeClock()
    signal = Signal(policy(window=10), clock)
    group = {"server-0-0", "server-0-1"}
    # server-0-9 is not (or no longer) in the group: it does not count.
    text = _proxy_text({"server-0-0": 2, "server-0-1": 6, "server-0-9": 40}, {})
    signal.add(signal.sample(group, Reading(proxy=text)))
    assert signal.observed() == 4.0
    clock.advance(5)
    signal.add(8.0)
    assert signal.observed() == 6.0
    clock.advance(6)  # the first sample is now older than the window
    signal.add(signal.sample(group, Reading()))  # the proxy did not answer: no sample
    assert signal.observed() == 8.0
    clock.advance(11)
    signal.add(None)
    assert signal.observed() is None
    assert signal.sample(group, Reading(proxy=_proxy_text({"server-0-9": 3}, {}))) is None


def test_p99_counts_each_upstream_since_the_last_reading() -> None:
    signal = Signal(policy(signal="p99", target=0.1))
    group = {"server-0-0", "server-0-1"}
    first = _proxy_text({}, {"server-0-0": [0.01] * 50, "server-0-1": [0.01] * 50})
    assert signal.sample(group, Reading(proxy=first)) is None  # a baseline only
    # 100 more requests, the slow ones on server-0-1; server-0-0's history stays out.
    second = _proxy_text({}, {"server-0-0": [0.01] * 100, "server-0-1": [0.01] * 50 + [0.4] * 50})
    p99 = signal.sample(group, Reading(proxy=second))
    assert p99 is not None and 0.25 < p99 <= 0.5, p99
    # server-0-1 left the group: its series are gone, which takes nothing away.
    third = _proxy_text({}, {"server-0-0": [0.01] * 200})
    p99 = signal.sample({"server-0-0"}, Reading(proxy=third))
    assert p99 is not None and p99 <= 0.025, p99
    # No request since: an idle group, which reads as no latency (so it can shrink).
    assert signal.sample({"server-0-0"}, Reading(proxy=third)) == 0.0
    assert signal.sample({"server-0-0"}, Reading()) is None  # the proxy did not answer


def test_cpu_is_the_rate_of_each_process_tree_and_a_restart_starts_over() -> None:
    clock = FakeClock()
    signal = Signal(policy(signal="cpu", target=0.5), clock)
    group = {"server-0-0", "server-0-1"}
    assert signal.sample(group, Reading(cpu={"server-0-0": (10, 5.0)})) is None
    clock.advance(2)
    cpu = {"server-0-0": (10, 6.0), "server-0-1": (11, 1.0)}
    assert signal.sample(group, Reading(cpu=cpu)) == 0.5  # 1 s in 2 s; server-0-1 new
    clock.advance(1)
    cpu = {"server-0-0": (10, 6.5), "server-0-1": (11, 2.5)}
    assert signal.sample(group, Reading(cpu=cpu)) == 1.0  # (0.5 + 1.5) / 2
    clock.advance(1)
    # server-0-0 was restarted (a new pid with little CPU yet): a baseline, not -6.4.
    cpu = {"server-0-0": (12, 0.1), "server-0-1": (11, 3.0)}
    assert signal.sample(group, Reading(cpu=cpu)) == 0.5
    assert signal.sample(group, Reading()) is None


BURN_CHILD = """
import sys, time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("burnt", flush=True)
sys.stdin.read()
"""
MASTER = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BURN_CHILD!r}])"


def test_tree_cpu_seconds_counts_the_descendants() -> None:
    # A master that does nothing and a worker, its child, that burns 0.3 s of CPU.
    with subprocess.Popen(
        [sys.executable, "-c", MASTER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as master:
        assert master.stdin is not None and master.stdout is not None
        assert master.stdout.readline() == "burnt\n"
        assert tree_cpu_seconds([master.pid], proc="/nonexistent") == {}
        tree = tree_cpu_seconds([master.pid, 2**22 + 1])  # the second is no process
        assert set(tree) == {master.pid}
        assert tree[master.pid] >= 0.3
        master.stdin.close()
        assert master.wait(timeout=10) == 0
    assert tree_cpu_seconds([master.pid]) == {}  # gone


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
                return len(status.names("server")) == count

            return check

        async with steady_load(stack, workers=12, path="/step") as seen:
            await until(servers(3), "the group to grow to 3 servers", timeout=45)
            status = await stack.status()
            assert status.autoscale["proxy-0"].target == 2
        await until(servers(1), "the group to shrink back to 1 server", timeout=45)
        assert statuses(seen) == {"200"}, seen
        # Up by at most max_step_up (2) to at most max (3), down by max_step_down (1).
        # (1 -> 3 at once, or 1 -> 2 -> 3 when the first window still held idle samples.)
        steps = [
            tuple(int(n) for n in line.rsplit(": ", 1)[1].split(" servers")[0].split(" -> "))
            for line in stack.logs().splitlines()
            if "proxy-0: load" in line and " -> " in line
        ]
        assert steps[-2:] == [(3, 2), (2, 1)], steps
        assert steps[:-2] and all(0 < b - a <= 2 and b <= 3 for a, b in steps[:-2]), steps
        json.dumps(status.to_json())  # the status with the autoscaler's view is JSON
