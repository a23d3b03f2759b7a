"""The health monitor: active checks, passive ejection, panic mode and draining."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lbstack.address import Address
from lbstack.config import TierConfig
from lbstack.health import ActiveChecks, HealthMonitor
from lbstack.metrics import Metrics, UpstreamMetrics
from lbstack.routing.upstream import Upstream
from tests.conftest import FakeClock, UnixServers

WAIT = 10.0  # the longest any single step of a test may take
ROLE, INSTANCE = "proxy", "proxy-0"


@dataclass
class Target:
    """A fake endpoint a check probes: answers ``status`` and records what it was asked."""

    status: int = 200
    paths: list[str] = field(default_factory=list)
    connection: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None  # when set, requests wait for it before answering

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.paths.append(request.path)
        self.connection.append(request.headers.get("Connection", ""))
        if self.hold is not None:
            await self.hold.wait()
        return web.Response(status=self.status, text="checked")


def tier(**sections: Any) -> TierConfig:
    return TierConfig.model_validate(sections)


def upstream_metrics() -> UpstreamMetrics:
    return UpstreamMetrics(Metrics(ROLE, INSTANCE))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"role": ROLE, "instance": INSTANCE, **labels})
    return 0.0 if value is None else value


async def served(unix_servers: UnixServers, targets: list[Target]) -> list[Upstream]:
    """One upstream per target, each served (data and admin) on a socket of its own."""
    ups = []
    for i, target in enumerate(targets):
        address = await unix_servers.serve(target.handle, f"a{i}")
        ups.append(Upstream(f"server-0-{i}", address, address))
    return ups


def upstreams(sockdir: Path, count: int) -> list[Upstream]:
    """Upstreams whose addresses nothing serves (for tests that never probe)."""
    return [
        Upstream(f"server-0-{i}", Address.unix(str(sockdir / f"s{i}.sock"))) for i in range(count)
    ]


MakeMonitor = Callable[..., HealthMonitor]


@pytest.fixture
async def make_monitor() -> AsyncIterator[MakeMonitor]:
    """Builds monitors and closes them all at teardown."""
    made: list[HealthMonitor] = []

    def make(
        ups: Sequence[Upstream],
        config: TierConfig,
        metrics: UpstreamMetrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> HealthMonitor:
        monitor = HealthMonitor(ups, config, metrics or upstream_metrics(), clock or time.monotonic)
        made.append(monitor)
        return monitor

    yield make
    for monitor in made:
        await monitor.close()


async def eventually(predicate: Callable[[], bool], what: str) -> None:
    """Poll ``predicate`` until it holds, failing after WAIT seconds."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)  # wait-ok: polling with a deadline


def monitor_tasks() -> list[asyncio.Task[Any]]:
    return [
        t for t in asyncio.all_tasks() if t.get_name().startswith("health-check") and not t.done()
    ]


# -- active checks ------------------------------------------------------------------------


async def test_rise_and_fall_hysteresis_on_admin_readyz(
    unix_servers: UnixServers, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    target = Target()
    admin = await unix_servers.serve(target.handle, "a0")
    # The data address is never probed when there is an admin address.
    up = Upstream("server-0-0", Address.unix(str(unix_servers.directory / "nothing.sock")), admin)
    clock = FakeClock()
    config = tier(health={"rise": 3, "fall": 2}, ejection={"panic_threshold": 0})
    monitor = make_monitor([up], config, clock=clock)

    assert up.healthy and up.available  # upstreams start in
    assert await monitor.checks.check_once(up)
    target.status = 503
    assert not await monitor.checks.check_once(up)
    assert up.healthy and up.available, "one failure is below fall=2"
    assert not await monitor.checks.check_once(up)
    assert not up.healthy and not up.available
    assert "upstream server-0-0 out: failed 2 active checks in a row" in caplog.text
    assert "/readyz answered 503" in caplog.text

    target.status = 200
    clock.advance(5)
    for _ in range(2):
        assert await monitor.checks.check_once(up)
        assert not up.available, "fewer passes than rise=3"
    assert up.ramp_start == -math.inf
    assert await monitor.checks.check_once(up)
    assert up.healthy and up.available
    assert up.ramp_start == clock.now, "recovery starts slow"
    assert "upstream server-0-0 back in: passed 3 active checks in a row" in caplog.text

    assert set(target.paths) == {"/readyz"}
    # Every check is a fresh, closed connection: no idle pooled connections to manage.
    assert set(target.connection) == {"close"}


async def test_a_pass_between_failures_restarts_the_fall_count(
    unix_servers: UnixServers, make_monitor: MakeMonitor
) -> None:
    target = Target(status=500)
    admin = await unix_servers.serve(target.handle, "a0")
    up = Upstream("server-0-0", admin, admin)
    monitor = make_monitor([up], tier(health={"fall": 2}, ejection={"panic_threshold": 0}))
    for status in (500, 200, 500, 200):
        target.status = status
        await monitor.checks.check_once(up)
    assert up.healthy


async def test_health_path_is_checked_on_the_data_address_without_admin(
    unix_servers: UnixServers, make_monitor: MakeMonitor
) -> None:
    target = Target()
    data = await unix_servers.serve(target.handle, "own")
    up = Upstream("own-0", data, health_path="/ping")
    monitor = make_monitor([up], tier(health={"fall": 1}, ejection={"panic_threshold": 0}))
    assert ActiveChecks.check_target(up) == (data, "/ping")
    assert await monitor.checks.check_once(up)
    target.status = 404
    assert not await monitor.checks.check_once(up)
    assert not up.healthy
    assert target.paths == ["/ping", "/ping"]


async def test_unreachable_and_slow_upstreams_fail_their_checks(
    unix_servers: UnixServers, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    target = Target(hold=asyncio.Event())
    slow = await unix_servers.serve(target.handle, "slow")
    gone = Address.unix(str(unix_servers.directory / "gone.sock"))
    ups = [Upstream("slow", slow, slow), Upstream("gone", gone, gone)]
    config = tier(health={"fall": 1, "timeout": 0.05}, ejection={"panic_threshold": 0})
    monitor = make_monitor(ups, config)
    try:
        assert not await monitor.checks.check_once(ups[0])
        assert not await monitor.checks.check_once(ups[1])
    finally:
        assert target.hold is not None
        target.hold.set()
    assert not ups[0].available and not ups[1].available
    assert "/readyz timed out after 0.05 s" in caplog.text
    assert "upstream gone out: failed 1 active checks in a row, last: /readyz failed" in caplog.text


async def test_background_checks_take_an_upstream_out_and_back(
    unix_servers: UnixServers, make_monitor: MakeMonitor
) -> None:
    targets = [Target(), Target()]
    ups = await served(unix_servers, targets)
    config = tier(health={"interval": 0.01, "rise": 2, "fall": 2}, ejection={"panic_threshold": 0})
    monitor = make_monitor(ups, config)
    await monitor.start()

    targets[1].status = 503
    await eventually(lambda: not ups[1].available, "server-0-1 to go out")
    assert len(monitor_tasks()) == len(ups)  # a check loop per upstream
    assert ups[0].available
    targets[1].status = 200
    await eventually(lambda: ups[1].available, "server-0-1 to come back")
    assert ups[1].ramp_start > -math.inf
    assert all(len(t.paths) >= 2 for t in targets), "every upstream is checked"

    await monitor.close()
    assert monitor_tasks() == []


async def test_interval_zero_means_no_checks(sockdir: Path, make_monitor: MakeMonitor) -> None:
    monitor = make_monitor(upstreams(sockdir, 2), tier(health={"interval": 0}))
    await monitor.start()
    assert monitor_tasks() == []
    await monitor.close()


# -- passive ejection ---------------------------------------------------------------------


async def test_consecutive_failures_eject(
    sockdir: Path, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    ups = upstreams(sockdir, 3)
    up = ups[0]
    clock = FakeClock()
    metrics = Metrics(ROLE, INSTANCE)
    config = tier(ejection={"consecutive_failures": 3, "base_time": 1, "max_time": 30})
    monitor = make_monitor(ups, config, UpstreamMetrics(metrics), clock)

    monitor.failure(up)
    monitor.failure(up)
    assert up.available and up.consecutive_failures == 2
    monitor.failure(up)
    assert not up.available
    assert up.healthy, "ejection is separate from the active checks' verdict"
    assert up.ejected_until == clock.now + 1
    assert up.ejections == 1
    assert sample(metrics, "lbstack_upstream_ejections_total", upstream=up.name) == 1
    assert (
        "upstream server-0-0 out: 3 consecutive failures, ejected for 1 s (ejection 1 in a row)"
        in caplog.text
    )
    assert all(u.available for u in ups[1:])

    # Tries that still land on it while it is out don't extend the ejection.
    for _ in range(5):
        monitor.failure(up)
    assert up.ejected_until == clock.now + 1
    assert sample(metrics, "lbstack_upstream_ejections_total", upstream=up.name) == 1


async def test_a_success_resets_the_failure_count(sockdir: Path, make_monitor: MakeMonitor) -> None:
    ups = upstreams(sockdir, 3)
    up = ups[0]
    monitor = make_monitor(ups, tier(ejection={"consecutive_failures": 3}), clock=FakeClock())
    monitor.failure(up)
    monitor.failure(up)
    monitor.success(up)
    assert up.consecutive_failures == 0
    monitor.failure(up)
    monitor.failure(up)
    assert up.available and up.ejections == 0


async def test_zero_consecutive_failures_turns_ejection_off(
    sockdir: Path, make_monitor: MakeMonitor
) -> None:
    ups = upstreams(sockdir, 3)
    monitor = make_monitor(ups, tier(ejection={"consecutive_failures": 0}), clock=FakeClock())
    for _ in range(100):
        monitor.failure(ups[0])
    assert ups[0].available and ups[0].ejections == 0


async def test_ejections_double_up_to_max_and_readmit_with_slow_start(
    sockdir: Path, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    ups = upstreams(sockdir, 3)
    up = ups[0]
    clock = FakeClock()
    config = tier(
        slow_start=4,
        ejection={"consecutive_failures": 1, "base_time": 1, "max_time": 5},
    )
    monitor = make_monitor(ups, config, clock=clock)

    lengths = []
    for _ in range(5):
        monitor.failure(up)
        assert not up.available
        length = up.ejected_until - clock.now
        lengths.append(length)
        clock.advance(length - 2**-10)  # binary fractions keep the sums exact
        monitor.refresh()
        assert not up.available, "still out until its time is up"
        clock.advance(2**-10)
        monitor.refresh()
        assert up.available
        assert up.ramp_start == clock.now
        assert up.consecutive_failures == 0
    assert lengths == [1, 2, 4, 5, 5]
    assert "upstream server-0-0 back in: ejection over (1 consecutive failures" in caplog.text
    assert monitor.status()[up.name]["slow_start_remaining_seconds"] == 4

    # Once it has stayed in for max_time, the streak is over: the next ejection is short.
    clock.advance(5)
    monitor.refresh()
    assert up.ejections == 0
    monitor.failure(up)
    assert up.ejected_until - clock.now == 1


async def test_an_ejected_upstream_comes_back_without_traffic(
    sockdir: Path, make_monitor: MakeMonitor
) -> None:
    ups = upstreams(sockdir, 3)
    up = ups[0]
    config = tier(
        health={"interval": 0},
        ejection={"consecutive_failures": 1, "base_time": 0.02, "max_time": 0.05},
    )
    monitor = make_monitor(ups, config)  # the real clock: the timer must fire by itself
    await monitor.start()
    monitor.failure(up)
    assert not up.available
    await eventually(lambda: up.available, "the ejection to end")
    assert up.ramp_start > -math.inf
    await eventually(lambda: up.ejections == 0, "the ejection streak to reset")


# -- panic mode and draining --------------------------------------------------------------


async def test_panic_mode_lets_every_upstream_take_traffic(
    sockdir: Path, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    ups = upstreams(sockdir, 3)
    clock = FakeClock()
    metrics = Metrics(ROLE, INSTANCE)
    config = tier(
        ejection={
            "consecutive_failures": 1,
            "base_time": 10,
            "max_time": 10,
            "panic_threshold": 0.5,
        }
    )
    monitor = make_monitor(ups, config, UpstreamMetrics(metrics), clock)

    monitor.failure(ups[0])
    assert [u.available for u in ups] == [False, True, True]
    assert not monitor.in_panic
    monitor.failure(ups[1])  # 1 of 3 in: below half
    assert monitor.in_panic
    assert all(u.available for u in ups)
    assert sample(metrics, "lbstack_panic_mode") == 1
    assert "panic: only 1 of 3 upstreams healthy" in caplog.text
    status = monitor.status()
    assert status["server-0-0"]["available"] and status["server-0-0"]["ejected_for_seconds"] == 10

    clock.advance(10)
    monitor.refresh()
    assert not monitor.in_panic
    assert all(u.available for u in ups)
    assert sample(metrics, "lbstack_panic_mode") == 0
    assert "panic over: 3 of 3 upstreams healthy" in caplog.text
    assert caplog.text.count("panic:") == 1, "logged once on entering"


async def test_a_draining_upstream_is_never_available(
    sockdir: Path, make_monitor: MakeMonitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.health")
    ups = upstreams(sockdir, 3)
    clock = FakeClock()
    config = tier(ejection={"consecutive_failures": 1, "base_time": 10, "panic_threshold": 0.5})
    monitor = make_monitor(ups, config, clock=clock)

    ups[2].draining = True
    monitor.refresh()
    assert not ups[2].available
    assert "upstream server-0-2 out: draining" in caplog.text
    # Draining is deliberate: it leaves the share healthy at 2 of 2, no panic.
    assert not monitor.in_panic

    monitor.failure(ups[0])  # 1 of the 2 that aren't draining is in: exactly half, no panic
    assert not monitor.in_panic
    monitor.failure(ups[1])
    assert monitor.in_panic
    assert [u.available for u in ups] == [True, True, False], "panic never picks a draining one"

    ups[2].draining = False
    clock.advance(1)
    monitor.refresh()
    assert ups[2].available and ups[2].ramp_start == clock.now
    assert "upstream server-0-2 back in: no longer draining" in caplog.text


async def test_status_reports_each_upstream(sockdir: Path, make_monitor: MakeMonitor) -> None:
    ups = upstreams(sockdir, 2)
    clock = FakeClock()
    config = tier(
        slow_start=3, ejection={"consecutive_failures": 2, "base_time": 2, "panic_threshold": 0}
    )
    monitor = make_monitor(ups, config, clock=clock)
    monitor.failure(ups[1])
    monitor.failure(ups[1])
    clock.advance(0.5)
    assert monitor.status() == {
        "server-0-0": {
            "healthy": True,
            "available": True,
            "draining": False,
            "ejected_for_seconds": 0.0,
            "ejections": 0,
            "consecutive_failures": 0,
            "slow_start_remaining_seconds": 0.0,
            "checks_skipped": 0,
        },
        "server-0-1": {
            "healthy": True,
            "available": False,
            "draining": False,
            "ejected_for_seconds": 1.5,
            "ejections": 1,
            "consecutive_failures": 2,
            "slow_start_remaining_seconds": 0.0,
            "checks_skipped": 0,
        },
    }
    clock.advance(1.5)
    monitor.refresh()
    assert monitor.status()["server-0-1"]["slow_start_remaining_seconds"] == 3.0


# -- live traffic as evidence ---------------------------------------------------------------


async def test_traffic_vouches_for_a_healthy_upstream_until_traffic_interval(
    sockdir: Path, make_monitor: MakeMonitor
) -> None:
    ups = upstreams(sockdir, 1)
    up = ups[0]
    clock = FakeClock()
    config = tier(health={"interval": 1, "traffic_interval": 5})
    monitor = make_monitor(ups, config, clock=clock)

    assert not monitor.checks.vouched_for(up), "no request yet: the check is due"
    monitor.success(up)
    assert not monitor.checks.vouched_for(up), "never checked: the first check is made anyway"
    monitor.checks.record_check(up, True)
    monitor.checks._probes[up].checked_at = clock.now  # as check_once stamps it

    for _ in range(4):
        clock.advance(1)
        monitor.success(up)
        assert monitor.checks.vouched_for(up), "served since the last tick: no need to probe"
    clock.advance(1)
    assert not monitor.checks.vouched_for(up), "idle since the last tick: probe it"
    monitor.success(up)
    assert not monitor.checks.vouched_for(up), "traffic_interval since the last check: probe anyway"
    assert monitor.status()[up.name]["checks_skipped"] == 4


async def test_failing_ejected_or_unhealthy_upstreams_are_always_checked(
    sockdir: Path, make_monitor: MakeMonitor
) -> None:
    ups = upstreams(sockdir, 3)
    clock = FakeClock()
    config = tier(
        health={"interval": 1, "traffic_interval": 60, "fall": 1},
        ejection={"consecutive_failures": 1, "panic_threshold": 0},
    )
    monitor = make_monitor(ups, config, clock=clock)
    for up in ups:
        monitor.checks._probes[up].checked_at = clock.now

    monitor.success(ups[0])
    monitor.failure(ups[0])  # a failure after the success: the evidence is mixed
    monitor.failure(ups[1])  # ejected
    ups[1].consecutive_failures = 0
    monitor.success(ups[1])
    monitor.checks.record_check(ups[2], False)  # unhealthy, yet (in panic, say) serving
    monitor.success(ups[2])
    assert not ups[1].available and not ups[2].healthy
    assert [monitor.checks.vouched_for(up) for up in ups] == [False, False, False]


async def test_traffic_interval_at_most_interval_checks_every_time(
    sockdir: Path, make_monitor: MakeMonitor
) -> None:
    ups = upstreams(sockdir, 1)
    monitor = make_monitor(ups, tier(health={"interval": 1, "traffic_interval": 1}))
    monitor.checks._probes[ups[0]].checked_at = time.monotonic()
    monitor.success(ups[0])
    assert not monitor.checks.vouched_for(ups[0])


async def test_a_busy_upstream_is_probed_less_than_an_idle_one(
    unix_servers: UnixServers, make_monitor: MakeMonitor
) -> None:
    targets = [Target(), Target()]
    ups = await served(unix_servers, targets)
    busy, idle = ups
    config = tier(health={"interval": 0.01, "traffic_interval": 60})
    monitor = make_monitor(ups, config)
    stop = asyncio.Event()

    async def serve_busy() -> None:  # what the forwarder reports for live requests
        while not stop.is_set():
            monitor.success(busy)
            await asyncio.sleep(0.001)  # wait-ok: a request every millisecond

    driver = asyncio.create_task(serve_busy())
    try:
        await monitor.start()
        await eventually(lambda: len(targets[1].paths) >= 10, "10 checks of the idle upstream")
    finally:
        stop.set()
        await driver
    assert len(targets[0].paths) <= 2, "traffic vouched for the busy upstream"
    assert monitor.status()[busy.name]["checks_skipped"] >= 5
    assert monitor.status()[idle.name]["checks_skipped"] == 0
