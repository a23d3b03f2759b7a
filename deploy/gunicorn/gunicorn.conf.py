"""gunicorn settings for one lbstack tier (a balancer or a proxy) on its own.

    LBSTACK_TIER=balancer LBSTACK_CONFIG=/etc/lbstack/lbstack.toml \
        gunicorn -c deploy/gunicorn/gunicorn.conf.py

The tier, its config and its upstreams come from the LBSTACK_* variables (see
app/lbstack/gunicorn.py and this directory's README); they are validated here, in the arbiter,
so a bad value stops gunicorn before a worker starts, and on a reload (SIGHUP) a bad
value is refused and the running settings kept. Command-line flags override what this
file sets (-b, -w ...).
"""

import math
import os
import sys
from pathlib import Path

import lbstack.gunicorn as tier
from lbstack.errors import LbstackError

try:
    _settings = tier.accept_settings()
except LbstackError as _error:
    print(f"lbstack: {_error}", file=sys.stderr)
    sys.exit(_error.exit_status)

# Every worker's metrics go to files here and each worker's /metrics sums them.
# Set before any worker imports prometheus_client, which reads it once, at import.
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(tier.metrics_dir_default(_settings)))

wsgi_app = _settings.app_uri
worker_class = "aiohttp.worker.GunicornUVLoopWebWorker"
# One event loop per CPU this process may run on; WEB_CONCURRENCY or -w overrides.
workers = int(os.environ.get("WEB_CONCURRENCY") or len(os.sched_getaffinity(0)))
bind = [str(_settings.default_bind)]
# Sockets gunicorn binds get 0777 & ~umask: 0660, owner and group (gunicorn's default
# umask, 0, would make them 0777). Files the workers write get 0660 too.
umask = 0o117
backlog = 4096
# The aiohttp worker serves our own runner, which keeps idle connections for the tier's
# timeouts.client_keepalive (75 s by default), longer than the pools in front keep them
# (timeouts.pool_idle, 15 s); this is the same figure, for gunicorn's own reporting.
keepalive = math.ceil(_settings.section.timeouts.client_keepalive)
# A stopping worker drains for graceful_timeout (drain window included) and notices
# SIGTERM within 1 s: SIGKILL only after that.
graceful_timeout = math.ceil(_settings.config.supervisor.graceful_timeout) + 2
timeout = 30  # heartbeat: a worker whose loop is stuck this long is killed and replaced
# gunicorn >= 25.1 opens ~/.gunicorn/gunicorn.ctl by default, one path for every
# instance: two tiers would fight over it.
control_socket_disable = True
accesslog = None  # the tier's own access log ([balancer] access_log) is the one to use
errorlog = "-"
loglevel = _settings.config.supervisor.log_level
proc_name = f"lbstack-{_settings.name}"
preload_app = False  # each worker builds its router after the fork


def on_starting(server):
    """Refuse to steal a live socket, and start the metrics from empty files."""
    from lbstack.address import parse_address  # noqa: PLC0415
    from lbstack.errors import SocketError  # noqa: PLC0415
    from lbstack.sockets import clear_stale  # noqa: PLC0415

    # gunicorn unlinks an existing socket file even when a live server owns it.
    for address in server.cfg.bind:
        if address.startswith("unix:"):
            try:
                clear_stale(parse_address(address).path)
            except (SocketError, ValueError) as exc:
                print(f"lbstack: {exc}", file=sys.stderr)
                sys.exit(1)
    _settings.admin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    tier.reset_metrics_dir(Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]))


def child_exit(server, worker):
    """A worker is gone (in the arbiter): its live gauges leave the sums, its sockets go."""
    from prometheus_client import multiprocess  # noqa: PLC0415

    from lbstack.sockets import unlink  # noqa: PLC0415

    multiprocess.mark_process_dead(worker.pid)
    unlink(_settings.admin(worker.pid))  # left behind when the worker was killed
    tier.repoint_alias(_settings, worker.pid, list(server.WORKERS))


def on_exit(server):
    """gunicorn stops: the tier's admin alias goes with its last worker."""
    tier.remove_alias(_settings)
