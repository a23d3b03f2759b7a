"""app/lbstack/gunicorn.py and deploy/gunicorn/: a tier run by gunicorn instead of ``lbstack up``.

The settings (``LBSTACK_*``) are checked in-process; then a real stack provides the
proxies and servers, and a balancer tier under gunicorn (2 workers, the deploy config
as it is) serves through them: its socket mode, each worker's admin socket, the metrics
summed over the workers, a killed worker replaced and its metrics files marked dead, a
graceful stop. A proxy tier under gunicorn serves the stack's servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import psutil
import pytest
import pytest_asyncio

from lbstack.address import Address
from lbstack.client import fetch, fetch_json, probe
from lbstack.errors import ConfigError
from lbstack.gunicorn import TierSettings, parse_upstreams
from lbstack.metrics import parse
from lbstack.testing import RunningStack, running_stack
from tests.harness import short_tmpdir, until
from tests.load import Load

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "deploy" / "gunicorn" / "gunicorn.conf.py"
GUNICORN = Path(sys.executable).parent / "gunicorn"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
REQUESTS = 40  # of each method, per batch: bounded
ADMIN = re.compile(r"(?P<name>.+)-(?P<pid>\d+)\.admin\.sock")


# -- settings -------------------------------------------------------------------------


def _settings(**env: str) -> TierSettings:
    return TierSettings.from_env(env)


def _problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        TierSettings.from_env(env)
    return caught.value.problems


def test_a_balancer_defaults_to_the_stack_proxies_of_its_config(tmp_path: Path) -> None:
    config = tmp_path / "lbstack.toml"
    config.write_text('run_dir = "/run/lbstack"\nproxies = 3\n')
    settings = _settings(LBSTACK_TIER="balancer", LBSTACK_CONFIG=str(config))
    assert [(u.name, str(u.address), str(u.admin)) for u in settings.upstreams] == [
        (
            f"proxy-{p}",
            f"unix:/run/lbstack/proxy-{p}.sock",
            f"unix:/run/lbstack/proxy-{p}.admin.sock",
        )
        for p in range(3)
    ]
    assert settings.name == "balancer"
    assert settings.app_uri == "lbstack.gunicorn:balancer_app"
    assert str(settings.default_bind) == "unix:/run/lbstack/balancer.sock"
    assert str(settings.admin(42)) == "unix:/run/lbstack/balancer-42.admin.sock"


def test_upstreams_name_themselves_or_are_named() -> None:
    upstreams, problems = parse_upstreams(
        "unix:/run/x/proxy-0.sock\n"
        "  app-1=tcp://127.0.0.1:8001,health_path=/ping "
        "app-2=unix:/srv/app.sock,admin=unix:/srv/app.admin.sock"
    )
    assert problems == []
    assert [
        (u.name, str(u.address), u.admin and str(u.admin), u.health_path) for u in upstreams
    ] == [
        ("proxy-0", "unix:/run/x/proxy-0.sock", "unix:/run/x/proxy-0.admin.sock", "/healthz"),
        ("app-1", "tcp://127.0.0.1:8001", None, "/ping"),
        ("app-2", "unix:/srv/app.sock", "unix:/srv/app.admin.sock", "/healthz"),
    ]
    settings = _settings(
        LBSTACK_TIER="proxy", LBSTACK_NAME="edge-proxy", LBSTACK_UPSTREAMS="a=unix:/a.sock"
    )
    assert settings.app_uri == "lbstack.gunicorn:proxy_app"
    assert settings.name == "edge-proxy"
    assert [u.name for u in settings.upstreams] == ["a"]


def test_bad_settings_name_the_variable_what_was_expected_and_found(tmp_path: Path) -> None:
    assert _problems(LBSTACK_TIER="server") == [
        "LBSTACK_TIER: expected 'balancer' or 'proxy', found 'server'"
    ]
    assert _problems(LBSTACK_TIER="proxy") == [
        "LBSTACK_UPSTREAMS: expected the proxy's servers, "
        "e.g. 'server-0=unix:/run/app/0.sock', found nothing"
    ]
    too_long = f"/{'d' * 100}/no/slash-4194304.admin.sock"
    problems = _problems(
        LBSTACK_TIER="balancer",
        LBSTACK_NAME="no/slash",
        LBSTACK_UPSTREAMS="a=http://x b=unix:/b.sock,weight=2 tcp://127.0.0.1:1 "
        "c=unix:/c c=unix:/d",
        LBSTACK_ADMIN_DIR="/" + "d" * 100,
    )
    assert problems == [
        "LBSTACK_NAME: expected a name of letters, digits, '.', '_' and '-', starting with a "
        "letter or digit, found 'no/slash'",
        f"LBSTACK_ADMIN_DIR: unix socket path is {len(too_long)} bytes, longer than "
        f"the 107-byte limit: {too_long!r} (use a shorter run dir)",
        "LBSTACK_UPSTREAMS[0].address: expected 'unix:/path', 'tcp://host:port' or "
        "'https://host:port', "
        "found 'http://x'",
        "LBSTACK_UPSTREAMS[1]: expected admin=ADDRESS or health_path=PATH after the address, "
        "found 'weight=2'",
        "LBSTACK_UPSTREAMS[2]: expected NAME=ADDRESS (only a unix:/dir/NAME.sock names "
        "itself), found 'tcp://127.0.0.1:1'",
        "LBSTACK_UPSTREAMS: expected each name once, found 'c' 2 times",
    ]
    config = tmp_path / "lbstack.toml"
    config.write_text("[proxy.timeouts]\nclient_keepalive = 10\n")
    assert _problems(
        LBSTACK_TIER="proxy", LBSTACK_CONFIG=str(config), LBSTACK_UPSTREAMS="a=unix:/a.sock"
    ) == [
        "proxy.timeouts.client_keepalive: expected longer than balancer.timeouts.pool_idle "
        "(15s), found 10s"
    ]
    config.write_text('[balancer]\npolicy = "fastest"\n')
    assert _problems(LBSTACK_TIER="balancer", LBSTACK_CONFIG=str(config)) == [
        f"{config}: balancer.policy: expected: input should be 'round_robin', "
        "'least_outstanding' or 'p2c_ewma'; found 'fastest'"
    ]


async def test_gunicorn_refuses_a_bad_setting_before_any_worker_starts() -> None:
    base = short_tmpdir()
    try:
        env = _env(base, LBSTACK_TIER="balancer", LBSTACK_UPSTREAMS="proxy-0=nowhere")
        process = await asyncio.create_subprocess_exec(
            str(GUNICORN),
            "-c",
            str(CONF),
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
        assert process.returncode == 2, err.decode()
        assert (
            "LBSTACK_UPSTREAMS[0].address: expected 'unix:/path', 'tcp://host:port' or "
            "'https://host:port', "
            "found 'nowhere'"
        ) in err.decode()
        assert "Booting worker" not in err.decode()
    finally:
        _rmtree(base)


def test_the_gunicorn_config_can_import_the_module_before_prometheus_client() -> None:
    """prometheus_client picks multiprocess mode at import: the arbiter must not import it
    before the config has set PROMETHEUS_MULTIPROC_DIR."""
    check = "import sys, lbstack.gunicorn; sys.exit('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], check=False, timeout=60).returncode == 0


# -- a tier under gunicorn --------------------------------------------------------------


@dataclass
class Tier:
    """A running ``gunicorn -c deploy/gunicorn/gunicorn.conf.py``."""

    process: asyncio.subprocess.Process
    socket: Path
    admin_dir: Path
    metrics_dir: Path
    log: Path

    def workers(self) -> dict[int, Address]:
        """The workers' admin sockets, by pid."""
        found = {}
        for path in self.admin_dir.glob("*.admin.sock"):
            match = ADMIN.fullmatch(path.name)
            if match and not path.is_symlink():
                found[int(match["pid"])] = Address.unix(str(path))
        return found

    async def ready_workers(self) -> dict[int, Address]:
        return {pid: a for pid, a in self.workers().items() if await probe(a, "/readyz")}

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            base_url="http://localhost", connector=aiohttp.UnixConnector(path=str(self.socket))
        )

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def _env(base: Path, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LBSTACK_", "PROMETHEUS"))}
    return {**clean, "PYTHONUNBUFFERED": "1", "LBSTACK_ADMIN_DIR": str(base / "adm"), **env}


@contextlib.asynccontextmanager
async def running_tier(
    workers: int, *, metrics_dir: bool = True, **env: str
) -> AsyncIterator[Tier]:
    """gunicorn with the deploy config and ``env``, until its workers are all ready.

    ``metrics_dir``: set PROMETHEUS_MULTIPROC_DIR (else the config's default applies).
    """
    base = short_tmpdir()
    socket, log, prom = base / "tier.sock", base / "gunicorn.log", base / "prom"
    if metrics_dir:
        env = {"PROMETHEUS_MULTIPROC_DIR": str(prom), **env}
    else:
        prom = base / "adm" / f"{env.get('LBSTACK_NAME') or env['LBSTACK_TIER']}.metrics"
    full_env = _env(base, **env)
    with log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(GUNICORN),
            "-c",
            str(CONF),
            "--bind",
            f"unix:{socket}",
            "--workers",
            str(workers),
            env=full_env,
            cwd=base,  # nothing found by accident in the current directory
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )
    tier = Tier(process, socket, base / "adm", prom, log)
    try:

        async def all_ready() -> bool:
            assert tier.process.returncode is None, tier.logs()
            return len(await tier.ready_workers()) == workers

        await until(all_ready, f"{workers} ready workers", START_TIMEOUT)
        yield tier
    finally:
        if tier.process.returncode is None:
            tier.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(tier.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                tier.process.kill()
                await tier.process.wait()
        _rmtree(base)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _proxy_sockets(stack: RunningStack) -> str:
    return " ".join(f"unix:{stack.run_dir / f'proxy-{p}.sock'}" for p in range(2))


async def _requests(tier: Tier, count: int) -> Counter[str]:
    """``count`` GETs and ``count`` POSTs (bodies checked), 8 at a time; outcomes counted."""
    seen: Counter[str] = Counter()
    gate = asyncio.Semaphore(8)

    async def one(client: aiohttp.ClientSession, i: int) -> None:
        body = f"post {i} ".encode() * 100
        async with gate:
            if i % 2:
                async with client.get(f"/get/{i}") as response:
                    echo = await response.json()
                    ok = response.status == 200 and echo["method"] == "GET"
            else:
                async with client.post(f"/post/{i}", data=body) as response:
                    echo = await response.json()
                    ok = response.status == 200 and echo["body_sha256"] == _sha256(body)
            served = response.headers.get("X-Served-By", "")
            seen["ok" if ok and served.startswith("server-") else f"bad:{response.status}"] += 1

    async with tier.session() as client:
        await asyncio.gather(*(one(client, i) for i in range(2 * count)))
    return seen


def _sha256(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


async def _requests_total(admin: Address) -> float:
    """The tier's answered requests, as one worker's /metrics reports them."""
    status, body = await fetch(admin, "/metrics")
    assert status == 200, body
    return sum(
        value for name, labels, value in parse(body.decode()) if name == "lbstack_requests_total"
    )


async def _until_total(admin: Address, total: float, *, more: bool = False) -> None:
    """Wait until the tier's answered requests, as ``admin`` reports them, are ``total``
    (or, with ``more``, above it)."""

    async def reached() -> bool:
        counted = await _requests_total(admin)
        return counted > total if more else counted == total

    await until(reached, f"{total} requests counted", 15.0)


def _metric_files(tier: Tier, pid: int) -> Iterator[str]:
    for path in tier.metrics_dir.glob(f"*_{pid}.db"):
        yield path.name


async def _during(client: aiohttp.ClientSession) -> str:
    """One GET's outcome: its status, "refused" or "failed" (no answer)."""
    try:
        async with client.get("/during") as response:
            await response.read()
            return str(response.status)
    except aiohttp.ClientConnectorError:
        return "refused"
    except aiohttp.ClientError:
        return "failed"


async def _agreed_total(workers: Iterable[Address]) -> float:
    """The tier's answered requests, once every worker reports the same figure (each adds
    the others' counts as of their last sample, at most SAMPLE_INTERVAL old)."""
    totals: list[float] = []

    async def agreed() -> bool:
        totals[:] = [await _requests_total(address) for address in workers]
        return len(set(totals)) == 1

    await until(agreed, "the workers to agree on the tier's count", 15.0)
    return totals[0]


def _children(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children()]


async def test_a_proxy_tier_serves_its_servers_and_keeps_them_on_a_bad_reload() -> None:
    async with running_stack("--proxies", "1", "--servers-per-proxy", "2") as stack:
        servers = " ".join(f"unix:{stack.run_dir / f'server-0-{s}.sock'}" for s in range(2))
        config = stack.run_dir.parent / "tier.toml"
        config.write_text("[proxy.timeouts]\nclient_keepalive = 30\n")
        async with running_tier(
            1,
            LBSTACK_TIER="proxy",
            LBSTACK_NAME="proxy-g",
            LBSTACK_UPSTREAMS=servers,
            LBSTACK_CONFIG=str(config),
            metrics_dir=False,
        ) as tier:
            assert await _requests(tier, 10) == Counter(ok=20)
            [(first, admin)] = tier.workers().items()

            # Multiprocess mode without PROMETHEUS_MULTIPROC_DIR set: the config's default
            # (written at the worker's first sample, SAMPLE_INTERVAL after its start).
            async def counted() -> bool:
                return any(tier.metrics_dir.glob(f"counter_{first}.db"))

            await until(counted, f"counters in {tier.metrics_dir}", 15.0)
            status, view = await fetch_json(admin, "/status")
            assert (status, view["name"], view["role"]) == (200, "proxy-g", "proxy")
            metrics = (await fetch(admin, "/metrics"))[1].decode()
            served = {
                labels["upstream"]
                for name, labels, value in parse(metrics)
                if name == "lbstack_upstream_requests_total" and value > 0
            }
            assert served == {"server-0-0", "server-0-1"}

            # SIGHUP with a broken config: refused, and a new worker runs the old settings.
            config.write_text("[proxy.timeouts]\nclient_keepalive = 5\n")
            tier.process.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                ready = await tier.ready_workers()
                return bool(ready) and first not in ready

            await until(reloaded, "a new worker after SIGHUP", START_TIMEOUT)
            assert tier.process.returncode is None
            assert (
                "reload refused, keeping the running settings: invalid configuration:\n"
                "  proxy.timeouts.client_keepalive: expected longer than "
                "balancer.timeouts.pool_idle (15s), found 5s"
            ) in tier.logs()
            assert await _requests(tier, 5) == Counter(ok=10)


async def test_gunicorn_refuses_to_take_a_live_socket_over() -> None:
    async with (
        running_stack() as stack,
        running_tier(1, LBSTACK_TIER="balancer", LBSTACK_UPSTREAMS=_proxy_sockets(stack)) as tier,
    ):
        base = short_tmpdir()
        try:
            process = await asyncio.create_subprocess_exec(
                str(GUNICORN),
                "-c",
                str(CONF),
                "--bind",
                f"unix:{tier.socket}",
                env=_env(base, LBSTACK_TIER="balancer", LBSTACK_UPSTREAMS=_proxy_sockets(stack)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await asyncio.wait_for(process.communicate(), START_TIMEOUT)
            assert process.returncode == 1, err.decode()
            assert f"a live server is already listening on {tier.socket}" in err.decode()
            # ... and the first one still serves on it.
            assert await _requests(tier, 2) == Counter(ok=4)
        finally:
            _rmtree(base)


# -- one balancer tier for the tests below (last here: it lives until the module ends) --


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tier() -> AsyncIterator[Tier]:
    """A balancer tier of 2 workers under gunicorn in front of a stack's proxies, for the
    tests below: they take turns on it in file order, and the last one stops it."""
    async with (
        running_stack() as stack,
        running_tier(2, LBSTACK_TIER="balancer", LBSTACK_UPSTREAMS=_proxy_sockets(stack)) as tier,
    ):
        yield tier


@pytest.mark.asyncio(loop_scope="module")
async def test_a_balancer_tier_serves_under_gunicorn_with_two_workers(tier: Tier) -> None:
    # The data socket: owner and group only (gunicorn alone would make it 0777).
    assert stat.S_IMODE(tier.socket.stat().st_mode) == 0o660
    workers = tier.workers()
    assert len(workers) == 2, workers
    assert {pid for pid in workers} == {child for child in _children(tier.process.pid)}, (
        "one admin socket per worker, named by its pid"
    )
    for address in workers.values():
        assert stat.S_IMODE(os.stat(address.path).st_mode) == 0o600
        status, view = await fetch_json(address, "/status")
        assert status == 200, view
        assert (view["name"], view["role"]) == ("balancer", "balancer")
        status, listed = await fetch_json(address, "/upstreams")
        assert status == 200, listed
        assert sorted(u["name"] for u in listed["upstreams"]) == ["proxy-0", "proxy-1"]
        assert await probe(address, "/healthz")

    before = await _agreed_total(workers.values())
    assert await _requests(tier, REQUESTS) == Counter(ok=2 * REQUESTS)
    # Each worker answers for the whole tier: the counts of both summed (another
    # worker's, as of its last sample, at most SAMPLE_INTERVAL old).
    for address in workers.values():
        await _until_total(address, before + 2 * REQUESTS)
    assert not (tier.admin_dir / "gunicorn.ctl").exists()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_killed_under_load_is_replaced_and_its_counts_stay(tier: Tier) -> None:
    """gunicorn replaces it, its live gauges leave the sums (child_exit), its counts stay
    in them, and nothing is refused meanwhile."""
    workers = tier.workers()
    assert await _requests(tier, REQUESTS // 4) == Counter(ok=2 * (REQUESTS // 4))
    sampled = await _agreed_total(workers.values())  # the victim's counts are on file
    # The tier's admin address leads to one worker; kill that one.
    alias = tier.admin_dir / "balancer.admin.sock"
    match = ADMIN.fullmatch(os.readlink(alias))
    assert match is not None
    victim = int(match["pid"])
    [survivor] = set(workers) - {victim}
    assert any(f.startswith("gauge_livesum_") for f in _metric_files(tier, victim))
    async with (
        tier.session() as client,
        Load(partial(_during, client), clients=4, bound=20_000) as load,
    ):
        await load.progress(20, "200", START_TIMEOUT)  # before the kill
        counted = await _requests_total(workers[survivor])
        os.kill(victim, signal.SIGKILL)

        async def replaced() -> bool:
            ready = await tier.ready_workers()
            return victim not in ready and len(ready) == 2

        await until(replaced, "a replacement worker", START_TIMEOUT)
        await load.progress(20, "200", START_TIMEOUT)  # after it
    seen = load.seen
    assert seen["refused"] == 0, seen
    # Only requests in flight on the killed worker may fail: at most one per client.
    assert seen["failed"] <= load.clients, seen
    assert set(seen) <= {"200", "failed"}, seen

    files = set(_metric_files(tier, victim))
    assert not any(f.startswith("gauge_live") for f in files), files
    assert any(f.startswith("counter_") for f in files), files
    assert victim not in tier.workers(), "the dead worker's admin socket is removed"
    [newcomer] = set(tier.workers()) - {survivor}
    # What the dead worker had sampled stays counted (it loses at most its last
    # SAMPLE_INTERVAL of counts, never sampled), and the survivor's samples add on.
    assert counted >= sampled
    await _until_total(tier.workers()[newcomer], counted, more=True)
    assert await _requests(tier, REQUESTS // 4) == Counter(ok=2 * (REQUESTS // 4))
    assert os.readlink(alias) != f"balancer-{victim}.admin.sock", "the alias moved on"
    assert await probe(Address.unix(str(alias)), "/readyz")
    assert "was sent SIGKILL" in tier.logs()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_graceful_stop_drains_and_removes_the_sockets(tier: Tier) -> None:
    alias = tier.admin_dir / "balancer.admin.sock"
    assert alias.is_symlink()
    tier.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(tier.process.wait(), STOP_TIMEOUT) == 0, tier.logs()
    assert list(tier.admin_dir.glob("*.admin.sock")) == []
    assert not alias.is_symlink()
    assert not tier.socket.exists()
    assert "draining" in tier.logs()
