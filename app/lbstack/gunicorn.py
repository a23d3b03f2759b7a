"""Running one balancer or proxy tier under gunicorn's aiohttp worker.

``deploy/gunicorn/gunicorn.conf.py`` is the way in::

    LBSTACK_TIER=balancer LBSTACK_CONFIG=/etc/lbstack/lbstack.toml \\
        gunicorn -c deploy/gunicorn/gunicorn.conf.py

Everything a tier needs comes from the environment, read by ``TierSettings.from_env``
(the gunicorn config calls it in the arbiter, so a bad value stops gunicorn before any
worker starts, with the field, what was expected and what was found, exit status 2):

``LBSTACK_TIER``
    ``balancer`` or ``proxy``: the app factory (``balancer_app`` or ``proxy_app``).
``LBSTACK_CONFIG``
    The usual TOML file, validated as ``lbstack up`` does (unset: every default). The
    tier's table (``[balancer]`` or ``[proxy]``) applies, and ``[supervisor]``'s
    ``graceful_timeout``, ``drain_window`` and ``log_level``.
``LBSTACK_NAME``
    The ``instance`` label of the tier's metrics and the prefix of its admin sockets
    (default: the tier).
``LBSTACK_UPSTREAMS``
    Where requests go, entries separated by spaces or newlines, each
    ``[NAME=]ADDRESS[,admin=ADDRESS][,health_path=PATH]``. A bare
    ``unix:/dir/proxy-0.sock`` is named ``proxy-0`` and its admin is
    ``unix:/dir/proxy-0.admin.sock`` (the run dir's naming). Unset for a balancer: the
    stack's proxies in the config's run dir (``proxy-<p>.sock``, ``proxies`` of them).
``LBSTACK_ADMIN_DIR``
    Where each worker serves its admin API (``/healthz``, ``/readyz``, ``/status``,
    ``/metrics``, ``/upstreams``): ``<dir>/<name>-<pid>.admin.sock``, mode 0600, one per
    worker and removed when it exits (default: the config's run dir). The tier's own
    admin address, ``<dir>/<name>.admin.sock``, is a symlink to a live worker's socket
    (``claim_alias``, ``repoint_alias``): what a router in front scrapes and checks.
    Its ``/metrics`` is the whole tier's (see ``lbstack.metrics``); a change through
    ``/upstreams`` reaches one worker only, so send those to every worker's socket.

Each worker is a whole router of its own (pools, health checks, scrapes, routing
state); only the listening sockets, which gunicorn binds, and the metrics files
(``lbstack.metrics``, multiprocess mode) are shared. The data plane is the one ``lbstack
up`` runs: the same handler, limits, keep-alive, 431 mapping and handler cancellation,
and the same drain on SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, cast, get_args

from aiohttp import web
from pydantic import ValidationError

from lbstack import config as config_module
from lbstack.address import Address, parse_address
from lbstack.component import ChildSpec, Component, UpstreamSpec
from lbstack.config import Config, TierConfig
from lbstack.errors import ConfigError
from lbstack.httpserver import DataPlane
from lbstack.identity import UPSTREAM_NAME, UPSTREAM_NAME_RULE, ChildId
from lbstack.log import get_logger, setup
from lbstack.rundir import RunDir

# Nothing here imports prometheus_client at module level: the gunicorn config imports
# this module in the arbiter, and prometheus_client picks multiprocess mode or not
# for good when it is first imported.

Tier = Literal["balancer", "proxy"]
TIERS: Final = get_args(Tier)
TIER_VAR: Final = "LBSTACK_TIER"
CONFIG_VAR: Final = "LBSTACK_CONFIG"
NAME_VAR: Final = "LBSTACK_NAME"
UPSTREAMS_VAR: Final = "LBSTACK_UPSTREAMS"
ADMIN_DIR_VAR: Final = "LBSTACK_ADMIN_DIR"
ADMIN_KEEPALIVE: Final = 30.0
DRAIN_POLL: Final = 0.05
# The longest pid Linux hands out (pid_max is at most 2**22): admin paths must fit.
_LONGEST_PID: Final = "4194304"
_ADMIN_FIELDS: Final = ("admin", "health_path")
# The admin API's rule for upstream names (app.router, not imported here: see above).

log = get_logger("gunicorn")


@dataclass(frozen=True)
class TierSettings:
    """One tier as gunicorn runs it: what it is, its config, its upstreams, its admin dir."""

    tier: Tier
    name: str
    config: Config
    upstreams: tuple[UpstreamSpec, ...]
    admin_dir: Path

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TierSettings:
        """Read and validate the ``LBSTACK_*`` variables; raise ConfigError naming each problem."""
        env = os.environ if environ is None else environ
        tier = env.get(TIER_VAR, "")
        if tier not in TIERS:
            raise ConfigError([f"{TIER_VAR}: expected 'balancer' or 'proxy', found {tier!r}"])
        config_path = env.get(CONFIG_VAR)
        config = config_module.load(Path(config_path) if config_path else None)
        name = env.get(NAME_VAR) or tier
        problems = _check_name(name)
        admin_dir = Path(env.get(ADMIN_DIR_VAR) or config.resolved_run_dir())
        longest = admin_dir / f"{name}-{_LONGEST_PID}.admin.sock"
        try:
            parse_address(f"unix:{longest}")
        except ValueError as exc:
            problems.append(f"{ADMIN_DIR_VAR}: {exc}")
        text = env.get(UPSTREAMS_VAR, "").strip()
        if text:
            upstreams, found = parse_upstreams(text)
            problems += found
        elif tier == "balancer":
            upstreams = stack_proxies(config)
        else:
            upstreams = ()
            problems.append(
                f"{UPSTREAMS_VAR}: expected the proxy's servers, "
                "e.g. 'server-0=unix:/run/app/0.sock', found nothing"
            )
        if tier == "proxy":
            problems += _check_keepalive(config)
        if problems:
            raise ConfigError(problems)
        return cls(cast(Tier, tier), name, config, upstreams, admin_dir)

    @property
    def section(self) -> TierConfig:
        """The tier's table of the config: ``[balancer]`` or ``[proxy]``."""
        return self.config.balancer if self.tier == "balancer" else self.config.proxy

    @property
    def app_uri(self) -> str:
        """What gunicorn loads: this module's factory for the tier."""
        return f"{__name__}:{self.tier}_app"

    @property
    def default_bind(self) -> Address:
        """The data socket ``lbstack up`` gives the tier: ``balancer.sock``, ``<name>.sock``."""
        run_dir = RunDir(self.config.resolved_run_dir())
        return run_dir.balancer if self.tier == "balancer" else run_dir.data(self.name)

    def admin(self, pid: int) -> Address:
        """The admin socket of worker ``pid``."""
        return Address.unix(str(self.admin_dir / f"{self.name}-{pid}.admin.sock"))

    @property
    def alias(self) -> Path:
        """The tier's admin address: a symlink to one live worker's admin socket."""
        return self.admin_dir / f"{self.name}.admin.sock"

    def spec(self) -> ChildSpec:
        """The ChildSpec the router is built from (gunicorn owns the sockets: no fds)."""
        return ChildSpec(
            name=self.name,
            role=self.tier,
            listen_fds=(),
            admin_fd=-1,
            upstreams=self.upstreams,
            config=self.config,
        )


# The settings the gunicorn config accepted last, in the arbiter; workers, forked from
# it, serve these rather than read the files again.
_accepted: list[TierSettings] = []


def accept_settings(environ: Mapping[str, str] | None = None) -> TierSettings:
    """The gunicorn config's settings: validated; on a reload (SIGHUP), invalid ones are
    refused with their problems on stderr and the running settings are kept, rather
    than gunicorn exiting as it does on a broken config file."""
    try:
        settings = TierSettings.from_env(environ)
    except ConfigError as exc:
        if not _accepted:
            raise
        print(f"lbstack: reload refused, keeping the running settings: {exc}", file=sys.stderr)
        return _accepted[-1]
    _accepted[:] = [settings]
    return settings


def claim_alias(settings: TierSettings, pid: int) -> None:
    """Point the tier's admin alias at worker ``pid``, unless it leads to a live one."""
    if settings.alias.exists():  # follows the link: False when it dangles
        return
    _link(settings, pid)


def repoint_alias(settings: TierSettings, dead: int, alive: Iterable[int]) -> None:
    """Worker ``dead`` is gone (the arbiter's child_exit): lead the alias to another one."""
    with contextlib.suppress(OSError):
        if os.readlink(settings.alias) != Path(settings.admin(dead).path).name:
            return
    for pid in alive:
        if pid != dead and os.path.exists(settings.admin(pid).path):
            _link(settings, pid)
            return
    remove_alias(settings)  # the next worker to boot claims it


def remove_alias(settings: TierSettings) -> None:
    if settings.alias.is_symlink():
        with contextlib.suppress(FileNotFoundError):
            settings.alias.unlink()


def _link(settings: TierSettings, pid: int) -> None:
    # A new link renamed over the old one: whoever connects meanwhile finds either.
    temporary = settings.admin_dir / f".{settings.name}-{pid}.alias"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    target = Path(settings.admin(pid).path).name  # relative: the directory may move
    try:
        temporary.symlink_to(target)
        temporary.replace(settings.alias)
    except OSError as exc:
        log.warning("cannot point %s at %s: %s", settings.alias, target, exc.strerror)


def stack_proxies(config: Config) -> tuple[UpstreamSpec, ...]:
    """The proxies ``lbstack up`` runs with ``config``: a balancer tier's default upstreams."""
    run_dir = RunDir(config.resolved_run_dir())
    return tuple(
        UpstreamSpec(name=name, address=run_dir.data(name), admin=run_dir.admin(name))
        for name in (ChildId.proxy(p).name for p in range(config.proxies))
    )


def parse_upstreams(text: str) -> tuple[tuple[UpstreamSpec, ...], list[str]]:
    """The upstreams ``LBSTACK_UPSTREAMS`` lists, and a line for each problem found."""
    upstreams: list[UpstreamSpec] = []
    problems: list[str] = []
    for index, entry in enumerate(text.split()):
        where = f"{UPSTREAMS_VAR}[{index}]"
        first, *rest = entry.split(",")
        name, sep, address = first.partition("=")
        if not sep:
            name, address = "", first
        fields: dict[str, str] = {"address": address}
        for item in rest:
            key, sep, value = item.partition("=")
            if not sep or key not in _ADMIN_FIELDS:
                problems.append(
                    f"{where}: expected admin=ADDRESS or health_path=PATH after the address, "
                    f"found {item!r}"
                )
                continue
            fields[key] = value
        try:
            parsed = parse_address(address)
        except ValueError as exc:
            problems.append(f"{where}.address: {exc}")
            continue
        if not name:
            if not parsed.is_unix or not parsed.path.endswith(".sock"):
                problems.append(
                    f"{where}: expected NAME=ADDRESS (only a unix:/dir/NAME.sock names "
                    f"itself), found {entry!r}"
                )
                continue
            name = Path(parsed.path).name.removesuffix(".sock")
            fields.setdefault("admin", f"unix:{parsed.path.removesuffix('.sock')}.admin.sock")
        found = _check_name(name, where)
        if "health_path" in fields and not fields["health_path"].startswith("/"):
            found.append(
                f"{where}.health_path: expected a path starting with '/', "
                f"found {fields['health_path']!r}"
            )
        try:
            spec = UpstreamSpec.model_validate({"name": name, **fields})
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                field = ".".join(str(part) for part in error["loc"])
                found.append(f"{where}.{field}: {error['msg']}; found {error.get('input')!r}")
        else:
            if not found:
                upstreams.append(spec)
        problems += found
    names = [u.name for u in upstreams]
    problems += [
        f"{UPSTREAMS_VAR}: expected each name once, found {name!r} {names.count(name)} times"
        for name in sorted({n for n in names if names.count(n) > 1})
    ]
    return tuple(upstreams), problems


def _check_name(name: str, where: str = NAME_VAR) -> list[str]:
    if UPSTREAM_NAME.fullmatch(name):
        return []
    return [f"{where}: expected {UPSTREAM_NAME_RULE}, found {name!r}"]


def _check_keepalive(config: Config) -> list[str]:
    """A proxy tier must keep idle connections longer than the balancer pools them.

    Else it closes a pooled connection just as the balancer reuses it, and a POST on
    it fails (the keep-alive race; see the design's known pitfalls).
    """
    keepalive = config.proxy.timeouts.client_keepalive
    pool_idle = config.balancer.timeouts.pool_idle
    if keepalive > pool_idle:
        return []
    return [
        f"proxy.timeouts.client_keepalive: expected longer than balancer.timeouts.pool_idle "
        f"({pool_idle:g}s), found {keepalive:g}s"
    ]


class TierRunner(web.AppRunner):
    """The runner gunicorn's aiohttp worker serves: a tier's data plane and its admin socket.

    The worker serves ``self.server`` on gunicorn's listening sockets. The runner's
    app is the component's admin app, whose startup and cleanup open and close the
    router's resources; it is served on the worker's own admin socket, and outlives
    the data plane on the way down, as in ``lbstack.worker``.
    """

    def __init__(self, settings: TierSettings, component: Component) -> None:
        supervisor = settings.config.supervisor
        super().__init__(
            component.admin,
            access_log=None,
            keepalive_timeout=ADMIN_KEEPALIVE,
            shutdown_timeout=supervisor.graceful_timeout - supervisor.drain_window,
        )
        self._settings = settings
        self._component = component
        self._data: DataPlane | None = None
        self._admin: web.ServerRunner | None = None
        self._admin_address: Address | None = None
        self._sampler: asyncio.Task[None] | None = None

    async def _make_server(self) -> web.Server:
        from lbstack.admin import DATA_SERVER  # noqa: PLC0415 - see the note on imports
        from lbstack.metrics import MULTIPROCESS  # noqa: PLC0415
        from lbstack.sockets import ADMIN_MODE, bind  # noqa: PLC0415

        data = self._component.data_server()
        self._component.admin[DATA_SERVER] = data  # before the app freezes
        admin = await super()._make_server()  # starts the admin app: pools, checks, scrapes
        self._admin = web.ServerRunner(admin, shutdown_timeout=1.0)
        await self._admin.setup()
        self._admin_address = self._settings.admin(os.getpid())
        self._settings.admin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        await web.SockSite(self._admin, bind(self._admin_address, mode=ADMIN_MODE)).start()
        claim_alias(self._settings, os.getpid())
        if MULTIPROCESS:
            self._sampler = asyncio.create_task(_sample_forever())
        log.info(
            "%s worker %d: %d upstream(s), admin on %s",
            self._settings.tier,
            os.getpid(),
            len(self._settings.upstreams),
            self._admin_address,
        )
        self._data = data
        return data

    async def cleanup(self) -> None:
        """Drain as ``lbstack.worker.drain`` does, then aiohttp's shutdown and the admin's."""
        data = self._data
        if data is not None:
            window = self._settings.config.supervisor.drain_window
            data.drain()
            log.info("draining (%d connections, %d busy)", len(data.connections), data.busy)
            for site in list(self.sites):
                await site.stop()  # the listeners are shared: the other workers accept
            loop = asyncio.get_running_loop()
            deadline = loop.time() + window
            # Polled: aiohttp signals no event when its last connection goes.
            while data.connections and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(DRAIN_POLL)
        await super().cleanup()

    async def _cleanup_server(self) -> None:
        from lbstack.client import cancel  # noqa: PLC0415 - see the note on imports
        from lbstack.metrics import MULTIPROCESS, sample_functions  # noqa: PLC0415
        from lbstack.sockets import unlink  # noqa: PLC0415

        await cancel(self._sampler)
        if MULTIPROCESS:
            sample_functions()  # the last requests' counts, into the shared files
        if self._admin is not None:
            await self._admin.cleanup()
        if self._admin_address is not None:
            unlink(self._admin_address)
        await super()._cleanup_server()  # the admin app's cleanup: the router's resources
        log.info("stopped")


async def _sample_forever() -> None:
    from lbstack.metrics import SAMPLE_INTERVAL, sample_functions  # noqa: PLC0415

    while True:
        sample_functions()
        await asyncio.sleep(SAMPLE_INTERVAL)


def create_runner(tier: Tier) -> TierRunner:
    """The runner of ``tier``, from the environment; a bad setting raises ConfigError."""
    from lbstack.tiers.router import create_router  # noqa: PLC0415 - see the note on imports

    settings = _accepted[-1] if _accepted else TierSettings.from_env()
    if settings.tier != tier:
        raise ConfigError(
            [f"{TIER_VAR}: expected {tier!r} for {__name__}:{tier}_app, found {settings.tier!r}"]
        )
    setup(settings.config.supervisor.log_level, f"{settings.name}/{os.getpid()}")
    component = create_router(settings.spec(), settings.section, edge=tier == "balancer")
    return TierRunner(settings, component)


async def balancer_app() -> web.AppRunner:
    """gunicorn's app for a balancer tier: ``lbstack.gunicorn:balancer_app``."""
    return create_runner("balancer")


async def proxy_app() -> web.AppRunner:
    """gunicorn's app for a proxy tier: ``lbstack.gunicorn:proxy_app``."""
    return create_runner("proxy")


def metrics_dir_default(settings: TierSettings) -> Path:
    """Where the workers' metrics files go unless ``PROMETHEUS_MULTIPROC_DIR`` says."""
    return settings.admin_dir / f"{settings.name}.metrics"


def reset_metrics_dir(path: Path) -> None:
    """An empty metrics directory for a new gunicorn: old files would add up with ours."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for file in path.glob("*.db"):
        with contextlib.suppress(FileNotFoundError):
            file.unlink()
