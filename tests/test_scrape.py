"""The metrics scraper: upstreams' own load read from their admin sockets."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lbstack import scrape
from lbstack.address import Address
from lbstack.admin import create_admin_app
from lbstack.config import TierConfig
from lbstack.metrics import Metrics, UpstreamMetrics, parse
from lbstack.routing.upstream import Upstream
from lbstack.scrape import Report, Scraper
from tests.conftest import FakeClock, UnixServers
from tests.harness import serving

WAIT = 10.0  # the longest any single step of a test may take
ROLE, INSTANCE = "balancer", "balancer-0"


class FakeAdmin:
    """An upstream's admin socket serving a real ``Metrics`` registry's /metrics."""

    def __init__(self, role: str = "server", instance: str = "server-0-0") -> None:
        self.metrics = Metrics(role, instance)
        self.status = 200
        self.body: bytes | None = None  # served instead of the registry when set
        self.scrapes = 0

    def restart(self) -> None:
        """Start over with fresh counters, as a restarted process would."""
        self.metrics = Metrics(self.metrics.role, self.metrics.instance)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        assert request.path == "/metrics"
        self.scrapes += 1
        if self.status != 200:
            return web.Response(status=self.status, text="broken")
        body = self.body if self.body is not None else generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def serve_admin(unix_servers: UnixServers, name: str, admin: FakeAdmin) -> Upstream:
    """An upstream named ``name`` whose admin socket ``admin`` serves."""
    address = await unix_servers.serve(admin.handle, f"{name}.admin")
    data = Address.unix(str(unix_servers.directory / f"{name}.sock"))
    return Upstream(name, data, address)


def tier(**fields: Any) -> TierConfig:
    return TierConfig.model_validate(fields)


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"role": ROLE, "instance": INSTANCE, **labels})
    return 0.0 if value is None else value


MakeScraper = Callable[..., Scraper]


@pytest.fixture
async def make_scraper() -> AsyncIterator[MakeScraper]:
    """Builds scrapers and closes them all at teardown."""
    made: list[Scraper] = []

    def make(
        ups: Sequence[Upstream],
        config: TierConfig,
        metrics: Metrics | None = None,
        clock: Callable[[], float] | None = None,
    ) -> Scraper:
        upstream_metrics = UpstreamMetrics(metrics or Metrics(ROLE, INSTANCE))
        scraper = Scraper(ups, config, upstream_metrics, clock or time.monotonic)
        made.append(scraper)
        return scraper

    yield make
    for scraper in made:
        await scraper.close()


def scraper_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "metrics-scraper" and not t.done()]


async def test_in_flight_and_mean_latency_over_the_interval(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    clock = FakeClock()
    scraper = make_scraper([up], tier(), clock=clock)

    admin.metrics.in_flight.set(3)
    for seconds in (0.1, 0.1):
        admin.metrics.latency.observe(seconds)
    assert await scraper.scrape(up)
    assert up.reported_in_flight == 3
    assert up.reported_latency == pytest.approx(0.1), "the first scrape: the mean so far"
    assert up.reported_health == 1.0, "a server routes nothing: all of it is healthy"
    assert up.reported_at == clock.now

    clock.advance(1)
    admin.metrics.in_flight.set(1)
    for seconds in (0.3, 0.3):
        admin.metrics.latency.observe(seconds)
    await scraper.scrape_once()
    assert up.reported_in_flight == 1
    # Over the last interval only, not the lifetime mean (0.2).
    assert up.reported_latency == pytest.approx(0.3)
    assert up.reported_at == clock.now


async def test_without_new_requests_the_latency_figure_fades(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    clock = FakeClock()
    scraper = make_scraper([up], tier(decay=2), clock=clock)
    admin.metrics.latency.observe(0.5)
    assert await scraper.scrape(up)
    assert up.reported_latency == pytest.approx(0.5)

    clock.advance(2)
    assert await scraper.scrape(up)
    assert up.reported_latency == pytest.approx(0.5 * math.exp(-1))
    assert up.reported_at == clock.now, "the other figures are fresh"

    clock.advance(1)
    admin.metrics.latency.observe(0.05)
    assert await scraper.scrape(up)
    assert up.reported_latency == pytest.approx(0.05)


async def test_a_restarted_upstream_counts_from_its_start(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    scraper = make_scraper([up], tier(), clock=FakeClock())
    for _ in range(10):
        admin.metrics.latency.observe(1.0)
    assert await scraper.scrape(up)
    admin.restart()
    admin.metrics.latency.observe(0.2)
    assert await scraper.scrape(up)
    assert up.reported_latency == pytest.approx(0.2)


async def test_a_router_reports_the_share_of_its_upstreams_in(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin("proxy", "proxy-0")
    proxy_metrics = UpstreamMetrics(admin.metrics)
    for i, healthy in enumerate((1, 1, 1, 0)):
        proxy_metrics.healthy.labels(*proxy_metrics.labels(f"server-0-{i}")).set(healthy)
    # A router counts its queued requests in flight from their arrival: 2 of the 5 wait.
    proxy_metrics.queue_length.set(2)
    admin.metrics.in_flight.set(5)
    up = await serve_admin(unix_servers, "proxy-0", admin)
    scraper = make_scraper([up], tier(), clock=FakeClock())

    assert await scraper.scrape(up)
    assert up.reported_health == pytest.approx(0.75)
    assert up.reported_in_flight == 5, "queued requests are counted once"


async def test_a_failed_scrape_leaves_the_figures_to_age_and_counts(
    unix_servers: UnixServers, make_scraper: MakeScraper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "lbstack.scrape")
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    gone = Upstream(
        "server-0-1",
        Address.unix(str(unix_servers.directory / "s1.sock")),
        Address.unix(str(unix_servers.directory / "s1.admin.sock")),
    )
    clock = FakeClock()
    metrics = Metrics(ROLE, INSTANCE)
    scraper = make_scraper([up, gone], tier(), metrics, clock)

    admin.metrics.in_flight.set(4)
    admin.metrics.latency.observe(0.25)
    await scraper.scrape_once()
    stamped = clock.now
    figures = (up.reported_in_flight, up.reported_latency, up.reported_health)
    assert figures == (4, 0.25, 1.0)
    assert gone.reported_at == -math.inf
    assert sample(metrics, "lbstack_scrape_errors_total", upstream="server-0-1") == 1
    assert "cannot scrape server-0-1" in caplog.text

    admin.metrics.in_flight.set(9)
    for status, body in ((500, None), (200, b"this is { not prometheus\n")):
        clock.advance(1)
        admin.status, admin.body = status, body
        assert not await scraper.scrape(up)
        assert up.reported_at == stamped, "a failed scrape must not look fresh"
        assert (up.reported_in_flight, up.reported_latency, up.reported_health) == figures
    assert sample(metrics, "lbstack_scrape_errors_total", upstream="server-0-0") == 2
    assert caplog.text.count("cannot scrape server-0-0") == 1, "logged once while failing"

    admin.status, admin.body = 200, None
    assert await scraper.scrape(up)
    assert up.reported_at == clock.now and up.reported_in_flight == 9
    assert "scraping server-0-0 works again" in caplog.text


async def test_report_parses_a_real_exposition() -> None:
    metrics = Metrics("server", "server-0-0")
    metrics.in_flight.set(2)
    metrics.latency.observe(0.5)
    metrics.latency.observe(1.5)
    report = Report.parse(generate_latest(metrics.registry).decode())
    assert report == Report(in_flight=2, duration_sum=2.0, duration_count=2, health=1.0)

    router = Metrics("proxy", "proxy-0")
    upstream_metrics = UpstreamMetrics(router)
    upstream_metrics.queue_length.set(3)
    for i, healthy in enumerate((1, 0)):
        upstream_metrics.healthy.labels(*upstream_metrics.labels(f"server-0-{i}")).set(healthy)
    report = Report.parse(generate_latest(router.registry).decode())
    assert (report.queue, report.health, report.duration_count) == (3, 0.5, 0)
    with pytest.raises(ValueError):
        Report.parse("lbstack_in_flight_requests{role=server} not-a-number\n")


async def test_upstreams_without_admin_are_not_scraped(
    sockdir: Path, make_scraper: MakeScraper
) -> None:
    up = Upstream("own-0", Address.unix(str(sockdir / "own.sock")))
    scraper = make_scraper([up], tier(scrape_interval=0.01))
    await scraper.start()
    assert not scraper.running, "nothing to scrape"
    await scraper.scrape_once()
    assert up.reported_at == -math.inf


async def test_scrape_interval_zero_means_no_task(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    scraper = make_scraper([up], tier(scrape_interval=0))
    await scraper.start()
    assert not scraper.running
    assert scraper_tasks() == []
    assert admin.scrapes == 0


async def test_scrapes_run_in_the_background_until_closed(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    admin = FakeAdmin()
    up = await serve_admin(unix_servers, "server-0-0", admin)
    scraper = make_scraper([up], tier(scrape_interval=0.01))
    admin.metrics.in_flight.set(7)
    await scraper.start()
    assert scraper.running
    deadline = asyncio.get_running_loop().time() + WAIT
    while admin.scrapes < 3:  # several rounds, through the one pooled connection
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting for scrapes"
        await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
    assert up.reported_in_flight == 7 and up.reported_at > -math.inf
    await scraper.close()
    assert not scraper.running
    assert scraper_tasks() == []


async def test_a_scrape_asks_the_admin_app_for_only_the_series_it_reads(
    unix_servers: UnixServers, make_scraper: MakeScraper
) -> None:
    router = Metrics("proxy", "proxy-0")
    upstream_metrics = UpstreamMetrics(router)
    for i in range(64):
        upstream_metrics.healthy.labels(*upstream_metrics.labels(f"server-0-{i}")).set(i % 2)
        upstream_metrics.requests.labels(*upstream_metrics.labels(f"server-0-{i}"), "200").inc()
    router.in_flight.set(5)
    router.latency.observe(0.25)
    bodies: list[bytes] = []
    app = create_admin_app(router, status=dict, ready=lambda: True)

    async def keep_body(request: web.Request, response: web.StreamResponse) -> None:
        if isinstance(response, web.Response) and request.path == "/metrics":
            assert isinstance(response.body, bytes)
            bodies.append(response.body)

    app.on_response_prepare.append(keep_body)
    admin = await unix_servers.stack.enter_async_context(
        serving(app, unix_servers.directory / "proxy-0.admin.sock")
    )
    data = Address.unix(str(unix_servers.directory / "p.sock"))
    up = Upstream("proxy-0", data, admin)
    scraper = make_scraper([up], tier())

    assert await scraper.scrape(up)
    assert (up.reported_in_flight, up.reported_health) == (5, 0.5)
    assert up.reported_latency == pytest.approx(0.25)
    names = {name for name, _labels, _value in parse(bodies[-1].decode())}
    assert names == {
        "lbstack_in_flight_requests",
        "lbstack_queue_length",
        "lbstack_request_duration_seconds_sum",
        "lbstack_request_duration_seconds_count",
        "lbstack_upstream_healthy",
    }, "no buckets, no per-code counters, no process figures"
    assert len(bodies[-1]) < len(generate_latest(router.registry)) / 2


async def test_a_hanging_upstream_delays_no_other_scrape(
    unix_servers: UnixServers, make_scraper: MakeScraper, monkeypatch: pytest.MonkeyPatch
) -> None:
    admins = [FakeAdmin(instance=f"server-0-{i}") for i in range(3)]
    ups = [await serve_admin(unix_servers, f"server-0-{i}", a) for i, a in enumerate(admins)]
    release = asyncio.Event()
    hung = {"asked": 0, "at_once": 0, "most_at_once": 0}

    async def hang(request: web.BaseRequest) -> web.StreamResponse:
        hung["asked"] += 1
        hung["at_once"] += 1
        hung["most_at_once"] = max(hung["most_at_once"], hung["at_once"])
        try:
            await release.wait()
        finally:
            hung["at_once"] -= 1
        return web.Response(text="")

    stuck = Address.unix(str(unix_servers.directory / "stuck.admin.sock"))
    await unix_servers.serve(hang, "stuck.admin")
    ups.append(Upstream("stuck", Address.unix(str(unix_servers.directory / "s.sock")), stuck))
    # The hung scrape outlasts the test: it is still waiting when the others are done.
    monkeypatch.setattr(scrape, "MIN_TIMEOUT", 60.0)
    monkeypatch.setattr(scrape, "MAX_TIMEOUT", 60.0)
    scraper = make_scraper(ups, tier(scrape_interval=0.02))
    await scraper.start()
    try:
        deadline = asyncio.get_running_loop().time() + WAIT
        while min(a.scrapes for a in admins) < 10:
            assert asyncio.get_running_loop().time() < deadline, "the others' scrapes stalled"
            await asyncio.sleep(0.005)  # wait-ok: polling with a deadline
        # Scraped in one round with the others, the hung upstream would have held up
        # every round; and it is not asked again while its first scrape is under way.
        assert hung == {"asked": 1, "at_once": 1, "most_at_once": 1}
    finally:
        release.set()
    await scraper.close()
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("metrics-scrape")] == []


async def test_scrape_max_rate_stretches_the_round_of_a_wide_group(
    sockdir: Path, make_scraper: MakeScraper
) -> None:
    def group(count: int) -> list[Upstream]:
        return [
            Upstream(
                f"server-0-{i}",
                Address.unix(str(sockdir / f"{i}.sock")),
                Address.unix(str(sockdir / f"{i}.admin.sock")),
            )
            for i in range(count)
        ]

    assert make_scraper(group(3), tier(scrape_interval=1, scrape_max_rate=32)).interval == 1.0
    wide = make_scraper(group(64), tier(scrape_interval=1, scrape_max_rate=32))
    assert wide.interval == 2.0, "64 upstreams at 32 scrapes/s: each every 2 s"
    for upstream in wide.upstreams[32:]:
        wide.remove(upstream)
    assert wide.interval == 1.0, "the bound follows the group as it shrinks"
    unbounded = make_scraper(group(64), tier(scrape_interval=1, scrape_max_rate=0))
    assert unbounded.interval == 1.0
