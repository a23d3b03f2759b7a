"""The config model: defaults, validation messages, TOML loading, CLI overrides."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from lbstack import config
from lbstack.address import Address, parse_address
from lbstack.errors import ConfigError
from lbstack.routing import POLICIES


def test_defaults_reproduce_the_original_system() -> None:
    cfg = config.load()
    assert (cfg.balancers, cfg.proxies, cfg.servers_per_proxy) == (1, 2, 3)
    assert [g.servers for g in cfg.layouts()] == [3, 3]
    assert cfg.metrics_listen == Address("tcp", host="127.0.0.1", port=9464)
    assert cfg.server.kind == "simulated"


def test_the_model_is_immutable() -> None:
    cfg = config.load()
    with pytest.raises(Exception, match="frozen"):
        cfg.balancers = 3  # type: ignore[misc]


def test_durations_sizes_and_addresses_parse() -> None:
    cfg = config.validate(
        {
            "balancer": {
                "timeouts": {"connect": "250ms", "first_byte": 3},
                "limits": {"max_body_size": "1GiB"},
            },
            "server": {"simulation": {"latency": "1.5m", "cpu": "200us"}},
            "listen": ["tcp://127.0.0.1:8080", "unix:/tmp/x.sock", "tcp://[::1]:81"],
        }
    )
    assert cfg.balancer.timeouts.connect == pytest.approx(0.25)
    assert cfg.balancer.timeouts.first_byte == 3.0
    assert cfg.balancer.limits.max_body_size == 1024**3
    assert cfg.server.simulation.latency == pytest.approx(90.0)
    assert cfg.server.simulation.cpu == pytest.approx(0.0002)
    assert [str(a) for a in cfg.listen] == [
        "tcp://127.0.0.1:8080",
        "unix:/tmp/x.sock",
        "tcp://[::1]:81",
    ]


def test_json_round_trip_is_what_children_receive() -> None:
    cfg = config.validate(
        {
            "listen": ["tcp://127.0.0.1:8080"],
            "proxy": {"policy": "round_robin"},
            "server": {"simulation": {"latency": "5ms"}},
        }
    )
    assert config.from_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"proxies": 0}, "proxies: expected: input should be greater than or equal to 1; found 0"),
        ({"balancers": "two"}, "balancers: expected: input should be a valid integer"),
        (
            {"balancer": {"timeouts": {"connect": "soon"}}},
            'balancer.timeouts.connect: expected a duration like "250ms"',
        ),
        ({"balancer": {"policy": "random"}}, "balancer.policy: expected: input should be"),
        (
            {"listen": ["http://x"]},
            "listen.0: expected 'unix:/path', 'tcp://host:port' or 'https://host:port', found",
        ),
        ({"listen": ["tcp://127.0.0.1:99999"]}, "expected a port number 0-65535"),
        (
            {"server": {"simulation": {"error_rate": 2}}},
            "server.simulation.error_rate: expected: input should be less than or equal to 1",
        ),
        (
            {"server": {"kind": "command"}},
            "server: command: expected a command line containing {socket}",
        ),
        ({"server": {"kind": "address"}}, "server: addresses: expected at least one address"),
        ({"proxy": {"limts": {}}}, "proxy.limts: unknown field"),
        (
            {"proxies": 3, "groups": [{}, {}]},
            "proxies: expected the number of [[groups]] (2) or no proxies key, found 3",
        ),
        ({"listen": ["unix:/" + "x" * 120]}, "longer than the 107-byte limit"),
    ],
)
def test_invalid_values_name_the_field_expected_and_found(
    data: dict[str, typing.Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.validate(data)
    assert expected in str(caught.value), str(caught.value)
    assert caught.value.exit_status == 2


def test_groups_inherit_the_top_level_server_table() -> None:
    cfg = config.validate(
        {
            "server": {"simulation": {"latency": "5ms", "cpu": "1ms"}},
            "groups": [
                {"servers": 2},
                {"server": {"simulation": {"latency": "50ms"}}},
                {"server": {"kind": "address", "addresses": ["unix:/tmp/a.sock"]}},
            ],
        }
    )
    first, second, third = cfg.layouts()
    assert cfg.proxies == 3
    assert first.servers == 2
    assert first.server.simulation.latency == pytest.approx(0.005)
    assert second.servers == 3
    assert second.server.simulation.latency == pytest.approx(0.05)
    assert second.server.simulation.cpu == pytest.approx(0.001)
    assert (third.servers, third.server.kind) == (1, "address")


def test_toml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "lbstack.toml"
    path.write_text('proxies = 3\n[proxy]\npolicy = "least_outstanding"\n')
    cfg = config.load(path, {"servers_per_proxy": 5, "balancer.policy": "least_outstanding"})
    assert (cfg.proxies, cfg.servers_per_proxy) == (3, 5)
    assert cfg.proxy.policy == cfg.balancer.policy == "least_outstanding"


def test_a_bad_file_says_which_file_and_where(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("proxies = \n")
    with pytest.raises(ConfigError, match=r"bad.toml: not valid TOML"):
        config.load(path)
    path.write_text("proxies = -1\n")
    with pytest.raises(ConfigError, match=r"bad.toml: proxies: .*found -1"):
        config.load(path)
    with pytest.raises(ConfigError, match="no such config file"):
        config.load(tmp_path / "missing.toml")


def test_address_forms() -> None:
    assert parse_address("unix:///tmp/a.sock").path == "/tmp/a.sock"
    assert parse_address("tcp://localhost:80").http_base == "http://localhost:80"
    assert parse_address("tcp://[::1]:80").http_base == "http://[::1]:80"
    for bad in ("unix:relative.sock", "tcp://:80", "tcp://host", "tcp://[zz]:1", "udp://x:1"):
        with pytest.raises(ValueError, match=r"expected|does not appear|IPv6"):
            parse_address(bad)


def test_policy_names_are_the_routing_registry() -> None:
    assert set(POLICIES) == set(typing.get_args(config.PolicyName))
