"""``ScaledKeyLimits``: per-scope factors over any limit source, against a per-key reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from limiter.config import ConfigDocument, ConfigSnapshot, RateLimitConfiguration
from limiter.keylimits import (
    FixedKeyLimits,
    KeyLimits,
    ScaledKeyLimits,
    tier_members,
)
from limiter.keys import client_key

FAST = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])


class Source:
    def __init__(self, table: KeyLimits, tiers: dict[str, np.ndarray]) -> None:
        self.table = table
        self._tiers = tiers

    def current(self) -> KeyLimits:
        return self.table

    def tiers(self) -> dict[str, np.ndarray]:
        return self._tiers


keys = st.integers(1, 40)
factor = st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0])


@FAST
@given(
    st.dictionaries(keys, st.integers(1, 1000), max_size=15),
    st.dictionaries(keys, st.sampled_from(["free", "pro"]), max_size=20),
    st.dictionaries(st.sampled_from(["*", "default", "free", "pro", "gold"]), factor),
    st.integers(1, 500),
)
def test_every_key_gets_its_limit_times_its_smallest_factor(
    own: dict[int, int], tier_of: dict[int, str], factors: dict[str, float], default: int
) -> None:
    inner = KeyLimits(
        np.array(list(own), dtype=np.uint64), np.array(list(own.values()), float), default, 3
    )
    tiers = {
        t: np.array([k for k, x in tier_of.items() if x == t], dtype=np.uint64)
        for t in ("free", "pro")
    }
    scaled = ScaledKeyLimits(Source(inner, tiers))
    scaled.set_factors(factors)
    table = scaled.current()
    probe = np.arange(1, 45, dtype=np.uint64)
    got = table.lookup(probe)
    for k, value in zip(probe.tolist(), got.tolist(), strict=True):
        base = own.get(k, default)
        applicable = [factors.get("*", 1.0)]
        tier = tier_of.get(k)
        if tier is not None:
            applicable.append(factors.get(tier, 1.0))
        elif k not in own:
            applicable.append(factors.get("default", 1.0))
        assert value == pytest.approx(base * min(applicable))
        assert table.limit(k) == pytest.approx(value)


def test_the_version_moves_with_the_factors_and_the_inner_table_only() -> None:
    source = FixedKeyLimits(KeyLimits.uniform(100, version=1))
    scaled = ScaledKeyLimits(source)
    v0 = scaled.current().version
    assert scaled.current().version == v0
    assert scaled.set_factors({"*": 0.5})
    v1 = scaled.current().version
    assert v1 != v0 and scaled.current().default == 50
    assert not scaled.set_factors({"*": 0.5, "free": 1.0})  # 1 is no factor: nothing changed
    assert scaled.current().version == v1
    source.table = KeyLimits.uniform(80, version=2)
    assert scaled.current().version != v1 and scaled.current().default == 40
    with pytest.raises(ValueError):
        scaled.set_factors({"*": 0.0})


def test_tier_members_follow_the_resolution() -> None:
    doc = ConfigDocument(
        default=RateLimitConfiguration.from_rates("10/second"),
        tiers={"free": RateLimitConfiguration.from_rates("5/second")},
        clients={"bob": RateLimitConfiguration.from_rates("1/second")},
        assignments={"alice": "free", "bob": "free"},
    )
    members = tier_members(ConfigSnapshot(doc, 1))
    assert members["free"].tolist() == [client_key("alice")]  # bob's override wins
