"""The settings of a stack over several hosts: the tier, DNS names, nameservers, the
admin token, and what each tier refuses (with the field, expected and found)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lbstack import config
from lbstack.address import Address
from lbstack.config import DnsName, parse_dns_name
from lbstack.errors import ConfigError
from lbstack.reconciler import upstream_spec


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("dns://proxies.lbstack.test:8080", DnsName("proxies.lbstack.test", 8080)),
        ("dns://proxies.lbstack.test.:80", DnsName("proxies.lbstack.test", 80)),
        ("dns+srv://_http._tcp.proxies.test", DnsName("_http._tcp.proxies.test", None, srv=True)),
    ],
)
def test_a_dns_name_reads_and_writes_back(text: str, name: DnsName) -> None:
    assert parse_dns_name(text) == name
    assert parse_dns_name(str(name)) == name


@pytest.mark.parametrize(
    "text",
    [
        "dns://proxies.test",
        "dns://proxies.test:0",
        "dns://:80",
        "dns://a b:80",
        "http://x:80",
        "dns+srv://",
        "dns://x:65536",
    ],
)
def test_a_bad_dns_name_says_what_was_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected dns://NAME:PORT .* or dns\+srv://NAME"):
        parse_dns_name(text)


def _problems(settings: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config.validate(settings)
    return caught.value.problems


def test_a_balancer_tier_needs_its_proxies_and_the_whole_stack_has_its_own() -> None:
    assert any(
        "balancer.upstreams: expected the proxies' addresses or a dns:// name" in p
        for p in _problems({"tier": "balancer"})
    )
    found = _problems({"balancer": {"upstreams": "dns://p.test:8080"}})
    assert any("expected none with tier='all'" in p and "dns://p.test:8080" in p for p in found)
    fixed = config.validate({"tier": "balancer", "balancer": {"upstreams": ["tcp://10.1.1.1:80"]}})
    assert fixed.balancer.upstreams == (Address("tcp", host="10.1.1.1", port=80),)


def test_a_server_tier_is_one_group_of_simulated_servers() -> None:
    assert any("proxies: expected 1 with tier='server'" in p for p in _problems({"tier": "server"}))
    kind = {"tier": "server", "proxies": 1, "server": {"kind": "command", "command": "x {socket}"}}
    assert any("server.kind: expected 'simulated' with tier='server'" in p for p in _problems(kind))
    assert config.validate({"tier": "server", "proxies": 1}).tier == "server"


def test_off_loopback_the_admin_api_needs_a_token_file(tmp_path: Path) -> None:
    settings: dict[str, Any] = {"tier": "proxy", "network": {"bind": "0.0.0.0"}}
    assert any("admin.token_file: expected a token file" in p for p in _problems(settings))
    missing = tmp_path / "missing"
    found = _problems({**settings, "admin": {"token_file": str(missing)}})
    assert any(f"admin.token_file: expected a readable file, found {missing}" in p for p in found)
    short = tmp_path / "short"
    short.write_text("abc\n")
    found = _problems({**settings, "admin": {"token_file": str(short)}})
    assert any("expected a token of 16 characters or more" in p for p in found)
    good = tmp_path / "token"
    good.write_text("0123456789abcdef0123\n")
    loaded = config.validate({**settings, "admin": {"token_file": str(good)}})
    assert loaded.admin.token() == "0123456789abcdef0123"


@pytest.mark.parametrize("server", ["198.18.0.1", "198.18.0.1:5353", "::1", "[::1]:5353"])
def test_nameservers_are_addresses_with_an_optional_port(server: str) -> None:
    loaded = config.validate({"discovery": {"nameservers": [server]}})
    assert loaded.discovery.nameservers == (server,)


@pytest.mark.parametrize("server", ["ns.example", "198.18.0.1:0", "198.18.0.1:x", "[::1]:99999"])
def test_a_nameserver_that_is_no_address_is_refused(server: str) -> None:
    assert any(
        "discovery.nameservers" in p for p in _problems({"discovery": {"nameservers": [server]}})
    )


def test_a_dns_group_of_foreign_servers_has_no_admin_api() -> None:
    address = Address("tcp", host="198.18.0.9", port=8000)
    assert upstream_spec(address, admin_offset=1000).admin == Address(
        "tcp", host="198.18.0.9", port=9000
    )
    foreign = upstream_spec(address, admin_offset=None, health_path="/up")
    assert foreign.admin is None and foreign.health_path == "/up"
    loaded = config.validate(
        {"server": {"kind": "dns", "discover": "dns://app.test:8000", "admin_api": False}}
    )
    assert loaded.server.admin_api is False and loaded.group(0).servers == 0
