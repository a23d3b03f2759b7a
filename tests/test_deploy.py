"""deploy/: the Prometheus config, rules and Grafana dashboard.

promtool checks the config and the rules and runs the rules' unit tests; then a real
Prometheus, configured like deploy/prometheus/prometheus.yml, scrapes a real stack
that serves some traffic (with faults, so errors, retries and ejections happen), and
every dashboard query and every recording rule must parse and return data.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import re
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from lbstack.testing import RunningStack, running_stack
from tests.harness import short_tmpdir, tool

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
CONFIGS = (PROMETHEUS_DIR / "prometheus.yml", PROMETHEUS_DIR / "prometheus-file-sd.yml")
RULES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lbstack.json"
GRAFANA_DATASOURCE = DEPLOY / "grafana" / "provisioning" / "datasources" / "lbstack.yml"
ALERTS = {
    "LbstackTargetDown",
    "LbstackChildNotReady",
    "LbstackHighErrorRatio",
    "LbstackHighLatency",
    "LbstackUpstreamEjections",
    "LbstackPanicMode",
    "LbstackRestartLoop",
    "LbstackBalancerPeerDown",
    "LbstackAutoscalerBlind",
    "LbstackCertificateExpiresSoon",
}

# Grafana's built-in variables, as Grafana would set them for a 1s scrape interval
# (4 × scrape is the least $__rate_interval can be; 15s spans the whole test traffic).
BUILTINS = {"__rate_interval": "15s", "__interval": "5s", "__range": "5m"}
REQUESTS = 400  # bounded test traffic through the balancer
CONCURRENCY = 8
PROMETHEUS_LIFETIME = 300  # seconds: `timeout` kills a Prometheus this test leaked
WAIT = 45.0  # longest wait for one condition (scrapes, rule evaluations)

# The balancer splits the traffic evenly, so proxy-1 surely tries its slow server-1-2,
# which per_try turns into timeouts (upstream errors, retries); server-0-0 answers some
# requests 500, so the 5xx ratios have something to show.
# Two balancers (their load exchange has data) and an autoscaled group whose bounds
# keep it at 3 servers (the autoscaler's series have data, the topology stays put).
STACK_CONFIG = """
balancers = 2

[balancer]
policy = "round_robin"

[autoscale]
enabled = true
min = 3
max = 3

[proxy.timeouts]
per_try = "200ms"
"""
FAULTS = {"server-1-2": {"latency": "1s"}, "server-0-0": {"error_rate": "0.3"}}


def _tool(name: str) -> str:
    """Path of a Prometheus binary (Debian package prometheus)."""
    return tool(name, package="prometheus")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROMETHEUS_DIR,
        check=False,
    )


# promtool


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_prometheus_config_is_valid(config: Path) -> None:
    result = _promtool("check", "config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout


def test_the_several_hosts_config_is_valid_and_follows_the_tiers_names() -> None:
    """deploy/prometheus/prometheus-dns-sd.yml finds the tiers by their DNS names, with
    the admin token (over TCP, the admin APIs refuse a scrape without it)."""
    text = (PROMETHEUS_DIR / "prometheus-dns-sd.yml").read_text()
    assert "dns_sd_configs:" in text and "credentials_file: /etc/lbstack/token" in text
    # promtool wants the token file to exist: check a copy that names a real one.
    with tempfile.TemporaryDirectory() as scratch:
        token = Path(scratch) / "token"
        token.write_text("0123456789abcdef\n")
        copy = Path(scratch) / "prometheus.yml"
        copy.write_text(text.replace("/etc/lbstack/token", str(token)))
        shutil.copytree(PROMETHEUS_DIR / "rules", Path(scratch) / "rules")
        result = _promtool("check", "config", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(RULES)} rule files found" in result.stdout


def test_rules_are_valid() -> None:
    assert len(RULES) == 2
    result = _promtool("check", "rules", *map(str, RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS
    result = _promtool("test", "rules", *map(str, RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_cover_every_alert() -> None:
    """Each alert has a test (its name in an alert_rule_test); the tests check both ways."""
    tested = set(re.findall(r"alertname:\s*(\w+)", "".join(p.read_text() for p in RULE_TESTS)))
    assert tested == ALERTS


def test_shipped_configs_scrape_alike() -> None:
    """Both configs differ only in how they discover the targets."""
    shipped, file_sd = (_scrape_job(p.read_text()) for p in CONFIGS)
    assert "http_sd_configs" in shipped
    assert "file_sd_configs" in file_sd
    assert _after(shipped, "relabel_configs:") == _after(file_sd, "relabel_configs:")


def _scrape_job(text: str) -> str:
    return text[text.index("scrape_configs:") :]


def _after(text: str, marker: str) -> str:
    return text[text.index(marker) :]


# The dashboard, without Prometheus


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included (a collapsed row holds its panels)."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for item in items:
            yield item
            yield from walk(item.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title and refId, expr) of every query of every panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"{panel['title']!r} {target.get('refId', '?')}", str(target.get("expr", ""))


def test_dashboard_uses_its_datasource_variable() -> None:
    text = DASHBOARD.read_text()
    assert "${DS_" not in text and "__inputs" not in text, "import placeholders"
    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        assert "gridPos" in panel, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    # The provisioned datasource is the one the variable picks by default.
    assert re.search(r"^\s+isDefault: true$", GRAFANA_DATASOURCE.read_text(), re.M)


def test_dashboard_rates_use_the_rate_interval() -> None:
    exprs = [expr for _, expr in queries(_dashboard())]
    assert len(exprs) >= 30
    for expr in exprs:
        for window in re.findall(r"\[([^\]]+)\]", expr):
            assert window in ("$__rate_interval", "$__range"), expr


# A real Prometheus scraping a real stack


@dataclass
class Prometheus:
    """The HTTP API of a running Prometheus."""

    url: str
    http: aiohttp.ClientSession

    async def api(self, path: str, **params: str) -> dict[str, Any]:
        async with self.http.get(f"{self.url}/api/v1/{path}", params=params) as response:
            body = await response.json(content_type=None)
        return dict(body)

    async def query(self, expr: str) -> dict[str, Any]:
        return await self.api("query", query=expr)

    async def value(self, expr: str) -> float | None:
        """The value of a single-sample query, None while it has none."""
        result = (await self.query(expr)).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if len(result) == 1 else None


@dataclass
class Scraped:
    """The stack and the Prometheus scraping it."""

    stack: RunningStack
    prometheus: Prometheus
    targets: set[str]


async def eventually(
    check: Callable[[], Awaitable[list[str]]], what: str, timeout: float = WAIT
) -> None:
    """Poll ``check`` (its problems) until it has none; fail with the last ones."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while problems := await check():
        if loop.time() > deadline:
            raise AssertionError(f"{what} within {timeout}s:\n  " + "\n  ".join(problems))
        await asyncio.sleep(0.25)  # wait-ok: polling with a deadline


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_config(metrics: str) -> str:
    """The shipped prometheus.yml, aimed at the stack's metrics endpoint, scraping every 1s."""
    text = CONFIGS[0].read_text()
    for old, new in (
        ("http://127.0.0.1:9464/targets", f"http://{metrics}/targets"),
        ("scrape_interval: 5s", "scrape_interval: 1s"),
        ("evaluation_interval: 5s", "evaluation_interval: 1s"),
        ("- rules/*.yml", f"- {PROMETHEUS_DIR}/rules/*.yml"),
    ):
        assert text.count(old) == 1, f"prometheus.yml no longer has {old!r}: update this test"
        text = text.replace(old, new)
    return text


@contextlib.asynccontextmanager
async def running_prometheus(config: Path, workdir: Path) -> AsyncIterator[str]:
    """Run Prometheus on a free loopback port until the block ends; yield its URL."""
    port = _free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            "timeout",
            str(PROMETHEUS_LIFETIME),
            _tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:

            async def ready() -> list[str]:
                if process.returncode is not None:
                    raise AssertionError(f"prometheus exited:\n{log.read_text()}")
                try:
                    async with http.get(f"{url}/-/ready") as response:
                        return [] if response.status == 200 else [f"/-/ready: {response.status}"]
                except aiohttp.ClientError as exc:
                    return [f"/-/ready: {exc!r}"]

            await eventually(ready, "prometheus not ready")
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


async def inject_fault(stack: RunningStack, server: str, changes: dict[str, str]) -> None:
    """Change a simulated server's behaviour through its admin socket (lbstack fault)."""
    await stack.admin(server).fault(changes)


async def drive_traffic(stack: RunningStack) -> Counter[int]:
    """Send REQUESTS requests through the balancer; count the statuses."""
    statuses: Counter[int] = Counter()
    pending = iter(range(REQUESTS))

    async def worker(client: aiohttp.ClientSession) -> None:
        for i in pending:
            async with client.get(f"/deploy/{i}") as response:
                await response.read()
                statuses[response.status] += 1

    async with stack.session(timeout=aiohttp.ClientTimeout(total=10)) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return statuses


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def scraped() -> AsyncIterator[Scraped]:
    """A stack with faults, scraped by Prometheus every 1s, after bounded traffic."""
    _tool("prometheus")
    workdir = short_tmpdir()
    try:
        async with running_stack(config=STACK_CONFIG) as stack:
            banner = re.search(r"metrics:\s+http://(\S+)/metrics", stack.banner)
            assert banner, stack.banner
            metrics = banner.group(1)
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{metrics}/targets") as response:
                    groups = await response.json()
                targets = {g["labels"]["lbstack_target"] for g in groups}
                on_file = json.loads((stack.run_dir / "targets.json").read_text())
                assert {g["labels"]["lbstack_target"] for g in on_file} == targets
                config = workdir / "prometheus.yml"
                config.write_text(scrape_config(metrics))
                async with running_prometheus(config, workdir) as url:
                    prometheus = Prometheus(url, http)
                    await eventually(
                        lambda: _targets_up(prometheus, targets), "targets not all scraped"
                    )
                    for server, changes in FAULTS.items():
                        await inject_fault(stack, server, changes)
                    statuses = await drive_traffic(stack)
                    assert statuses[200] > REQUESTS // 2, statuses
                    await eventually(lambda: _answered(prometheus, REQUESTS), "traffic not scraped")
                    yield Scraped(stack, prometheus, targets)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


async def _targets_up(prometheus: Prometheus, targets: set[str]) -> list[str]:
    result = (await prometheus.query('up{job="lbstack"} == 1'))["data"]["result"]
    up = {r["metric"]["instance"] for r in result}
    return [] if up == targets else [f"up: {sorted(up)}, targets: {sorted(targets)}"]


async def _answered(prometheus: Prometheus, count: int) -> list[str]:
    value = await prometheus.value('sum(lbstack_requests_total{role="balancer"})')
    return [] if value is not None and value >= count else [f"balancer answered {value}"]


async def query_problems(prometheus: Prometheus, what: str, expr: str) -> list[str]:
    """Why ``expr`` fails to parse or returns no data (none if it does)."""
    if "$" in expr:
        return [f"{what}: unresolved variable in {expr}"]
    body = await prometheus.query(expr)
    if body.get("status") != "success":
        return [f"{what}: {body.get('errorType')}: {body.get('error')} in {expr}"]
    if not body["data"]["result"]:
        return [f"{what}: no data for {expr}"]
    return []


async def variable_values(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """A value for each template variable, as Grafana would pick it, and the built-ins."""
    values = dict(BUILTINS)
    for variable in dashboard["templating"]["list"]:
        name, kind = variable["name"], variable["type"]
        if kind == "datasource":
            values[name] = "lbstack-prometheus"
            continue
        assert kind == "query", f"variable {name}: type {kind} not handled by this test"
        query = variable["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
        assert match, f"variable {name}: {query!r} not handled by this test"
        selector, label = match.groups()
        found = await prometheus.api(f"label/{label}/values", **{"match[]": selector})
        values[name] = found["data"][0] if found.get("data") else f"${name}"
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace $name and ${name} (longest names first, so $__range stays whole)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


async def dashboard_problems(prometheus: Prometheus, dashboard: dict[str, Any]) -> list[str]:
    """Every dashboard query that fails to parse or returns no data."""
    values = await variable_values(prometheus, dashboard)
    found = await asyncio.gather(
        *(
            query_problems(prometheus, f"panel {what}", substitute(expr, values))
            for what, expr in queries(dashboard)
        )
    )
    return [problem for problems in found for problem in problems]


async def _rules(prometheus: Prometheus) -> list[dict[str, Any]]:
    groups = (await prometheus.api("rules"))["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]


async def recording_rule_problems(prometheus: Prometheus) -> list[str]:
    """Rules not yet evaluated or failing, and recording rules whose query has no data."""
    problems = []
    for rule in await _rules(prometheus):
        if rule["health"] != "ok":
            problems.append(f"rule {rule['name']}: {rule['health']} {rule.get('lastError', '')}")
        elif rule["type"] == "recording":
            problems += await query_problems(prometheus, f"rule {rule['name']}", rule["query"])
    return problems


@pytest.mark.asyncio(loop_scope="module")
async def test_every_dashboard_query_returns_data(scraped: Scraped) -> None:
    dashboard = _dashboard()
    assert len(list(queries(dashboard))) >= 30
    await eventually(
        lambda: dashboard_problems(scraped.prometheus, dashboard), "dashboard queries failing"
    )


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("lbstack_upstream_cost", "lbstack_upstream_cots", "no data"),
        (
            "lbstack_process_resident_memory_bytes{",
            "lbstack_process_resident_memory_bytes{{",
            "bad_data",
        ),
        ("lbstack_group_servers{", 'lbstack_group_servers{group="$group", ', "unresolved"),
    ],
    ids=["misspelt metric", "syntax error", "unknown variable"],
)
@pytest.mark.asyncio(loop_scope="module")
async def test_a_broken_panel_is_caught(scraped: Scraped, old: str, new: str, problem: str) -> None:
    """The check fails on a broken copy of the dashboard, naming the broken panel."""
    dashboard = copy.deepcopy(_dashboard())
    broken = []
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if old in target.get("expr", ""):
                target["expr"] = target["expr"].replace(old, new)
                broken.append(panel["title"])
    assert len(broken) == 1, broken
    problems = await dashboard_problems(scraped.prometheus, dashboard)
    assert len(problems) == 1, problems
    assert repr(broken[0]) in problems[0] and problem in problems[0], problems


@pytest.mark.asyncio(loop_scope="module")
async def test_every_rule_evaluates_and_recording_rules_return_data(scraped: Scraped) -> None:
    rules = await _rules(scraped.prometheus)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == ALERTS
    assert len([r for r in rules if r["type"] == "recording"]) >= 5
    await eventually(
        lambda: recording_rule_problems(scraped.prometheus), "rules failing or without data"
    )


@pytest.mark.asyncio(loop_scope="module")
async def test_every_component_is_scraped_under_its_own_name(scraped: Scraped) -> None:
    """honor_labels keeps each series' own role and instance; instance names the target."""
    prometheus = scraped.prometheus
    result = (await prometheus.query('lbstack_process_resident_memory_bytes{job="lbstack"}'))[
        "data"
    ]["result"]
    assert {r["metric"]["instance"] for r in result} == scraped.targets
    for r in result:
        assert "lbstack_target" not in r["metric"]
        assert "exported_instance" not in r["metric"]
        name = r["metric"]["instance"]
        assert r["metric"]["role"] == ("supervisor" if name == "supervisor" else name.split("-")[0])
