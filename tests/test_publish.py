"""InboundWriter: files split by max_lines_per_file across bucket calls, compressed on a
thread; the same lines and names as writing everything at once."""

from __future__ import annotations

import gzip
import hashlib
import threading
from pathlib import Path

import polars as pl
import pytest

from pipeline.config import DestinationConfig, Location
from pipeline.errors import DeliveryFailed, SchemaError
from pipeline.formats import hex_order
from pipeline.stages.publish import CampaignListWriter, DeliveryKey, InboundWriter
from pipeline.tables import check_output, check_rows

TS = 1764000001  # 2025-11-24
GOLDEN = Path(__file__).parent / "golden"
KEY = DeliveryKey("emails", "ftp_1234_5678_iter_1764000001000", TS)
TAG = 914875  # KEY.tag: pinned, as names must not change between releases


def dest(max_lines: int, gz: bool = True) -> DestinationConfig:
    return DestinationConfig("ec", "aam_inbound", Location("/unused"), dpid=7,
                             traits={1: 11}, max_lines_per_file=max_lines, gzip=gz)


def rows(first: int, count: int) -> pl.DataFrame:
    return pl.DataFrame({"dpuuid": [f"id{n:04d}" for n in range(first, first + count)],
                         "trait_id": [11] * count, "action": ["add"] * count})


def lines(path: Path, gz: bool) -> list[str]:
    data = path.read_bytes()
    return (gzip.decompress(data) if gz else data).decode().splitlines()


def _compress_threads() -> int:
    return sum(t.name.startswith("compress") for t in threading.enumerate())


@pytest.mark.parametrize("gz", [True, False])
def test_split_across_calls(tmp_path: Path, gz: bool) -> None:
    writer = InboundWriter(dest(4, gz), KEY, tmp_path)
    for first, count in [(0, 3), (3, 3), (6, 1), (7, 5)]:  # 12 lines: crosses 4-line files
        writer.add_rows(rows(first, count))
    writer.add_rows(rows(99, 0))
    out = writer.finish()
    suffix = ".gz" if gz else ""
    assert [p for p, _ in out.files] == [
        f"date=2025-11-24/ftp_dpm_7_{TS}.sync.{TAG}00{n}{suffix}" for n in (1, 2, 3)]
    got = [lines(local, gz) for _, local in out.files]
    assert [len(g) for g in got] == [4, 4, 4]
    assert sum(got, []) == [f"id{n:04d}\td_sid=11" for n in range(12)]
    assert out.rows == 12
    assert _compress_threads() == 0
    # the manifest's checksums, kept while writing: those of the files' bytes
    assert out.md5s == {p: hashlib.md5(local.read_bytes()).hexdigest() for p, local in out.files}


def test_one_file_has_the_same_name_and_bytes_as_one_call(tmp_path: Path) -> None:
    many = InboundWriter(dest(100), KEY, tmp_path / "many")
    for first in range(0, 30, 7):
        many.add_rows(rows(first, min(7, 30 - first)))
    one = InboundWriter(dest(100), KEY, tmp_path / "one")
    one.add_rows(rows(0, 30))
    (path_a, local_a), = many.finish().files
    (path_b, local_b), = one.finish().files
    assert path_a == path_b == f"date=2025-11-24/ftp_dpm_7_{TS}.sync.{TAG}001.gz"
    assert lines(local_a, True) == lines(local_b, True)
    assert gzip.decompress(local_a.read_bytes()) == gzip.decompress(local_b.read_bytes())


@pytest.mark.parametrize("block", [1, 3, 5, 1000])
def test_blocks_give_the_same_files(tmp_path: Path, block: int, monkeypatch) -> None:
    """Lines go to the gzip thread in blocks of BLOCK_LINES: the same files and lines
    whatever the block size, across file limits and calls."""
    monkeypatch.setattr("pipeline.stages.publish.BLOCK_LINES", block)
    writer = InboundWriter(dest(4), KEY, tmp_path)
    for first, count in [(0, 6), (6, 7)]:
        writer.add_rows(rows(first, count))
    out = writer.finish()
    got = [lines(local, True) for _, local in out.files]
    assert [len(g) for g in got] == [4, 4, 4, 1]
    assert sum(got, []) == [f"id{n:04d}\td_sid=11" for n in range(13)]


def test_add_by_profile_number_with_or_without_ranks(tmp_path: Path) -> None:
    """Audience rows of numbered profiles: the same lines whether the digests are ranked
    (`email_order`) or must be sorted as strings (ranks null, as after a prefix clash);
    unmapped segments and profiles without an email are counted, not written."""
    import hashlib
    digests = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(50)]
    digests[7] = None  # a profile without an email
    attrs = pl.DataFrame({"profile_id": [f"p{n:02d}" for n in range(50)],
                          "email_key": digests}).with_columns(
        email_order=hex_order(pl.Series(digests)))
    audience = pl.DataFrame({
        "pnum": [n % 50 for n in range(120)], "segment_id": [1 + n % 3 for n in range(120)],
        "action": ["remove" if n % 7 == 0 else "add" for n in range(120)],
    }, schema={"pnum": pl.UInt32, "segment_id": pl.UInt32, "action": pl.String})
    ec = DestinationConfig("ec", "aam_inbound", Location("/unused"), dpid=7,
                           traits={1: 11, 2: 12}, id="email_sha256", gzip=False)
    outs = []
    for name, ranks in (("ranked", attrs), ("strings", attrs.with_columns(
            email_order=pl.lit(None, pl.UInt32)))):
        writer = InboundWriter(ec, KEY, tmp_path / name)
        writer.add(audience, ranks.lazy())
        outs.append(writer.finish())
    (_, ranked), = outs[0].files
    (_, strings), = outs[1].files
    assert ranked.read_bytes() == strings.read_bytes()
    assert outs[0].unmapped_segments == outs[1].unmapped_segments == 40  # segment 3
    assert outs[0].missing_id == outs[1].missing_id > 0
    assert outs[0].rows == 80 - outs[0].missing_id
    got = lines(ranked, False)
    assert len(got) == len({digests[n % 50] for n in range(120) if n % 3 != 2} - {None})
    assert got == sorted(got)  # by DPUUID


def test_no_rows_no_files(tmp_path: Path) -> None:
    out = InboundWriter(dest(10), KEY, tmp_path).finish()
    assert out.files == [] and out.rows == 0


def test_close_after_a_failure_stops_the_thread(tmp_path: Path) -> None:
    writer = InboundWriter(dest(10), KEY, tmp_path)
    writer.add_rows(rows(0, 5))
    with pytest.raises(ValueError, match="DPUUID"):
        writer.add_rows(pl.DataFrame({"dpuuid": [""], "trait_id": [11], "action": ["add"]}))
    writer.close()
    assert _compress_threads() == 0


# --- Campaign list: what is written matches schemas/campaign_list.json ---

def campaign_dest(fmt: str) -> DestinationConfig:
    return DestinationConfig("crm", "campaign_list", Location("/unused"), format=fmt)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_campaign_list_output_matches_its_schema(tmp_path: Path, fmt: str) -> None:
    writer = CampaignListWriter(campaign_dest(fmt), DeliveryKey("emails", "d1", TS), tmp_path)
    writer.add(pl.DataFrame({"profile_id": ["p2", "p1", "p1"], "segment_id": [7, 9, 7],
                             "action": ["add", "remove", "add"],
                             "matched_on": ["email", "email", "phone"]}))
    writer.add(pl.DataFrame({"profile_id": ["p3"], "segment_id": [7], "action": ["add"],
                             "matched_on": ["email"]}))
    out = writer.finish()
    ((path, local),) = out.files
    assert isinstance(local, Path)
    # CSV: the checksum is kept while writing (both appends); Parquet's is read at publish
    assert out.md5s == ({} if fmt == "parquet"
                        else {path: hashlib.md5(local.read_bytes()).hexdigest()})
    table = (pl.read_parquet(local) if fmt == "parquet"
             else pl.read_csv(local, schema_overrides={"profile_id": pl.String}))
    assert table.height == 4
    check_output(table.schema, "campaign_list", "written")
    check_rows(table.lazy(), "campaign_list", "written")


def test_golden_campaign_lists_match_the_schema() -> None:
    for name in ("e2e_campaign.csv", "resolution_campaign.csv", "full_day3_campaign.csv"):
        table = pl.read_csv(GOLDEN / name, schema_overrides={"profile_id": pl.String})
        assert table.height > 0
        check_output(table.schema, "campaign_list", name)
        check_rows(table.lazy(), "campaign_list", name)


@pytest.mark.parametrize("columns, message", [
    ({"segment_id": pl.Int64, "profile_id": pl.String, "action": pl.String,
      "matched_on": pl.String, "delivery": pl.String}, "differ from campaign_list schema"),
    ({"profile_id": pl.String, "segment_id": pl.Int64, "action": pl.String,
      "matched_on": pl.String}, "differ from campaign_list schema"),
    ({"profile_id": pl.String, "segment_id": pl.String, "action": pl.String,
      "matched_on": pl.String, "delivery": pl.String}, "'segment_id' has type String"),
])
def test_campaign_list_schema_refuses_other_columns(columns: dict[str, pl.DataType],
                                                    message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        check_output(pl.Schema(columns), "campaign_list", "campaign list x.csv")


def test_delivery_tags_are_stable_six_digit_and_per_feed_and_root() -> None:
    assert KEY.tag == TAG
    assert DeliveryKey("emails", "ftp_1234_5678_iter_1486140844000", 0).tag == 712060
    tags = {DeliveryKey(feed, f"root{n}", 0).tag for feed in ("a", "b") for n in range(500)}
    assert len(tags) > 990 and all(100_000 <= t <= 999_999 for t in tags)
    assert DeliveryKey("a", "r", 1).tag == DeliveryKey("a", "r", 2).tag  # not from the time


@pytest.mark.parametrize("timestamp", [None, 0, 946_684_799])
def test_a_delivery_without_a_usable_date_gets_no_inbound_file(tmp_path: Path,
                                                               timestamp: int | None) -> None:
    with pytest.raises(DeliveryFailed, match="no usable date"):
        InboundWriter(dest(10), DeliveryKey("emails", "undated", timestamp), tmp_path)
    assert _compress_threads() == 0


def test_more_parts_than_the_split_slot_holds_fail(tmp_path: Path) -> None:
    writer = InboundWriter(dest(1), KEY, tmp_path)
    writer.add_rows(rows(0, 1000))
    with pytest.raises(DeliveryFailed, match="1000 files for one delivery, at most 999"):
        writer.finish()
