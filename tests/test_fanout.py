"""One client request never fans out: at most two server attempts across both tiers.

A response-level retry (a 5xx) happens at the proxies only; tries that never reached
a server (connect failures, or a proxy saying none of its servers got the request)
may still go elsewhere.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from lbstack.testing import RunningStack, running_stack
from tests.harness import server_status, statuses, steady_load, until

SERVERS = [f"server-{p}-{s}" for p in range(2) for s in range(3)]


async def received(stack: RunningStack, method: str) -> int:
    """Requests of ``method`` every server of the default stack has received."""
    return sum([(await server_status(stack, s)).received.get(method, 0) for s in SERVERS])


async def test_every_server_answering_503_costs_at_most_two_attempts_per_get() -> None:
    config = "[server.simulation]\nerror_rate = 1.0\nerror_status = 503\n"
    requests = 20
    async with running_stack(config=config) as stack, stack.session() as client:
        for _ in range(requests):
            async with client.get("/all-fail") as response:
                assert response.status == 503
        gets = await received(stack, "GET")
        # Each GET was retried once at its proxy (while the retry budget lasted), and
        # never again at the balancer: today's 6 attempts per GET would fail this.
        assert requests < gets <= 2 * requests, gets
        for _ in range(10):
            async with client.post("/all-fail", data=b"once") as response:
                assert response.status == 503
        assert await received(stack, "POST") == 10  # a POST is never sent twice


async def test_a_server_dying_under_load_costs_no_get_and_no_fan_out() -> None:
    base = Path(os.environ.get("TMPDIR", "/tmp"))
    logs = base / f"lbfan-{os.getpid()}"
    logs.mkdir(exist_ok=True)
    config = (
        f'[balancer]\naccess_log = "{logs}/{{name}}.log"\n'
        f'[proxy]\naccess_log = "{logs}/{{name}}.log"\n'
        '[server.simulation]\nlatency = "20ms"\n'
    )
    try:
        async with running_stack(config=config) as stack, steady_load(stack, workers=8) as seen:
            victim = await stack.kill("server-0-1")
            await stack.wait_for("server-0-1", not_pid=victim)
            mark = sum(seen.values()) + 100

            async def more_served() -> bool:
                return sum(seen.values()) > mark

            await until(more_served, "traffic to go on after the restart")
        assert statuses(seen) == {"200"}, seen
        tries: Counter[str] = Counter()  # request id -> tries at the proxies
        balancer_tries: Counter[str] = Counter()
        for log in logs.glob("*.log"):
            for line in log.read_text().splitlines():
                entry = json.loads(line)
                into = balancer_tries if log.name.startswith("balancer") else tries
                into[entry["request_id"]] += entry["attempts"]
        assert balancer_tries and tries
        assert max(balancer_tries.values()) <= 2
        assert max(tries.values()) <= 2
    finally:
        for log in logs.glob("*"):
            log.unlink()
        logs.rmdir()
