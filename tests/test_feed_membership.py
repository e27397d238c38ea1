"""Feed membership (SPEC §11): the per-bucket mirror rule and the versioned store."""

from __future__ import annotations

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline.config import FeedConfig, Location
from pipeline.errors import DeliveryFailed
from pipeline.flows import aam
from pipeline.membership import (
    DAY_MS,
    FeedMembership,
    FeedVersion,
    empty_members,
    mirror,
    write_members,
)
from pipeline.spill import Spill, text_bucket
from pipeline.stores import open_store


def members(*pairs: tuple[str, int]) -> pl.DataFrame:
    return pl.DataFrame({"profile_id": [p for p, _ in pairs], "segment_id": [s for _, s in pairs]},
                        schema={"profile_id": pl.String, "segment_id": pl.UInt32})


def audience(*rows: tuple[str, int, str]) -> pl.DataFrame:
    return pl.DataFrame(
        {"profile_id": [r[0] for r in rows], "segment_id": [r[1] for r in rows],
         "action": [r[2] for r in rows], "matched_on": ["email"] * len(rows)},
        schema={"profile_id": pl.String, "segment_id": pl.UInt32, "action": pl.String,
                "matched_on": pl.String})


PAIR = ["profile_id", "segment_id"]
OLD = members(("P1", 111), ("P1", 112), ("P2", 111), ("P3", 113))
TODAY = audience(("P1", 111, "add"), ("P2", 111, "remove"), ("P4", 112, "add"))


@pytest.mark.parametrize(("full", "after", "leavers", "removed"), [
    # iter: adds enter, removes leave, unmentioned pairs stay
    (False, [("P1", 111), ("P1", 112), ("P3", 113), ("P4", 112)], [], 1),
    # full: only the added pairs stay; unmentioned old pairs leave (P2/111 is already a
    # `remove` row of the audience, so it is not a leaver again)
    (True, [("P1", 111), ("P4", 112)], [("P1", 112), ("P3", 113)], 3),
])
def test_mirror(full, after, leavers, removed):
    result = mirror(TODAY, OLD, full)
    assert_frame_equal(result.members.sort(PAIR), members(*after))
    assert result.leavers.sort(PAIR).to_dicts() == [
        {"profile_id": p, "segment_id": s, "action": "remove", "matched_on": None}
        for p, s in leavers]
    assert result.removed == removed


def test_mirror_from_empty_and_to_empty():
    first = mirror(TODAY, empty_members(), full=True)
    assert first.members.height == 2 and first.leavers.is_empty() and first.removed == 0
    gone = mirror(audience(), OLD, full=True)  # an empty full delivery: everybody leaves
    assert gone.members.is_empty() and gone.removed == OLD.height
    assert gone.leavers.height == OLD.height
    same = mirror(audience(), OLD, full=False)
    assert_frame_equal(same.members.sort(PAIR), OLD.sort(PAIR))
    assert same.leavers.is_empty() and same.removed == 0


def _random_bucket(seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(audience, old members) of one bucket: overlapping pairs, adds and removes."""
    def pairs(n: int, s: int) -> pl.DataFrame:
        return pl.DataFrame({"p": [f"P{i}" for i in range(n)]}).select(
            profile_id=pl.col("p").sample(n, with_replacement=True, seed=s),
            segment_id=pl.int_range(n).shuffle(seed=s + 1).mod(4).cast(pl.UInt32),
        ).unique(maintain_order=True)
    old = pairs(400, seed)
    today = pairs(300, seed + 7).with_columns(
        action=pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.lit("remove"))
        .otherwise(pl.lit("add")), matched_on=pl.lit("email"))
    return today, old


@pytest.mark.parametrize("full", [False, True])
def test_mirror_order_depends_only_on_the_resulting_membership(full, tmp_path):
    """Parts are compared byte for byte (crash and backfill tests): the same pairs in any
    input order give the same frame and the same file."""
    today, old = _random_bucket(1)
    first = mirror(today, old, full)
    again = mirror(today.sample(fraction=1.0, shuffle=True, seed=2),
                   old.sample(fraction=1.0, shuffle=True, seed=3), full)
    assert_frame_equal(first.members, again.members)
    assert first.removed == again.removed and first.leavers.height == again.leavers.height
    write_members(first.members, tmp_path / "a.parquet", ordered=True)
    write_members(first.members.sort(PAIR, descending=True), tmp_path / "b.parquet")
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


@pytest.mark.parametrize("full", [False, True])
def test_mirror_exact_when_distinct_pairs_share_a_hash(full, monkeypatch):
    """A weak hash (the segment alone) makes most pairs collide: results stay exact and
    ordered by the pairs, whatever the input order."""
    today, old = _random_bucket(4)
    strong = mirror(today, old, full)
    monkeypatch.setattr("pipeline.membership.pair_hash",
                        lambda profile_id, segment_id: segment_id.cast(pl.UInt64))
    weak = mirror(today, old, full)
    assert_frame_equal(weak.members, strong.members.sort(PAIR))
    assert_frame_equal(weak.leavers.sort(PAIR), strong.leavers.sort(PAIR))
    assert weak.removed == strong.removed
    shuffled = mirror(today.sample(fraction=1.0, shuffle=True, seed=5), old, full)
    assert_frame_equal(shuffled.members, weak.members)


def test_write_members_orders_by_pairs_when_distinct_pairs_share_a_hash(tmp_path, monkeypatch):
    """Parts written from unordered pairs: hash order normally; with a shared hash, pair
    order; either way the same bytes whatever the input order."""
    today, old = _random_bucket(6)
    pairs = pl.concat([old, today.select(PAIR)]).unique()
    write_members(pairs, tmp_path / "strong.parquet")
    strong = pl.read_parquet(tmp_path / "strong.parquet")
    assert strong.sort(PAIR).equals(pairs.sort(PAIR)) and not strong.equals(pairs.sort(PAIR))
    monkeypatch.setattr("pipeline.membership.pair_hash",
                        lambda profile_id, segment_id: segment_id.cast(pl.UInt64))
    write_members(pairs, tmp_path / "a.parquet")
    write_members(pairs.sample(fraction=1.0, shuffle=True, seed=7), tmp_path / "b.parquet")
    assert pl.read_parquet(tmp_path / "a.parquet").equals(pairs.sort(PAIR))
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()


def _save(fm: FeedMembership, tmp_path, delivery: str, ts: int, frame: pl.DataFrame,
          buckets: int = 2, tag: str = "run1", retention: int = 35):
    parts = {}
    split = frame.with_columns(_b=text_bucket(pl.col("profile_id"), buckets))
    for (b,), rows in split.partition_by("_b", as_dict=True, include_key=False).items():
        parts[b] = tmp_path / tag / delivery / f"{b}.parquet"
        write_members(rows, parts[b])
    return fm.save(delivery, ts, buckets, parts, tag, retention)


def _loaded(fm: FeedMembership, version, buckets: int, tmp_path) -> pl.DataFrame:
    spill = Spill(tmp_path / f"spill-{buckets}")
    spill.clear()
    fm.load(version, buckets, spill)
    frames = []
    for b in range(buckets):
        part = spill.scan("members", b)
        if part is not None:
            rows = part.collect()
            assert rows.select(text_bucket(pl.col("profile_id"), buckets).unique()
                               ).to_series().to_list() == [b]  # every pair in its bucket
            frames.append(rows)
    return pl.concat(frames).sort("profile_id", "segment_id") if frames else empty_members()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_store_round_trip_rebucketed(where, tmp_path, request):
    url = str(tmp_path / "state") if where == "local" else \
        f"s3://{request.getfixturevalue('make_bucket')()}/state/"
    store = open_store(url)
    fm = FeedMembership(store, "aam feed/1")  # any name: folder_name makes it one segment
    assert fm.head().newest is None
    many = members(*[(f"P{i}", 100 + i % 3) for i in range(50)])
    version = _save(fm, tmp_path, "d1", 1_000, many, buckets=3)
    assert (version.pairs, fm.head().newest) == (50, version)
    for buckets in (3, 4):  # same and another bucket count
        assert_frame_equal(_loaded(fm, version, buckets, tmp_path),
                           many.sort("profile_id", "segment_id"))
    assert _loaded(fm, None, 2, tmp_path).is_empty()
    store.close()


def test_versions_order_replace_and_orphans(tmp_path):
    store = open_store(str(tmp_path / "state"))
    fm = FeedMembership(store, "emails")
    v1 = _save(fm, tmp_path, "d1", 1 * DAY_MS, members(("P1", 1)))
    v2 = _save(fm, tmp_path, "d2", 2 * DAY_MS, members(("P1", 1), ("P2", 2)))
    head = fm.head()
    assert head.versions == (v1, v2)
    assert head.before(v2.order) == v1 and head.before(v1.order) is None
    assert head.has_state_before(1 * DAY_MS)  # nothing deleted: before d1 it was empty
    # A replay of d1 (backfill) writes a new folder and replaces d1's version in HEAD.
    v1b = _save(fm, tmp_path, "d1", 1 * DAY_MS, members(("P9", 9)), tag="run2")
    assert fm.head().versions == (v1b, v2)
    # An unnamed folder (crash before HEAD) is removed by the next save.
    store.write_bytes(f"{fm.folder}/crashed/part-00000.parquet", b"x")
    _save(fm, tmp_path, "d3", 3 * DAY_MS, members(), tag="run3")
    folders = {e.path.split("/")[2] for e in store.list(fm.folder + "/")}
    assert folders == {"HEAD.json", *(v.folder for v in fm.head().versions if v.parts)}
    assert v1.folder not in folders and "crashed" not in folders
    assert fm.head().newest.pairs == 0 and fm.head().newest.parts == ()


def test_retention_deletes_old_versions_and_refuses_state_before_them(tmp_path):
    store = open_store(str(tmp_path / "state"))
    fm = FeedMembership(store, "emails")
    for day in (1, 2, 3, 10):
        _save(fm, tmp_path, f"d{day}", day * DAY_MS, members(("P1", day)), retention=7)
    head = fm.head()
    assert [v.delivery for v in head.versions] == ["d3", "d10"]  # d1, d2 are older than 7 days
    assert head.pruned
    assert not head.has_state_before(3 * DAY_MS)  # would need d2, deleted
    assert head.has_state_before(3 * DAY_MS + 1)
    kept = {e.path.split("/")[2] for e in store.list(fm.folder + "/")}
    assert kept == {"HEAD.json", *(v.folder for v in head.versions)}


@pytest.mark.parametrize(("removed", "ratio", "fails"), [
    (5, 0.5, False),  # exactly the ratio: allowed (strictly more fails)
    (6, 0.5, True),
    (10, 1.0, False),
])
def test_removal_valve_is_strict(removed, ratio, fails):
    feed = FeedConfig("emails", Location("/unused"), max_removal_ratio=ratio)
    base = FeedVersion("d1", 1, 10, 1, "v")
    mirrored = aam.Mirroring({}, removed=removed)
    if fails:
        with pytest.raises(DeliveryFailed, match=f"remove {removed} of 10 .*max_removal_ratio"):
            aam._check_removals(feed, base, mirrored)
    else:
        aam._check_removals(feed, base, mirrored)
    aam._check_removals(feed, None, aam.Mirroring({}, removed=0))  # first delivery: no base


@pytest.mark.parametrize("full", [False, True])
def test_mirror_bucket_without_membership_writes_what_mirror_would(full, tmp_path):
    """A bucket with no membership yet skips the mirror: the part written is byte for byte
    the one `mirror` against an empty membership gives; the audience is in profile_id order
    (profile numbers follow profile_id's string order: P10 sorts before P2)."""
    attrs = pl.DataFrame({"profile_id": ["P1", "P10", "P2"]})
    work = Spill(tmp_path / "work")
    order = [10 * 8, 11 * 8, 12 * 8, 14 * 8, 16 * 8]  # (line order + removal) * 8: odd removes
    work.write("mentions", pl.DataFrame(
        {"pnum": [2, 0, 1, 1, 0], "segment_id": [7, 7, 9, 3, 3], "order": order},
        schema={"pnum": pl.UInt32, "segment_id": pl.UInt32, "order": pl.UInt64}))
    part = tmp_path / "fast.parquet"
    rows, leavers, removed = aam.mirror_bucket(work, 0, full, part, attrs)
    assert (leavers, removed) == (0, 0)
    assert rows is not None
    assert rows.select("profile_id", "segment_id").rows() == [
        ("P1", 3), ("P1", 7), ("P10", 3), ("P10", 9), ("P2", 7)]
    expected = tmp_path / "mirror.parquet"
    write_members(mirror(rows.drop("pnum"), empty_members(), full).members, expected)
    assert part.read_bytes() == expected.read_bytes()
    assert sorted(pl.read_parquet(part).rows()) == [("P1", 3), ("P10", 3), ("P10", 9),
                                                    ("P2", 7)]
