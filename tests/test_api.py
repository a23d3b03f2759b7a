"""The control and admin APIs' models (``lbstack.api``) and their clients
(``lbstack.client``), against in-process apps on unix sockets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import BaseModel

from lbstack.address import Address
from lbstack.api import (
    DrainRequest,
    FaultState,
    LoadReport,
    ReloadRequest,
    Request,
    RestartRequest,
    RouterStatus,
    ScaleRequest,
    ServerStatus,
    StackStatus,
    UpgradeRequest,
    UpstreamSpec,
)
from lbstack.client import AdminClient, ControlClient
from lbstack.errors import (
    APIConnectionError,
    APIStatusError,
    ControlError,
    InvalidRequest,
)
from tests.harness import serving

# Answers of a real stack (`lbstack up --balancers 2` with one autoscaled group of one
# server), as the servers sent them.
STATUS = {
    "run_dir": "/tmp/lb/run",
    "balancer": ["unix:/tmp/lb/run/balancer.sock"],
    "metrics": "tcp://127.0.0.1:44721",
    "components": [
        {
            "name": "supervisor",
            "role": "supervisor",
            "group": None,
            "pid": 27289,
            "state": "ready",
            "restarts": 0,
            "listen": ["unix:/tmp/lb/run/control.sock"],
            "admin": "unix:/tmp/lb/run/control.sock",
            "started_at": 1796427004.8098245,
            "last_exit": None,
            "upgrades": 0,
        },
        {
            "name": "server-0-0",
            "role": "server",
            "group": "proxy-0",
            "pid": 27291,
            "state": "ready",
            "restarts": 0,
            "listen": ["unix:/tmp/lb/run/server-0-0.sock"],
            "admin": "unix:/tmp/lb/run/server-0-0.admin.sock",
            "started_at": 1796427004.8170319,
            "last_exit": None,
        },
        {
            "name": "proxy-0",
            "role": "proxy",
            "group": "proxy-0",
            "pid": 27297,
            "state": "draining",
            "restarts": 1,
            "listen": ["unix:/tmp/lb/run/proxy-0.sock"],
            "admin": "unix:/tmp/lb/run/proxy-0.admin.sock",
            "started_at": 1796427005.4065945,
            "last_exit": "killed by SIGKILL",
        },
    ],
    "autoscale": {
        "proxy-0": {
            "signal": "in_flight",
            "target": 4.0,
            "tolerance": 0.1,
            "min": 1,
            "max": 2,
            "evaluations": 1,
            "problem": None,
            "current": 1,
            "observed": 0.0,
            "recommendation": 1,
            "desired": 1,
            "reason": "load below target, floored at min 1",
        }
    },
}
UPSTREAM = {
    "name": "proxy-0",
    "address": "unix:/tmp/lb/run/proxy-0.sock",
    "admin": "unix:/tmp/lb/run/proxy-0.admin.sock",
    "weight": 1.0,
    "effective_weight": 1.0,
    "in_flight": 0,
    "requests": 0,
    "errors": 0,
    "cost": 0.01,
    "latency_ewma": 0.0,
    "reported": {"in_flight": 0.0, "latency": 0.0, "health": 1.0, "age": 0.26},
    "healthy": True,
    "available": True,
    "draining": False,
    "ejected_for_seconds": 0.0,
    "ejections": 0,
    "consecutive_failures": 0,
    "slow_start_remaining_seconds": 0.0,
    "checks_skipped": 0,
    "peer_in_flight": 0.0,
}
BALANCER = {
    "name": "balancer-0",
    "role": "balancer",
    "state": "ready",
    "in_flight": 0,
    "queued": 0,
    "policy": "p2c_ewma",
    "panic": False,
    "retry_budget": 100.0,
    "tunnels": {"open": 0, "max": 1024},
    "upstreams": [UPSTREAM],
    "peers": [
        {
            "name": "balancer-1",
            "address": "unix:/tmp/lb/run/balancer-1.admin.sock",
            "up": True,
            "age": 0.021,
            "weight": 1.0,
            "errors": 0,
            "last_error": None,
            "pid": 27307,
            "seq": 2,
            "in_flight": 0.0,
            "upstreams": {
                "proxy-0": {"in_flight": 0.0, "requests": 0, "latency": 0.0, "available": True}
            },
        }
    ],
}
SIMULATION = {
    "latency": 0.0,
    "latency_distribution": "fixed",
    "latency_sigma": 0.5,
    "cpu": 0.0,
    "response_size": 0,
    "error_rate": 0.0,
    "error_status": 500,
}
SERVER = {
    "name": "server-0-0",
    "role": "server",
    "state": "ready",
    "in_flight": 0,
    "requests": 3,
    "received": {"GET": 3},
    "held": 0,
    "simulation": SIMULATION,
}
LOAD = {
    "name": "proxy-0",
    "role": "proxy",
    "pid": 27297,
    "seq": 1,
    "time": 1796427006.732,
    "interval": 0.0,
    "in_flight": 0,
    "upstreams": [
        {
            "name": "server-0-0",
            "in_flight": 0,
            "requests": 0,
            "errors": 0,
            "latency_ewma": 0.0,
            "latency_age": None,
            "available": True,
            "healthy": True,
            "ejected": False,
            "draining": False,
        }
    ],
}


# ---- the models ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "answer"),
    [(StackStatus, STATUS), (RouterStatus, BALANCER), (ServerStatus, SERVER), (LoadReport, LOAD)],
)
def test_an_answer_reads_and_writes_back_to_the_same_json(
    model: type[StackStatus | RouterStatus | ServerStatus | LoadReport], answer: dict[str, Any]
) -> None:
    read = model.model_validate_json(json.dumps(answer))
    # Exactly, key order included: `lbstack status --json` prints it (a contract).
    assert json.dumps(read.to_json()) == json.dumps(answer)


def test_the_status_is_typed() -> None:
    status = StackStatus.model_validate(STATUS)
    proxy = status.component("proxy-0")
    assert (proxy.role, proxy.state, proxy.restarts) == ("proxy", "draining", 1)
    assert proxy.admin == Address.unix("/tmp/lb/run/proxy-0.admin.sock")
    assert status.component("supervisor").upgrades == 0
    assert status.names("server") == ["server-0-0"]
    assert status.autoscale["proxy-0"].reason == "load below target, floored at min 1"
    with pytest.raises(KeyError, match="known: supervisor, server-0-0, proxy-0"):
        status.component("proxy-9")


def test_fields_an_answer_does_not_declare_are_kept() -> None:
    read = ServerStatus.model_validate({**SERVER, "added_later": [1]})
    assert read.to_json() == {**SERVER, "added_later": [1]}


def test_an_older_supervisors_status_still_reads() -> None:
    """What a supervisor from before ``upgrades`` (and the listeners, autoscaling ...)
    sent: ``lbstack upgrade`` has to read it to say it cannot upgrade it."""
    old = {"components": [{"name": "supervisor", "role": "supervisor", "pid": 1}]}
    status = StackStatus.model_validate(old)
    assert status.component("supervisor").upgrades == 0
    assert status.to_json() == old


@pytest.mark.parametrize(
    ("model", "body", "problems"),
    [
        (
            ScaleRequest,
            b'{"group": "proxy-0", "servers": "3"}',
            ['servers: expected an integer, found "3"'],
        ),
        (
            ScaleRequest,
            b'{"group": 0, "servers": true}',
            [
                "group: expected a string, found 0",
                "servers: expected an integer, found true",
            ],
        ),
        (
            ScaleRequest,
            b'{"servers": 2.0}',
            [
                "group: expected a value (required), found nothing",
                "servers: expected an integer, found 2.0",
            ],
        ),
        (
            DrainRequest,
            b'{"name": "server-0-0", "force": 1}',
            ["force: expected true or false, found 1"],
        ),
        (
            ReloadRequest,
            b'{"dryrun": true}',
            ["dryrun: expected one of the fields dry_run, found an unknown field"],
        ),
        (UpgradeRequest, b'{"now": true}', ["now: expected no fields, found an unknown field"]),
        (RestartRequest, b'{"names": ["proxy-0", 2]}', ["names[1]: expected a string, found 2"]),
        (RestartRequest, b'{"names": "proxy-0"}', ['names: expected a list, found "proxy-0"']),
        (RestartRequest, b"[]", ["(body): expected a JSON object, found a list"]),
    ],
)
def test_a_request_is_strict_and_says_what_is_wrong(
    model: type[Request], body: bytes, problems: list[str]
) -> None:
    with pytest.raises(InvalidRequest) as refused:
        model.parse(body)
    assert refused.value.problems == problems
    assert str(refused.value) == "\n".join(problems)


def test_a_body_that_is_not_json_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        ReloadRequest.parse(b"dry_run=1")
    [line] = refused.value.problems
    assert line.startswith("(body): expected a JSON object, found invalid JSON ("), line


def test_a_valid_request_parses() -> None:
    assert ScaleRequest.parse(b'{"group": "proxy-0", "servers": 3}') == ScaleRequest(
        group="proxy-0", servers=3
    )
    assert DrainRequest.parse(b'{"name": "proxy-1"}').force is False
    assert ReloadRequest.parse(b"") == ReloadRequest(dry_run=False)  # no body: the defaults
    assert UpgradeRequest.parse(b"{}") == UpgradeRequest()


# ---- the clients -----------------------------------------------------------------------


class Recorded(BaseModel):
    """What a fake server received."""

    requests: list[tuple[str, str, Any]] = []


def control_app(seen: Recorded, status: Any = STATUS) -> web.Application:
    """A control API that answers like the supervisor's, validating with lbstack.api."""

    async def record(request: web.Request) -> bytes:
        body = await request.read()
        seen.requests.append((request.method, request.path, json.loads(body) if body else None))
        return body

    async def get_status(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response(status)

    async def scale(request: web.Request) -> web.Response:
        try:
            asked = ScaleRequest.parse(await record(request))
        except InvalidRequest as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from exc
        servers = [f"server-0-{i}" for i in range(asked.servers)]
        return web.json_response({"group": asked.group, "servers": servers})

    async def drain(request: web.Request) -> web.Response:
        DrainRequest.parse(await record(request))
        return web.json_response({"error": "would leave proxy-0 nothing"}, status=409)

    async def reload(request: web.Request) -> web.Response:
        ReloadRequest.parse(await record(request))
        return web.json_response(
            {"error": "invalid configuration", "problems": ["proxy.policy: expected ..."]},
            status=422,
        )

    async def readyz(request: web.Request) -> web.Response:
        return web.json_response({"status": "not ready"}, status=503)

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_post("/scale", scale)
    app.router.add_post("/drain", drain)
    app.router.add_post("/reload", reload)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    return app


@pytest.fixture
async def control(sockdir: Path) -> AsyncIterator[tuple[ControlClient, Recorded]]:
    """A client of a fake supervisor's control socket, in the run dir ``sockdir``."""
    seen = Recorded()
    async with serving(control_app(seen), sockdir / "control.sock"):
        yield ControlClient(sockdir), seen


async def test_the_control_client_reads_the_status(
    control: tuple[ControlClient, Recorded],
) -> None:
    client, _ = control
    assert await client.status() == StackStatus.model_validate(STATUS)


async def test_the_control_client_sends_typed_requests(
    control: tuple[ControlClient, Recorded],
) -> None:
    client, seen = control
    answer = await client.scale("proxy-0", 2)
    assert (answer.group, answer.servers) == ("proxy-0", ["server-0-0", "server-0-1"])
    assert seen.requests == [("POST", "/scale", {"group": "proxy-0", "servers": 2})]


async def test_an_error_answer_is_an_api_status_error(
    control: tuple[ControlClient, Recorded],
) -> None:
    client, seen = control
    with pytest.raises(APIStatusError) as refused:  # a 409 with the supervisor's reason
        await client.drain("server-0-0", force=True)
    assert (refused.value.status, refused.value.message) == (409, "would leave proxy-0 nothing")
    assert seen.requests[-1] == ("POST", "/drain", {"name": "server-0-0", "force": True})

    with pytest.raises(APIStatusError) as invalid:  # a 422 lists the config's problems
        await client.reload(dry_run=True)
    assert invalid.value.status == 422
    assert invalid.value.problems == ["proxy.policy: expected ..."]

    with pytest.raises(APIStatusError) as bad:  # a 400 in text, one line per field
        await client.request("POST", "/scale", {"group": "proxy-0", "servers": True})
    assert (bad.value.status, bad.value.message) == (
        400,
        "servers: expected an integer, found true",
    )

    with pytest.raises(APIStatusError) as missing:  # a route it does not have
        await client.upgrade()
    assert missing.value.status == 404
    assert isinstance(missing.value, ControlError)


async def test_the_probes_say_true_or_false(control: tuple[ControlClient, Recorded]) -> None:
    client, _ = control
    assert await client.alive() is True
    assert await client.ready() is False  # 503 is an answer, not an error


async def test_nothing_answering_is_an_api_connection_error(sockdir: Path) -> None:
    client = ControlClient(sockdir)  # no control.sock there
    with pytest.raises(APIConnectionError) as unreachable:
        await client.status()
    assert isinstance(unreachable.value.__cause__, OSError)
    assert str(sockdir / "control.sock") in str(unreachable.value)


async def test_an_answer_of_the_wrong_shape_is_a_control_error(sockdir: Path) -> None:
    async with serving(control_app(Recorded(), status={"components": "none"}), sockdir / "c"):
        client = ControlClient(Address.unix(str(sockdir / "c")))
        with pytest.raises(ControlError, match="components") as wrong:
            await client.status()
    assert not isinstance(wrong.value, APIStatusError | APIConnectionError)


def admin_app(seen: Recorded, status: dict[str, Any]) -> web.Application:
    """A child's admin API: ``status`` on /status, a router's and a server's routes."""

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        seen.requests.append((request.method, request.path, json.loads(body) if body else None))
        if request.path == "/status":
            return web.json_response(status)
        if request.path == "/fault":
            return web.json_response(
                {"simulation": SIMULATION, "configured": SIMULATION, "hanging": True, "held": 0}
            )
        if request.path == "/upstreams" and request.method == "GET":
            return web.json_response({"upstreams": [UPSTREAM]})
        return web.json_response(UPSTREAM, status=201)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def test_the_admin_client_reads_each_role(sockdir: Path) -> None:
    seen = Recorded()
    async with (
        serving(admin_app(seen, BALANCER), sockdir / "b.sock") as balancer,
        serving(admin_app(seen, SERVER), sockdir / "s.sock") as server,
    ):
        router_view = await AdminClient(balancer).status()
        server_view = await AdminClient(server).status()
    assert isinstance(router_view, RouterStatus)
    assert router_view.peers[0].upstreams["proxy-0"].available is True
    assert isinstance(server_view, ServerStatus)
    assert server_view.received == {"GET": 3}


async def test_the_admin_client_changes_upstreams_and_faults(sockdir: Path) -> None:
    seen = Recorded()
    async with serving(admin_app(seen, SERVER), sockdir / "a.sock") as address:
        admin = AdminClient(address)
        state = await admin.fault({"hang": True, "latency": "50ms"})
        assert state == FaultState.model_validate(
            {"simulation": SIMULATION, "configured": SIMULATION, "hanging": True, "held": 0}
        )
        spec = UpstreamSpec.model_validate({"name": "server-0-3", "address": "unix:/tmp/s.sock"})
        added = await admin.add_upstream(spec)
        assert added.name == "proxy-0"  # what the fake answers
        assert [u.name for u in await admin.upstreams()] == ["proxy-0"]
        await admin.drain_upstream("server-0-3")
        await admin.remove_upstream("server-0-3")
    assert seen.requests == [
        ("POST", "/fault", {"hang": True, "latency": "50ms"}),
        (
            "POST",
            "/upstreams",
            {
                "name": "server-0-3",
                "address": "unix:/tmp/s.sock",
                "admin": None,
                "health_path": "/healthz",
                "draining": False,
            },
        ),
        ("GET", "/upstreams", None),
        ("POST", "/upstreams/server-0-3/drain", None),
        ("DELETE", "/upstreams/server-0-3", None),
    ]
