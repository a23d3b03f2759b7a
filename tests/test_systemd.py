"""deploy/systemd/: the units parse and verify, and everything they run exists.

``systemd-analyze verify`` checks each unit (with the install paths pointed at this
checkout's virtualenv, so the commands exist); then the commands, their flags, the
example config and the tier environment files are checked against lbstack and
gunicorn themselves, and the settings that keep unix sockets working under the
hardening are asserted.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lbstack import config as config_module
from lbstack.gunicorn import TierSettings

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
STACK_UNIT = SYSTEMD / "lbstack.service"
TIER_UNIT = SYSTEMD / "lbstack-tier@.service"
INSTALL_BIN = "/opt/lbstack/bin/"
VENV_BIN = str(Path(sys.executable).parent) + "/"
TIERS = ("balancer", "proxy-0")

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str, instance: str = "") -> Unit:
    """A unit file's sections as (key, value) lists, in order (keys may repeat)."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"not a unit file line: {raw!r}"
        current.append((key.strip(), value.strip().replace("%i", instance)))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    [found] = values(unit, section, key)
    return found


def read_env_file(path: Path) -> dict[str, str]:
    """A systemd EnvironmentFile: KEY=VALUE lines, values optionally double-quoted."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, rest = line.partition("=")
        [parsed] = shlex.split(rest) if rest else [""]
        env[key] = parsed
    return env


def unit_env(unit: Unit) -> dict[str, str]:
    return dict(v.split("=", 1) for v in values(unit, "Service", "Environment"))


def test_systemd_analyze_verifies_every_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (Debian package systemd; .ci/run installs it)"
    units = [(STACK_UNIT, "lbstack.service")] + [
        (TIER_UNIT, f"lbstack-tier@{tier}.service") for tier in TIERS
    ]
    for source, name in units:
        # Installed, the commands live in /opt/lbstack; here, in this virtualenv.
        (tmp_path / name).write_text(source.read_text().replace(INSTALL_BIN, VENV_BIN))
    result = subprocess.run(
        [analyze, "verify", *(str(tmp_path / name) for _, name in units)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # verify warns about unknown keys and bad values but still exits 0: no output at all.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_the_stack_unit_runs_lbstack_up_with_flags_that_exist() -> None:
    unit = parse_unit(STACK_UNIT.read_text())
    start = shlex.split(value(unit, "Service", "ExecStart"))
    assert start[0] == INSTALL_BIN + "lbstack"
    assert start[1:] == ["up", "--config", "/etc/lbstack/lbstack.toml"]
    assert (ROOT / ".venv" / "bin" / "lbstack").exists() or shutil.which("lbstack")
    help_text = _run(VENV_BIN + "lbstack", "up", "--help")
    for flag in (arg for arg in start if arg.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text), flag
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert os.access("/bin/kill", os.X_OK)
    assert value(unit, "Service", "KillMode") == "mixed"
    assert value(unit, "Service", "User") == "lbstack"
    sysusers = (SYSTEMD / "lbstack.sysusers.conf").read_text()
    assert re.search(r"^u lbstack ", sysusers, re.MULTILINE)


def test_the_example_config_fits_the_stack_unit() -> None:
    unit = parse_unit(STACK_UNIT.read_text())
    config = config_module.load(SYSTEMD / "lbstack.toml")
    # The run dir is the unit's RuntimeDirectory: writable under ProtectSystem=strict,
    # outside PrivateTmp's private /tmp, and reachable by the lbstack group.
    assert str(config.run_dir) == "/run/" + value(unit, "Service", "RuntimeDirectory")
    assert value(unit, "Service", "RuntimeDirectoryMode") == "0750"
    assert value(unit, "Service", "ProtectSystem") == "strict"
    # The supervisor stops three tiers in turn, each within graceful_timeout + 1 s.
    stop = float(value(unit, "Service", "TimeoutStopSec"))
    assert stop > 3 * (config.supervisor.graceful_timeout + 1)
    assert config.proxy.timeouts.client_keepalive > config.balancer.timeouts.pool_idle


@pytest.mark.parametrize("path", [STACK_UNIT, TIER_UNIT], ids=lambda p: p.name)
def test_the_hardening_leaves_unix_sockets_working(path: Path) -> None:
    unit = parse_unit(path.read_text())
    families = value(unit, "Service", "RestrictAddressFamilies").split()
    assert "AF_UNIX" in families and not families[0].startswith("~")
    assert value(unit, "Service", "User") == "lbstack"
    # Group members may reach the data sockets, nobody else (gunicorn sets its own umask).
    assert values(unit, "Service", "UMask") in (["0007"], [])
    # PrivateNetwork would cut the loopback listeners and the metrics endpoint off.
    assert values(unit, "Service", "PrivateNetwork") == []
    assert value(unit, "Service", "NoNewPrivileges") == "yes"
    assert value(unit, "Service", "ProtectSystem") == "strict"


@pytest.mark.parametrize("tier", TIERS)
def test_a_tier_unit_runs_gunicorn_with_settings_that_load(tier: str, tmp_path: Path) -> None:
    unit = parse_unit(TIER_UNIT.read_text(), instance=tier)
    start = shlex.split(value(unit, "Service", "ExecStart"))
    assert start[0] == INSTALL_BIN + "gunicorn"
    help_text = _run(VENV_BIN + "gunicorn", "--help")
    for flag in (arg for arg in start if arg.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", help_text), flag
    conf = start[start.index("--config") + 1]
    assert conf == "/etc/lbstack/gunicorn.conf.py"
    assert value(unit, "Service", "KillMode") == "mixed"
    assert value(unit, "Service", "Type") == "notify"  # gunicorn calls sd_notify(READY=1)
    run_dir = "/run/" + value(unit, "Service", "RuntimeDirectory")
    bind = start[start.index("--bind") + 1]
    assert bind == f"unix:{run_dir}/{tier}.sock"

    # The environment the unit gives the tier: its own lines, then its EnvironmentFile
    # (the example for this tier), with the example config in place of /etc/lbstack's.
    env_file = value(unit, "Service", "EnvironmentFile")
    assert env_file == f"/etc/lbstack/tier-{tier}.env"
    env = {
        **unit_env(unit),
        **read_env_file(SYSTEMD / Path(env_file).name),
        "LBSTACK_CONFIG": str(SYSTEMD / "lbstack.toml"),
    }
    assert env["LBSTACK_ADMIN_DIR"] == run_dir
    assert env["PROMETHEUS_MULTIPROC_DIR"].startswith(run_dir + "/")
    settings = TierSettings.from_env(env)
    assert settings.name == tier
    assert settings.tier == tier.partition("-")[0]
    assert settings.upstreams, "the example names its upstreams"

    # gunicorn itself loads the deploy config and the app with that environment.
    result = subprocess.run(
        [
            VENV_BIN + "gunicorn",
            "--config",
            str(ROOT / "deploy/gunicorn/gunicorn.conf.py"),
            "--bind",
            bind,
            "--check-config",
        ],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    stop = float(value(unit, "Service", "TimeoutStopSec"))
    assert stop > settings.config.supervisor.graceful_timeout + 2, "gunicorn's graceful_timeout"


def _run(*argv: str) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout
