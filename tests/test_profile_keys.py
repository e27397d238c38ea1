"""Profile keys: one row per key, the smallest profile_id winning a shared key."""

from __future__ import annotations

import polars as pl

from pipeline.stages.join import profile_keys, unique_keys


def test_shared_keys_go_to_the_smallest_profile_id() -> None:
    keys = pl.LazyFrame({
        "key": ["k1", "k2", "k1", "k3", "k2", "k1"],
        "matched_on": ["email", "email", "email", "phone", "phone", "email"],
        "profile_id": ["P3", "P2", "P1", "P9", "P2", "P5"],
        "suppressed": [False, True, True, False, False, False],
    })
    out = unique_keys(keys).collect().sort("key")
    assert out.rows() == [("k1", "email", "P1", True), ("k2", "email", "P2", True),
                          ("k3", "phone", "P9", False)]


def test_profile_keys_unique_or_raw() -> None:
    profiles = pl.LazyFrame({
        "profile_id": ["P2", "P1"], "suppressed": [False, True],
        "email_key": ["e", "e"], "phone_key": ["p2", None],
    })
    raw = profile_keys(profiles, ("email", "phone"), unique=False).collect()
    assert raw.height == 3  # settled later, once over every slice
    assert sorted(profile_keys(profiles, ("email", "phone")).collect().rows()) == [
        ("e", "email", "P1", True), ("p2", "phone", "P2", False)]
