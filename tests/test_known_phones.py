"""Reusing the snapshot's phone results never changes a normalization."""

import polars as pl
from polars.testing import assert_frame_equal

from pipeline import identity
from pipeline.stages.join import known_phones, profile_table

PROFILES = pl.DataFrame({
    "profile_id": ["P1", "P2", "P3", "P4"],
    "phone": ["06 12 34 56 78", "0612345679", "+1 415 555 0100", "12"],
    "country": ["FR", "fr", None, "DE"],
})
ASKED = pl.DataFrame({"p": [
    "06 12 34 56 78", "0612345678", "+33612345678", "0612345679", "+14155550100",
    "4155550100", "12", "0612345680", None, "not a phone", "06 12 34 56 78"]})


def test_known_phones_give_the_same_results():
    table = profile_table(PROFILES.lazy(), "FR", ("phone",))
    known = known_phones(table).collect()
    assert known.height == 3  # the invalid "12" is not a known result
    for region in ("FR", "US"):
        fast = ASKED.select(identity.normalize_phone(pl.col("p"), region, known))
        slow = ASKED.select(identity.normalize_phone(pl.col("p"), region))
        assert_frame_equal(fast, slow)
    assert fast["p"].to_list()[2] == "+33612345678"


def test_process_pool_gives_the_same_results(monkeypatch):
    numbers = pl.DataFrame({"p": [f"06{i:08d}" for i in range(40)] + ["12", None]})
    serial = numbers.select(identity.normalize_phone(pl.col("p"), "FR"))
    monkeypatch.setattr(identity, "PARALLEL_MIN", 10)
    parallel = numbers.select(identity.normalize_phone(pl.col("p"), "FR"))
    assert_frame_equal(parallel, serial)
