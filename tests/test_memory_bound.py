"""Memory stays bounded whatever the key distribution and line length (peak RSS measured in
a subprocess), and the shortcuts taken for that give the same records."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from pipeline.cli import main
from pipeline.flows import aam as delivery
from pipeline.formats import MAX_LINE_BYTES, InfoEntry, parse_outbound_name, render_info
from pipeline.stages import ingest, join, resolve
from pipeline.stores.local import LocalStore
from tests.factories import delivery_files, put_all, write_snapshot

RUNNER = Path(__file__).with_name("rss_runner.py")
HOT = "ftp_1_2_iter_1700000000000"
HEALTHY = "ftp_1_2_iter_1700000100000"


def _config(tmp: Path) -> Path:
    cfg = tmp / "c.toml"
    cfg.write_text(f"""
[state]
location = "{tmp}/state"
[profiles]
snapshot = "{tmp}/profiles"
[[feeds]]
name = "emails"
source = "{tmp}/feed"
id_kind = "email"
id_encoding = "plain"
max_reject_ratio = 0.5
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp}/out"
""")
    write_snapshot(tmp / "profiles" / "p.parquet", [
        {"profile_id": "P1", "email": "hot@example.com"},
        {"profile_id": "P2", "email": "ok@example.com"}])
    return cfg


def _put_one_file(tmp: Path, root: str, text: bytes, lines: int) -> None:
    """A gzip'd single-file delivery with a valid control file."""
    feed = LocalStore(str(tmp / "feed"))
    data = gzip.compress(text, 1, mtime=0)
    name = f"{root}-1.sync.gz"
    feed.write_bytes(name, data)
    entry = InfoEntry(name, len(data), lines, 1, hashlib.md5(data).hexdigest())
    feed.write_bytes(f"{root}.info", render_info([entry], root).encode())


def _put_healthy(tmp: Path) -> None:
    put_all(LocalStore(str(tmp / "feed")),
            delivery_files(HEALTHY, [["ok@example.com 111", "nobody@example.com 112"]]))


def _peak_run(tmp: Path, chunk_bytes: int = 1 << 20) -> tuple[int, dict]:
    """(peak RSS in MB, run report) of one run in a fresh process."""
    peak = tmp / "peak"
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(peak), str(chunk_bytes), "run",
         "--config", str(tmp / "c.toml"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    return int(peak.read_text()), json.loads(proc.stdout)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> int:
    """Peak RSS of a run of the healthy delivery alone: interpreter, polars and the rest."""
    tmp = tmp_path_factory.mktemp("baseline")
    _config(tmp)
    _put_healthy(tmp)
    return _peak_run(tmp)[0]


def _by_root(report: dict) -> dict[str, dict]:
    return {d["delivery"]: d for d in report["deliveries"]}


def test_one_hot_key_keeps_memory_bounded(tmp_path, baseline):
    # 1M copies of one line (7 MB of text, 30 kB gzip'd): all in one key bucket and one
    # profile. Before, the whole bucket was joined and merged at once (+~400 MB here, 5.8 GB
    # for 22M lines); now each chunk's repeats collapse to one row per segment.
    lines = 1_000_000
    _config(tmp_path)
    _put_one_file(tmp_path, HOT, b"hot@example.com 111,112 113\n" * lines, lines)
    _put_healthy(tmp_path)
    peak, report = _peak_run(tmp_path)
    hot, healthy = _by_root(report)[HOT], _by_root(report)[HEALTHY]
    assert (hot["status"], hot["records_received"], hot["matched"]) == ("processed", lines, lines)
    assert hot["rows_written"] == {"campaign": 3}
    assert (healthy["status"], healthy["matched"], healthy["unmatched"]) == ("processed", 1, 1)
    assert peak - baseline < 150, (peak, baseline)


def test_one_long_line_keeps_memory_bounded(tmp_path, baseline):
    # One 24 MB line without a line end, then the healthy delivery. Before, the line was held
    # and parsed whole (+~600 MB) and copied whole into quarantine.
    _config(tmp_path)
    _put_one_file(tmp_path, HOT, b"hot@example.com " + b"111," * (6 << 20), 1)
    _put_healthy(tmp_path)
    peak, report = _peak_run(tmp_path)
    hot, healthy = _by_root(report)[HOT], _by_root(report)[HEALTHY]
    assert (hot["status"], hot["records_received"], hot["format_errors"]) == ("failed", 1, 1)
    assert (healthy["status"], healthy["matched"]) == ("processed", 1)
    rows = list(csv.DictReader((tmp_path / f"state/quarantine/emails/{HOT}.csv").open()))
    assert [(r["line_no"], r["reason"]) for r in rows] == [("1", "line_too_long")]
    assert rows[0]["line"].startswith("hot@example.com 111,") and len(rows[0]["line"]) == 1024
    assert peak - baseline < 150, (peak, baseline)


def _read(data: bytes, gz: bool, tmp: Path, chunk_bytes: int) -> pl.DataFrame:
    """Every chunk of one file, read through the same code as a delivery's files."""
    name = parse_outbound_name(f"{HOT}.sync" + (".gz" if gz else ""))
    assert name is not None
    store = LocalStore(str(tmp))
    store.write_bytes(name.path, gzip.compress(data, mtime=0) if gz else data)
    file = ingest.DeliveryFile(name, store.list()[0].size)
    return pl.concat(ingest._file_chunks(store, file, 1, chunk_bytes))


@pytest.mark.parametrize("gz", [False, True])
def test_long_lines_are_cut_and_numbered(gz, tmp_path):
    wide = "é" * (1 << 20)  # 2-byte characters: cut at a character boundary
    huge = "h@x.com " + "5," * (3 << 20)  # 6 MB: longer than what the reader holds of a line
    lines = ["a@x.com 1", "b@x.com " + "2," * MAX_LINE_BYTES, "c@x.com 3", wide,
             "x" * MAX_LINE_BYTES, huge, "d@x.com 4", huge[:-1]]  # the file ends in a line
    data = "\n".join(lines).encode() + b"\n" + b"\x80" * (2 << 20) + b"\ne@x.com 5"
    frame = _read(data, gz, tmp_path, chunk_bytes=4096)  # line 9: no UTF-8 at all
    assert frame["line_no"].to_list() == list(range(1, 11))
    assert frame["line"][9] == "e@x.com 5"
    assert len(frame["line"][8]) > MAX_LINE_BYTES // 4  # replacement characters, not lost
    got = frame["line"].to_list()[:8]
    for i in (0, 2, 4, 6):
        assert got[i] == lines[i]
    for i in (1, 3, 5, 7):  # kept: a prefix over the limit; held: never much more
        assert lines[i].startswith(got[i])
        assert MAX_LINE_BYTES < len(got[i].encode()) <= ingest._PIECE + MAX_LINE_BYTES + 4
    for i in (3, 5, 7):  # arrived across reads: cut to the limit as it streamed
        assert len(got[i].encode()) <= MAX_LINE_BYTES + 4
    errors = resolve.parse(frame.lazy()).collect()["format_error"].to_list()
    assert errors == [None, "line_too_long", None, "line_too_long", "no_segments",
                      "line_too_long", None, "line_too_long", "line_too_long", None]


@pytest.mark.parametrize("inflate_in", [1, 7, 4096, 64 << 10])
def test_multi_member_gzip_read_whole_across_inflate_slices(tmp_path, monkeypatch, inflate_in):
    """gzip members (as `cat a.gz b.gz` makes them) end anywhere in the slices the reader
    inflates at a time: every line comes out once, in order; a bomb-like member still comes
    out in bounded pieces."""
    monkeypatch.setattr(ingest, "_INFLATE_IN", inflate_in)
    lines = [f"u{i}@x.com {i % 7 + 1}" for i in range(3000)]
    text = ("\n".join(lines) + "\n").encode()
    cuts = [0, 1, 50, 1000, 2999, 3000]
    members = [("\n".join(lines[a:b]) + "\n").encode()
               for a, b in zip(cuts, cuts[1:], strict=False)]
    bomb = b"z" * (3 << 20)  # 3 MB of one byte: a few kB gzip'd
    data = b"".join(gzip.compress(m, mtime=0) for m in [*members, bomb + b"\n"])
    name = parse_outbound_name(f"{HOT}.sync.gz")
    assert name is not None
    store = LocalStore(str(tmp_path))
    store.write_bytes(name.path, data)
    file = ingest.DeliveryFile(name, len(data))
    with store.open_read(name.path) as stream:
        pieces = list(ingest._content(stream.read, file, "f", None, 1 << 16))
    assert b"".join(pieces) == text + bomb + b"\n"
    assert max(map(len, pieces)) <= 1 << 16
    frame = pl.concat(ingest._file_chunks(store, file, 1, 1 << 20))
    assert frame["line"].to_list()[:-1] == lines


REPEATS = [
    # file 1: alice's segment 1 added then removed by a later line, 2 removed and re-added,
    # 3 added and removed in one line (the removal wins); bob mostly repeats one line, then
    # removes it (and file 2 adds it back).
    ["alice@example.com 1,2", "bob@example.com 1", "alice@example.com 3 2",
     "bob@example.com 1", "alice@example.com 2,3 1,3", "bob@example.com 1",
     "carol@example.com 4", "bob@example.com 1", "bob@example.com  1"],
    # file 2: later than every line of file 1; unknown@ matches no profile.
    ["alice@example.com 1", "bob@example.com 1", "unknown@example.com 5", "bob@example.com 2",
     "unknown@example.com 5", "bob@example.com 3", "bob@example.com 3"],
]
EXPECTED = [  # campaign rows: profile, segment, action
    ("P1", "1", "add"), ("P1", "2", "add"), ("P1", "3", "remove"),
    ("P2", "1", "add"), ("P2", "2", "add"), ("P2", "3", "add"),
    ("P3", "4", "add"),
]


def _repeats_run(tmp: Path, tag: str, capsys) -> tuple[dict, list[tuple[str, ...]]]:
    folder = tmp / tag
    put_all(LocalStore(str(folder / "feed")), delivery_files(HOT, REPEATS))
    write_snapshot(folder / "profiles" / "p.parquet", [
        {"profile_id": f"P{i}", "email": f"{n}@example.com"}
        for i, n in enumerate(["alice", "bob", "carol"], start=1)])
    cfg = _config_text(folder)
    assert main(["run", "--config", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["deliveries"][0]
    out = sorted(p for p in (folder / "out").rglob("*.csv"))
    rows = [tuple(r[:1] + r[1:3]) for p in out for r in list(csv.reader(p.open()))[1:]]
    return report, sorted(rows)


def _config_text(folder: Path) -> Path:
    cfg = folder / "c.toml"
    cfg.write_text(f"""
[state]
location = "{folder}/state"
[profiles]
snapshot = "{folder}/profiles"
[[feeds]]
name = "emails"
source = "{folder}/feed"
id_kind = "email"
id_encoding = "plain"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{folder}/out"
""")
    return cfg


def test_repeats_collapsed_and_batched_give_the_same_records(tmp_path, capsys, monkeypatch):
    plain, rows = _repeats_run(tmp_path, "plain", capsys)
    assert (plain["records_received"], plain["matched"], plain["unmatched"]) == (16, 14, 2)
    assert rows == EXPECTED
    # Every chunk mostly repeats (so collapses), buckets are read in batches of 2 rows and
    # merged in batches of 3 mentions: same counts, same records.
    monkeypatch.setattr(ingest, "CHUNK_BYTES", 128)
    monkeypatch.setattr(delivery, "ROWS_PER_BATCH", 2)
    monkeypatch.setattr(delivery, "MENTIONS_PER_BATCH", 3)
    collapsed = []
    real = join.collapse_repeats

    def spy(frame: pl.DataFrame) -> pl.DataFrame:
        out = real(frame)
        collapsed.append(out.height < frame.height)
        return out

    monkeypatch.setattr(join, "collapse_repeats", spy)
    small, small_rows = _repeats_run(tmp_path, "small", capsys)
    assert any(collapsed) and not all(collapsed)
    assert small_rows == EXPECTED
    assert {k: small[k] for k in ("records_received", "matched", "unmatched")} == \
        {k: plain[k] for k in ("records_received", "matched", "unmatched")}


def test_collapse_repeats_keeps_the_winning_mention():
    frame = pl.DataFrame({
        "key": ["k", "k", "j", "k"], "file_seq": [1, 1, 1, 2], "line_no": [1, 2, 3, 1],
        "added": [[1, 2], [3], [1], [1]], "removed": [[], [1, 3], [], []],
    }, schema_overrides={"file_seq": pl.UInt32, "line_no": pl.UInt32,
                         "added": pl.List(pl.UInt32), "removed": pl.List(pl.UInt32)})
    out = join.collapse_repeats(frame).sort("key", "file_seq", "line_no")
    assert out.rows() == [
        ("j", 1, 3, [1], [], 1),
        ("k", 1, 1, [2], [], 0),  # 2: added once
        ("k", 1, 2, [], [3], 0),  # 3: added and removed in one line, the removal wins
        ("k", 2, 1, [1], [], 3),  # 1: removed on line 2, added again in file 2; 3 lines of k
    ]
