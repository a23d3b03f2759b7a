"""The ``lbstack`` command line (a contract: see docs/operations.md)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvloop
from rich.console import Console
from rich.live import Live

from lbstack import config as configuration
from lbstack import statusview
from lbstack.api import ComponentStatus, Response, RouterStatus, StackStatus
from lbstack.client import AdminClient, ControlClient
from lbstack.errors import (
    APIConnectionError,
    APIStatusError,
    ConfigError,
    ControlError,
    LbstackError,
)
from lbstack.log import setup
from lbstack.supervisor.arbiter import Arbiter
from lbstack.supervisor.upgrade import take_state

FAULT_FLAGS = ("hang", "crash", "clear")
UPGRADE_TIMEOUT = 60.0  # for a re-executed supervisor to answer again


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbstack", description="A load-balancing stack of separate Unix processes."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the stack in the foreground (Ctrl-C stops it)")
    up.add_argument("--config", type=Path, help="TOML config file")
    up.add_argument("--run-dir", type=Path, help="where the sockets live")
    up.add_argument(
        "--tier",
        choices=("all", "balancer", "proxy", "server"),
        help="run one tier of a stack over several hosts (default: all, the whole stack)",
    )
    up.add_argument("--balancers", type=int, help="balancer processes")
    up.add_argument("--proxies", type=int, help="reverse proxies (server groups)")
    up.add_argument("--servers-per-proxy", type=int, help="servers behind each proxy")
    up.add_argument(
        "--listen",
        action="append",
        metavar="ADDR",
        help="extra balancer listener, e.g. tcp://127.0.0.1:8080, or https://0.0.0.0:8443 "
        "with the certificates of the config's [tls] (repeatable)",
    )
    up.add_argument("--policy", help="routing policy of balancer and proxies")
    up.add_argument(
        "--metrics-listen",
        metavar="ADDR",
        help="Prometheus endpoint, e.g. tcp://127.0.0.1:9464, or 'off'",
    )

    status = commands.add_parser("status", help="show the running stack")
    _run_dir_option(status)
    status.add_argument(
        "component",
        nargs="?",
        metavar="NAME",
        help="a balancer or proxy: show its routing view per upstream",
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl-C, like top")
    status.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between the readings rates come from (default 1)",
    )

    fault = commands.add_parser(
        "fault",
        help="change a simulated server's behaviour at runtime",
        description="e.g. lbstack fault server-0-2 latency=50ms error_rate=0.2; "
        "actions: hang, crash, clear",
    )
    _run_dir_option(fault)
    fault.add_argument("server", help="server name, e.g. server-0-2")
    fault.add_argument(
        "changes",
        nargs="+",
        metavar="KEY=VALUE|ACTION",
        help="latency=50ms error_rate=0.2 cpu=2ms ... or hang, crash, clear",
    )

    scale = commands.add_parser("scale", help="grow or shrink a server group now")
    _run_dir_option(scale)
    scale.add_argument("group", help="the group, by its proxy's name, e.g. proxy-0")
    scale.add_argument("servers", type=int, help="how many servers it should have")
    for verb, text in (
        ("drain", "send a server or proxy no new requests"),
        ("undrain", "let a drained server or proxy take requests again"),
    ):
        command = commands.add_parser(verb, help=text)
        _run_dir_option(command)
        command.add_argument("name", help="e.g. server-0-2 or proxy-1")
        if verb == "drain":
            command.add_argument(
                "--force",
                action="store_true",
                help="drain it even if that leaves its router nothing to send requests to",
            )

    upgrade = commands.add_parser(
        "upgrade",
        help="after installing a new lbstack: re-execute the supervisor, then roll every "
        "child onto the new code, losing no request",
        description="The supervisor keeps its pid, sockets and children across the exec; "
        "the new code is checked first, and a broken install is refused (exit 1) with the "
        "stack unchanged.",
    )
    _run_dir_option(upgrade)
    upgrade.add_argument(
        "--supervisor-only",
        action="store_true",
        help="re-execute the supervisor and leave the children as they run",
    )
    reload = commands.add_parser(
        "reload",
        help="re-read the config and replace the children it changed (same as SIGHUP)",
        description="An invalid config, or a change that needs a restart of the stack, is "
        "refused (exit 2 or 1) and the stack keeps running as it was.",
    )
    _run_dir_option(reload)
    reload.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config and print what a reload would replace, start, stop and "
        "scale; change nothing",
    )
    restart = commands.add_parser(
        "restart",
        help="replace children one at a time, new before old, losing no request",
    )
    _run_dir_option(restart)
    restart.add_argument(
        "--rolling",
        action="store_true",
        required=True,
        help="one child at a time (the only kind: to restart everything at once, stop the "
        "stack and start it)",
    )
    restart.add_argument(
        "names", nargs="*", metavar="NAME", help="only these components (default: every one)"
    )
    return parser


def _run_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir", type=Path, default=None, help="the stack's run dir (default: as lbstack up)"
    )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for flag in ("tier", "balancers", "proxies", "servers_per_proxy"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    if args.run_dir is not None:
        overrides["run_dir"] = str(args.run_dir)
    if args.listen:
        overrides["listen"] = args.listen
    if args.policy is not None:
        overrides["balancer.policy"] = args.policy
        overrides["proxy.policy"] = args.policy
    if args.metrics_listen is not None:
        overrides["metrics_listen"] = None if args.metrics_listen == "off" else args.metrics_listen
    return overrides


def cmd_up(args: argparse.Namespace) -> int:
    overrides = _overrides(args)
    resume = take_state()  # set when `lbstack upgrade` re-executed this supervisor
    config = configuration.load(args.config, overrides) if resume is None else resume.config
    setup(config.supervisor.log_level, "supervisor")
    _raise_open_files_limit()
    supervisor = Arbiter(
        config, source=lambda: configuration.load(args.config, overrides), resume=resume
    )
    return uvloop.run(supervisor.run())


def _raise_open_files_limit() -> None:
    """Soft open-files limit up to the hard one: a balancer holds a socket per client,
    and every child inherits the limit from here."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):  # e.g. an unlimited hard limit
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _control(args: argparse.Namespace) -> ControlClient:
    path = args.run_dir if args.run_dir is not None else configuration.default_run_dir()
    return ControlClient(path)


async def _get_status(control: ControlClient) -> StackStatus:
    try:
        return await control.status()
    except APIConnectionError as exc:
        raise ControlError(
            f"no stack answers on {control.address} ({exc.__cause__.__class__.__name__}); is "
            "`lbstack up` running with this --run-dir?"
        ) from exc
    except APIStatusError as exc:
        raise ControlError(f"{control.address} answered {exc.status}: {exc.body}") from exc


async def _component_status(args: argparse.Namespace) -> int:
    """``lbstack status proxy-0``: one component's own /status."""
    status = await _get_status(_control(args))
    named = {c.name: c for c in status.components if c.admin is not None and c.role != "supervisor"}
    target = named.get(args.component)
    if target is None or target.admin is None:
        raise ControlError(f"no component named {args.component!r}; components: {', '.join(named)}")
    try:
        view = await AdminClient(target.admin).status()
    except APIConnectionError as exc:
        raise ControlError(f"{args.component} did not answer: {exc.__cause__!r}") from exc
    except APIStatusError as exc:
        raise ControlError(f"{args.component} answered {exc.status}: {exc.body}") from exc
    if args.json or not isinstance(view, RouterStatus):
        print(json.dumps(view.to_json(), indent=2))
    else:
        Console().print(statusview.render_router(view.to_json()))
    return 0


async def _status(args: argparse.Namespace) -> int:
    if args.component:
        return await _component_status(args)
    control = _control(args)
    if args.json:
        print(json.dumps((await _get_status(control)).to_json(), indent=2))
        return 0
    console = Console()
    status = (await _get_status(control)).to_json()
    before = await statusview.read(status["components"])
    if not args.watch:
        await asyncio.sleep(args.interval)  # rates need two readings
        status = (await _get_status(control)).to_json()
        after = await statusview.read(status["components"])
        console.print(statusview.render(status, _loads(before, after)))
        return 0
    with Live(console=console, auto_refresh=False, screen=console.is_terminal) as live:
        while True:
            await asyncio.sleep(args.interval)
            status = (await _get_status(control)).to_json()
            after = await statusview.read(status["components"])
            live.update(statusview.render(status, _loads(before, after)), refresh=True)
            before = after


def _loads(
    before: dict[str, statusview.Reading], after: dict[str, statusview.Reading]
) -> dict[str, statusview.Load]:
    return {
        name: statusview.load_between(before[name], reading)
        for name, reading in after.items()
        if name in before
    }


def parse_fault(changes: Sequence[str]) -> dict[str, Any]:
    """``latency=50ms hang`` → ``{"latency": "50ms", "hang": true}``."""
    body: dict[str, Any] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if sep and key and value:
            body[key] = value
        elif not sep and change in FAULT_FLAGS:
            body[change] = True
        else:
            raise ConfigError(
                [f"fault: expected KEY=VALUE or one of {', '.join(FAULT_FLAGS)}, found {change!r}"]
            )
    return body


async def _fault(args: argparse.Namespace) -> int:
    body = parse_fault(args.changes)
    status = await _get_status(_control(args))
    servers = {c.name: c for c in status.components if c.role == "server"}
    target = servers.get(args.server)
    if target is None or target.admin is None:
        simulated = ", ".join(n for n, c in servers.items() if c.admin) or "none"
        raise ControlError(
            f"no simulated server named {args.server!r}; simulated servers: {simulated}"
        )
    admin = AdminClient(target.admin)
    try:
        answer = await admin.fault(body)
    except APIConnectionError as exc:
        if body.get("crash"):
            print(f"{args.server}: crashed")
            return 0
        raise ControlError(
            f"{args.server} did not answer on {admin.address}: {exc.__cause__!r}"
        ) from exc
    except APIStatusError as exc:
        raise ControlError(f"{args.server} refused the change: {exc.message}") from exc
    print(f"{args.server}: {json.dumps(answer.to_json())}")
    return 0


async def _membership(args: argparse.Namespace) -> int:
    """``lbstack scale``, ``drain``, ``undrain``, ``reload`` and ``restart``: one POST to
    the control socket, answered once the change is done."""
    control = _control(args)
    answer: Response
    try:
        if args.command == "scale":
            answer = await control.scale(args.group, args.servers)
        elif args.command == "reload":
            answer = await control.reload(dry_run=args.dry_run)
        elif args.command == "restart":
            answer = await control.restart(args.names)
        elif args.command == "drain":
            answer = await control.drain(args.name, force=args.force)
        else:
            answer = await control.undrain(args.name)
    except APIConnectionError as exc:
        raise ControlError(f"no stack answers on {control.address} ({exc.__cause__!r})") from exc
    except APIStatusError as exc:
        if exc.status == 422:  # the new config is invalid
            raise ConfigError([str(p) for p in exc.problems] or [exc.message]) from exc
        raise ControlError(exc.message) from exc
    print(json.dumps(answer.to_json()))
    return 0


async def _upgrade(args: argparse.Namespace) -> int:
    """``lbstack upgrade``: the supervisor re-executes itself, then (unless
    ``--supervisor-only``) a rolling restart moves our own children onto the new code;
    servers the user's command runs are left alone, their code did not change."""
    control = _control(args)
    before = _supervisor_entry(await _get_status(control))
    try:
        started = await control.upgrade()
    except APIConnectionError as exc:
        raise ControlError(f"no stack answers on {control.address} ({exc.__cause__!r})") from exc
    except APIStatusError as exc:
        if exc.status == 404:  # a supervisor from before `lbstack upgrade` existed
            raise ControlError(
                "the running supervisor predates `lbstack upgrade`: `lbstack restart --rolling` "
                "puts the new code in every child, and the supervisor takes it at its next start"
            ) from exc
        raise ControlError(exc.message) from exc
    status = await _upgraded(control, before.upgrades)
    result: dict[str, Any] = {
        "supervisor": {"pid": started.upgrading, "upgrades": _supervisor_entry(status).upgrades}
    }
    if not args.supervisor_only:
        ours = [
            c.name
            for c in status.components
            if c.role != "supervisor" and c.admin is not None and c.state != "external"
        ]
        try:
            restarted = await control.restart(ours)
        except APIStatusError as exc:
            raise ControlError(
                f"supervisor upgraded; rolling the children failed: {exc.body}"
            ) from exc
        result.update(restarted.to_json())
    print(json.dumps(result))
    return 0


async def _upgraded(control: ControlClient, upgrades: int) -> StackStatus:
    """The status once the new image answers (it counts one more upgrade)."""
    deadline = asyncio.get_running_loop().time() + UPGRADE_TIMEOUT
    while True:
        with contextlib.suppress(ControlError):
            status = await _get_status(control)
            if _supervisor_entry(status).upgrades > upgrades:
                return status
        if asyncio.get_running_loop().time() > deadline:
            raise ControlError(f"the supervisor did not come back within {UPGRADE_TIMEOUT:.0f}s")
        await asyncio.sleep(0.1)


def _supervisor_entry(status: StackStatus) -> ComponentStatus:
    # ``upgrades`` is 0 when a supervisor from before upgrades does not say it
    return next(c for c in status.components if c.role == "supervisor")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "up":
            status = cmd_up(args)
        elif args.command == "status":
            status = uvloop.run(_status(args))
        elif args.command == "fault":
            status = uvloop.run(_fault(args))
        elif args.command == "upgrade":
            status = uvloop.run(_upgrade(args))
        else:
            status = uvloop.run(_membership(args))
    except LbstackError as exc:
        print(f"lbstack: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)
