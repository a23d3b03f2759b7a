"""HTTP clients to an ``Address`` (unix, tcp or https): pools, sessions, one-off requests,
and the typed clients of the control and admin APIs.

Every client in the stack (forwarding pools, health checks, scrapes, the supervisor's
probes, the CLI) connects through ``connector`` here, so there is one place that knows
how a unix or tcp address becomes an aiohttp connector.

``ControlClient`` talks to the supervisor's control socket, ``AdminClient`` to one
child's admin socket; both send and return the models of ``lbstack.api``::

    control = ControlClient(run_dir)
    status = await control.status()
    await control.scale("proxy-0", 4)
    view = await AdminClient(status.component("proxy-0").admin).upstreams()

Errors (``lbstack.errors``): ``APIConnectionError`` when nothing answers,
``APIStatusError`` (``status``, ``message``, ``problems``) for an error answer, and
``ControlError`` for a 2xx answer that is not what the API promises.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from ssl import SSLContext
from typing import Any, Final, TypeVar

import aiohttp
from pydantic import BaseModel, TypeAdapter, ValidationError

from lbstack.address import Address
from lbstack.admin import bearer
from lbstack.api import (
    ChildStatus,
    DrainRequest,
    DrainResult,
    FaultState,
    LoadReport,
    ReloadRequest,
    ReloadResult,
    RestartRequest,
    RestartResult,
    RouterStatus,
    ScaleRequest,
    ScaleResult,
    ServerStatus,
    StackStatus,
    UndrainRequest,
    UpgradeRequest,
    UpgradeStarted,
    UpstreamList,
    UpstreamSpec,
    UpstreamView,
)
from lbstack.errors import APIConnectionError, APIStatusError, ControlError
from lbstack.rundir import RunDir

T = TypeVar("T")
TIMEOUT: Final = 5.0
# A change (scale, reload, rolling restart) is answered once it is done; on a big stack
# that takes a while.
CHANGE_TIMEOUT: Final = 900.0


def connector(
    address: Address, *, ssl: SSLContext | None = None, **options: Any
) -> aiohttp.BaseConnector:
    """A connection pool to ``address``; ``options`` go to aiohttp's connector.

    ``ssl``: the client context for an ``https://`` address (default: aiohttp's,
    verifying against the system's trust store).
    """
    if address.is_unix:
        return aiohttp.UnixConnector(path=address.path, **options)
    return aiohttp.TCPConnector(ssl=True if ssl is None else ssl, **options)


def session(
    address: Address, timeout: float | None, *, ssl: SSLContext | None = None, **options: Any
) -> aiohttp.ClientSession:
    """A client session to ``address`` (requests take paths), no cookies, no proxies."""
    return aiohttp.ClientSession(
        base_url=address.http_base,
        connector=connector(address, ssl=ssl, **options),
        timeout=aiohttp.ClientTimeout(total=timeout),
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
    )


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it; re-raise if *we* are being cancelled."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise


async def fetch(
    address: Address,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 5.0,
    headers: Mapping[str, str] | None = None,
) -> tuple[int, bytes]:
    """One request; returns (status, body). Raises aiohttp.ClientError or TimeoutError."""
    async with (
        session(address, timeout) as client,
        client.request(method, path, json=body, headers=headers) as response,
    ):
        return response.status, await response.read()


async def fetch_json(
    address: Address,
    path: str,
    *,
    method: str = "GET",
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    status, raw = await fetch(address, path, method=method, body=body, timeout=timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, {"error": raw.decode(errors="replace")}


async def probe(address: Address, path: str, timeout: float = 1.0) -> bool:
    """Whether ``path`` answers 2xx within ``timeout`` (any failure is just False)."""
    async with session(address, timeout) as client:
        return await answers(client, path)


async def answers(client: aiohttp.ClientSession, path: str) -> bool:
    """Whether ``path`` answers 2xx through ``client`` (any failure is just False)."""
    try:
        async with client.get(path) as response:
            return 200 <= response.status < 300
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


# ---- the typed clients of the control and admin APIs ---------------------------------


class APIClient:
    """A client of one JSON API on ``address``: the layer the typed methods sit on.

    Each call opens a connection and closes it (no pool, no ``async with``): the
    processes behind these sockets restart, get replaced and re-execute by design, and a
    pooled keep-alive connection would meet the race of an idle connection the other
    side just closed (a POST then fails); a connection over a unix socket costs micro-
    seconds, and these APIs see a few requests a second at most. So a client is a plain
    value: make one wherever it is needed, share it, never close it.
    """

    def __init__(
        self, address: Address, *, timeout: float = TIMEOUT, token: str | None = None
    ) -> None:
        """``token``: the stack's admin token, sent to an API reached over TCP."""
        self.address = address
        self.timeout = timeout
        self._headers = {} if address.is_unix else bearer(token)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.address)!r})"

    async def request(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any:
        """One request with a JSON ``body``; the 2xx answer's JSON. For routes without a
        typed method."""
        where = f"{method} {path} on {self.address}"
        raw = await self._send(method, path, body, timeout)
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ControlError(f"{where}: expected JSON, found {raw[:200]!r}") from exc

    async def _send(
        self, method: str, path: str, body: Any = None, timeout: float | None = None
    ) -> bytes:
        """The body of a 2xx answer; the errors of the API raised."""
        where = f"{method} {path} on {self.address}"
        try:
            status, raw = await fetch(
                self.address,
                path,
                method=method,
                body=body,
                timeout=timeout or self.timeout,
                headers=self._headers,
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise APIConnectionError(f"{where}: no answer ({exc!r})") from exc
        if not 200 <= status < 300:
            raise _status_error(where, status, raw)
        return raw

    async def _call(
        self,
        read: Callable[[Any], T],
        method: str,
        path: str,
        body: BaseModel | Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> T:
        """One request; its answer ``read`` into a model (``Model.model_validate``)."""
        if isinstance(body, BaseModel):
            body = body.model_dump(mode="json")
        answer = await self.request(method, path, body, timeout=timeout)
        try:
            return read(answer)
        except ValidationError as exc:
            raise ControlError(f"{method} {path} on {self.address}: {exc}") from exc

    async def metrics(self) -> str:
        """``GET /metrics``: the Prometheus text."""
        return (await self._send("GET", "/metrics")).decode()

    async def alive(self) -> bool:
        """``GET /healthz``: True on 2xx, False on 503; ``APIConnectionError`` when
        nothing answers."""
        return await self._probe("/healthz")

    async def ready(self) -> bool:
        """``GET /readyz``: True on 2xx, False on 503 (starting, draining, hanging ...)."""
        return await self._probe("/readyz")

    async def _probe(self, path: str) -> bool:
        try:
            await self._send("GET", path)
        except APIStatusError as exc:
            if exc.status == 503:
                return False
            raise
        return True


class ControlClient(APIClient):
    """The supervisor's control API, on ``<run dir>/control.sock`` (or an address).

    Reads time out after ``timeout`` seconds; a change (scale, drain, reload, restart)
    is answered once done, so it gets ``change_timeout``.
    """

    def __init__(
        self,
        target: Address | str | os.PathLike[str],
        *,
        timeout: float = TIMEOUT,
        change_timeout: float = CHANGE_TIMEOUT,
    ) -> None:
        """``target``: the stack's run dir, or its control socket's address."""
        address = target if isinstance(target, Address) else RunDir(Path(target)).control
        super().__init__(address, timeout=timeout)
        self.change_timeout = change_timeout

    async def status(self) -> StackStatus:
        """``GET /status``: every component, the listeners, the autoscaler's view."""
        return await self._call(StackStatus.model_validate, "GET", "/status")

    async def scale(self, group: str, servers: int) -> ScaleResult:
        """Grow or shrink ``group`` (``proxy-0``) to ``servers`` servers, now."""
        request = ScaleRequest(group=group, servers=servers)
        return await self._change(ScaleResult.model_validate, "/scale", request)

    async def drain(self, name: str, *, force: bool = False) -> DrainResult:
        """No new requests to the server or proxy ``name``; those in flight finish."""
        return await self._change(
            DrainResult.model_validate, "/drain", DrainRequest(name=name, force=force)
        )

    async def undrain(self, name: str) -> DrainResult:
        """``name`` takes requests again (ramping in with slow start)."""
        return await self._change(DrainResult.model_validate, "/undrain", UndrainRequest(name=name))

    async def reload(self, *, dry_run: bool = False) -> ReloadResult:
        """Re-read the config and replace what changed; ``APIStatusError`` 422 with the
        config's ``problems`` when it is invalid, 409 when the change is refused."""
        return await self._change(
            ReloadResult.model_validate, "/reload", ReloadRequest(dry_run=dry_run)
        )

    async def restart(self, names: Sequence[str] = ()) -> RestartResult:
        """Replace ``names`` (every child when empty) one at a time, new before old."""
        return await self._change(
            RestartResult.model_validate, "/restart", RestartRequest(names=list(names))
        )

    async def upgrade(self) -> UpgradeStarted:
        """Have the supervisor re-execute itself (its answer comes just before); it
        answers again once the new image runs. 404 from a supervisor that predates it."""
        return await self._call(UpgradeStarted.model_validate, "POST", "/upgrade", UpgradeRequest())

    async def _change(self, read: Callable[[Any], T], path: str, request: BaseModel) -> T:
        return await self._call(read, "POST", path, request, timeout=self.change_timeout)


_CHILD_STATUS: Final = TypeAdapter[RouterStatus | ServerStatus](ChildStatus)


class AdminClient(APIClient):
    """One child's admin API, on its admin socket (``<run dir>/<name>.admin.sock``).

    Every child: ``status``, ``metrics``, ``alive``, ``ready``. Routers (balancers,
    proxies): the upstream methods and ``load``. Simulated servers: ``fault``. A route
    the child does not have is an ``APIStatusError`` 404.
    """

    async def status(self) -> RouterStatus | ServerStatus:
        """``GET /status``: a router's routing view, or a simulated server's state."""
        return await self._call(_CHILD_STATUS.validate_python, "GET", "/status")

    async def upstreams(self) -> list[UpstreamView]:
        """``GET /upstreams``: the router's upstreams."""
        return (await self._call(UpstreamList.model_validate, "GET", "/upstreams")).upstreams

    async def upstream(self, name: str) -> UpstreamView:
        """``GET /upstreams/{name}``: one upstream (404 when unknown)."""
        return await self._call(UpstreamView.model_validate, "GET", f"/upstreams/{name}")

    async def add_upstream(self, spec: UpstreamSpec) -> UpstreamView:
        """``POST /upstreams``: a new upstream, in slow start (409 if the name exists)."""
        return await self._call(UpstreamView.model_validate, "POST", "/upstreams", spec)

    async def drain_upstream(self, name: str) -> UpstreamView:
        """No new requests to the upstream ``name``; those in flight finish."""
        return await self._call(UpstreamView.model_validate, "POST", f"/upstreams/{name}/drain")

    async def undrain_upstream(self, name: str) -> UpstreamView:
        """The upstream ``name`` takes requests again, with slow start."""
        return await self._call(UpstreamView.model_validate, "POST", f"/upstreams/{name}/undrain")

    async def recycle_upstream(self, name: str) -> UpstreamView:
        """Close the router's pooled connections to ``name`` (it was replaced)."""
        return await self._call(UpstreamView.model_validate, "POST", f"/upstreams/{name}/recycle")

    async def remove_upstream(self, name: str) -> UpstreamView:
        """``DELETE /upstreams/{name}``: its last view (409 unless it is draining)."""
        return await self._call(UpstreamView.model_validate, "DELETE", f"/upstreams/{name}")

    async def load(self) -> LoadReport:
        """``GET /load``: the router's own load, as peer balancers read it."""
        return await self._call(LoadReport.model_validate, "GET", "/load")

    async def fault(self, changes: Mapping[str, object]) -> FaultState:
        """``POST /fault`` on a simulated server: simulation fields (``"latency": "50ms"``)
        and actions (``hang``, ``crash``, ``clear``); 400 with ``problems`` for a bad
        one. After a crash the server exits: the next call finds nothing answering."""
        return await self._call(FaultState.model_validate, "POST", "/fault", changes)

    async def fault_state(self) -> FaultState:
        """``GET /fault``: the simulation a simulated server runs now."""
        return await self._call(FaultState.model_validate, "GET", "/fault")


def _status_error(where: str, status: int, raw: bytes) -> APIStatusError:
    """An error answer: JSON ``{"error", "problems"?}``, or plain text."""
    try:
        body: Any = json.loads(raw)
    except ValueError:
        body = {"error": raw.decode(errors="replace").strip()}
    message = str(body.get("error", body)) if isinstance(body, dict) else str(body)
    problems = body.get("problems") if isinstance(body, dict) else None
    return APIStatusError(where, status, message, list(problems or []), body)
