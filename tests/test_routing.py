"""Routing policies: the registry, and each policy's choices, deterministically."""

from __future__ import annotations

import random
from typing import get_args

import pytest

from app.address import Address
from app.config import PolicyName
from app.routing import POLICIES, LeastOutstanding, RoundRobin, Upstream, create_policy


def upstreams(count: int) -> list[Upstream]:
    return [Upstream(f"u{i}", Address.unix(f"/tmp/u{i}.sock")) for i in range(count)]


def names(picked: list[Upstream | None]) -> list[str | None]:
    return [u.name if u is not None else None for u in picked]


def test_registry_matches_the_config_literal() -> None:
    assert set(POLICIES) == set(get_args(PolicyName))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_create_policy_by_name(name: str) -> None:
    rng = random.Random(1)
    policy = create_policy(name, upstreams(2), rng)
    assert policy.name == name
    assert policy.rng is rng


def test_create_policy_rejects_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        create_policy("fastest", upstreams(1))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_nothing_to_pick(name: str) -> None:
    assert create_policy(name, []).pick() is None
    ups = upstreams(3)
    policy = create_policy(name, ups)
    for upstream in ups:
        upstream.available = False
    assert policy.pick() is None
    for upstream in ups:
        upstream.available = True
    assert policy.pick(exclude=set(ups)) is None


def test_round_robin_takes_each_in_turn() -> None:
    policy = RoundRobin(upstreams(3))
    assert names([policy.pick() for _ in range(7)]) == ["u0", "u1", "u2", "u0", "u1", "u2", "u0"]


def test_round_robin_skips_unavailable_and_excluded() -> None:
    ups = upstreams(4)
    policy = RoundRobin(ups)
    ups[1].available = False
    assert names([policy.pick() for _ in range(4)]) == ["u0", "u2", "u3", "u0"]
    # A retry excludes what the request tried; the turn moves on past the pick.
    assert names([policy.pick(exclude={ups[2]})]) == ["u3"]
    assert names([policy.pick(exclude=(ups[0], ups[3]))]) == ["u2"]
    ups[1].available = True
    assert names([policy.pick() for _ in range(4)]) == ["u3", "u0", "u1", "u2"]


def test_round_robin_follows_a_changed_upstream_list() -> None:
    ups = upstreams(4)
    policy = RoundRobin(ups)
    assert names([policy.pick() for _ in range(3)]) == ["u0", "u1", "u2"]
    policy.upstreams = tuple(ups[:2])
    assert names([policy.pick() for _ in range(3)]) == ["u1", "u0", "u1"]


def test_least_outstanding_picks_the_least_loaded() -> None:
    ups = upstreams(3)
    ups[0].in_flight, ups[1].in_flight, ups[2].in_flight = 5, 2, 7
    policy = LeastOutstanding(ups)
    assert [policy.pick() for _ in range(3)] == [ups[1]] * 3
    ups[1].in_flight = 9
    assert policy.pick() is ups[0]


def test_least_outstanding_breaks_ties_in_turn() -> None:
    ups = upstreams(3)
    policy = LeastOutstanding(ups)
    assert names([policy.pick() for _ in range(4)]) == ["u0", "u1", "u2", "u0"]
    for upstream in ups:
        upstream.in_flight = 3
    ups[0].in_flight = 4
    assert names([policy.pick() for _ in range(4)]) == ["u1", "u2", "u1", "u2"]


def test_least_outstanding_skips_unavailable_and_excluded() -> None:
    ups = upstreams(3)
    ups[0].in_flight, ups[1].in_flight, ups[2].in_flight = 0, 1, 2
    policy = LeastOutstanding(ups)
    ups[0].available = False
    assert policy.pick() is ups[1]
    assert policy.pick(exclude={ups[1]}) is ups[2]
    assert policy.pick(exclude=(ups[1], ups[2])) is None
