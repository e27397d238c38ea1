"""profile_id must be unique in the snapshot: checked bucket by bucket while the index is
numbered (bounded memory), and on the whole table where the export flow loads it."""

from __future__ import annotations

import polars as pl
import pytest

from pipeline.config import Location
from pipeline.errors import SchemaError
from pipeline.snapshot import Snapshots


def _snapshot(tmp_path, ids: list[str]) -> Location:
    path = tmp_path / "snapshot.parquet"
    pl.DataFrame({"profile_id": ids, "email": [f"u{n}@example.com" for n in range(len(ids))],
                  "opt_out": [False] * len(ids)}).write_parquet(path)
    return Location(str(path))


@pytest.mark.parametrize("buckets", [1, 3])
def test_duplicate_profile_ids_stop_the_index(tmp_path, buckets):
    ids = [f"P{n}" for n in range(40)] + ["P7", "P7", "P30"]  # 3 repeats of 2 IDs
    snapshots = Snapshots(_snapshot(tmp_path, ids), None, str(tmp_path / "work"))
    with pytest.raises(SchemaError, match=r"column 'profile_id' has 3 duplicates \(profiles"):
        snapshots.index(None, ("email",), buckets)


@pytest.mark.parametrize("buckets", [1, 3])
def test_unique_profile_ids_pass(tmp_path, buckets):
    snapshots = Snapshots(_snapshot(tmp_path, [f"P{n}" for n in range(40)]), None,
                          str(tmp_path / "work"))
    index = snapshots.index(None, ("email",), buckets)
    assert sum(index.attributes(b).collect().height for b in range(buckets)) == 40


def test_duplicate_profile_ids_stop_the_whole_table_load(tmp_path):
    snapshots = Snapshots(_snapshot(tmp_path, ["P1", "P2", "P1"]), None,
                          str(tmp_path / "work"))
    with pytest.raises(SchemaError, match="column 'profile_id' has 1 duplicates"):
        snapshots.profiles(None)


def test_bucket_counts_share_one_normalization(tmp_path):
    """The first index (3 buckets) splits the normalized table by profile bucket as it is
    written and numbers each split as it is; later indexes of 1 and 5 buckets re-bucket the
    same table. Every count maps each key to the same profile and keeps every profile."""
    ids = [f"P{n}" for n in range(60)]
    snapshots = Snapshots(_snapshot(tmp_path, ids), None, str(tmp_path / "work"))

    def key_to_profile(buckets: int) -> dict[str, str]:
        index = snapshots.index(None, ("email",), buckets)
        attrs = {b: index.attributes(b).collect()["profile_id"] for b in range(buckets)}
        assert sorted(i for a in attrs.values() for i in a) == sorted(ids)
        keys = pl.concat([index.keys(b).collect() for b in range(buckets)])
        return {k: attrs[b][n] for k, b, n in keys.select("key", "pb", "pnum").iter_rows()}

    first = key_to_profile(3)
    folders = sorted(p.name for p in (tmp_path / "work/profiles/normalized").iterdir())
    assert folders == ["b=0", "b=1", "b=2"]  # split while normalized
    assert len(first) == 60
    assert key_to_profile(1) == first
    assert key_to_profile(5) == first
