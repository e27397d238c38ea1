"""Tests of pipeline.formats: names, control files, segment lines, inbound output."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import date

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline.errors import DeliveryFailed
from pipeline.formats import (
    InfoEntry,
    InfoFile,
    OutboundName,
    group_deliveries,
    hex_order,
    inbound_file_name,
    inbound_folder,
    inbound_lines,
    inbound_pieces,
    info_name,
    parse_info,
    parse_lines,
    parse_outbound_name,
    render_info,
    valid_dpuuid,
)
from pipeline.stages import join

TS = 1486140844000  # 2017-02-03T16:54:04Z

# --------------------------------------------------------------------------------------------
# Outbound names
# --------------------------------------------------------------------------------------------

ID = {"did": "1234", "master_dpid": "5678"}
# (path, root, the fields that are not None/0/False/""); `folder` is derived from the path
NAMES: list[tuple[str, str, dict[str, object]]] = [
    (
        "S3_1234_5678_iter_1486140844000.sync",
        "S3_1234_5678_iter_1486140844000",
        {"sync_type": "S3", **ID, "sync_mode": "iter", "timestamp_ms": TS},
    ),
    (
        "ftp_1234_5678_iter_1486140844000001.sync.gz",
        "ftp_1234_5678_iter_1486140844000",
        {"sync_type": "ftp", **ID, "sync_mode": "iter", "timestamp_ms": TS, "split": 1},
    ),
    (
        "ftp_1234_5678_acme_full_1486140844000-1.sync",
        "ftp_1234_5678_acme_full_1486140844000",
        {"sync_type": "ftp", **ID, "pid_alias": "acme", "sync_mode": "full", "timestamp_ms": TS}
        | {"split": 1},
    ),
    (
        "S3_1234_5678_1486140844000.sync.gz",
        "S3_1234_5678_1486140844000",
        {"sync_type": "S3", **ID, "timestamp_ms": TS},
    ),
    (
        "date=2017-02-03/S3_1234_5678_iter_1486140844000-2.sync.gz",
        "S3_1234_5678_iter_1486140844000",
        {"sync_type": "S3", **ID, "sync_mode": "iter", "timestamp_ms": TS, "split": 2}
        | {"folder_date": date(2017, 2, 3)},
    ),
    (
        "feed/date=2017-02-04/x/ftp_1_2_1486140844000.sync",
        "ftp_1_2_1486140844000",
        {"sync_type": "ftp", "did": "1", "master_dpid": "2", "timestamp_ms": TS}
        | {"folder_date": date(2017, 2, 4)},
    ),
    (
        "1234_5678_iter_1486140844000.sync",
        "1234_5678_iter_1486140844000",
        {**ID, "sync_mode": "iter", "timestamp_ms": TS},
    ),
    (
        "ftp_1234_5678_full.sync",
        "ftp_1234_5678_full",
        {"sync_type": "ftp", **ID, "sync_mode": "full"},
    ),
    (
        "date=2017-02-05/ftp_1234_5678_full-3.sync",
        "ftp_1234_5678_full",
        {"sync_type": "ftp", **ID, "sync_mode": "full", "split": 3}
        | {"folder_date": date(2017, 2, 5)},
    ),
    (
        "FTP_1234_5678_ITER_1486140844000012.sync",
        "FTP_1234_5678_ITER_1486140844000",
        {"sync_type": "ftp", **ID, "sync_mode": "iter", "timestamp_ms": TS, "split": 12},
    ),
    (
        "s3_1234_my_alias_iter_1486140844000.sync",
        "s3_1234_my_alias_iter_1486140844000",
        {"sync_type": "S3", "did": "1234", "pid_alias": "my_alias", "sync_mode": "iter"}
        | {"timestamp_ms": TS},
    ),
    ("1486140844000.sync", "1486140844000", {"timestamp_ms": TS}),
    ("ftp_1486140844000000.sync", "ftp_1486140844000", {"sync_type": "ftp", "timestamp_ms": TS}),
    # OpenPGP-encrypted (SPEC §12): `.pgp` or `.gpg` after `.sync`, the plaintext maybe gzip'd
    ("ftp_1486140844000001.sync.pgp", "ftp_1486140844000",
     {"sync_type": "ftp", "timestamp_ms": TS, "split": 1, "pgp": True}),
    ("S3_1234_1486140844000-2.sync.gpg", "S3_1234_1486140844000",
     {"sync_type": "S3", "did": "1234", "timestamp_ms": TS, "split": 2, "pgp": True}),
    ("1486140844000.sync.gz.pgp", "1486140844000", {"timestamp_ms": TS, "gzip": True,
                                                    "pgp": True}),
]


@pytest.mark.parametrize(("path", "root", "fields"), NAMES, ids=[n[0] for n in NAMES])
def test_parse_outbound_name(path: str, root: str, fields: dict[str, object]) -> None:
    expected: dict[str, object] = {
        "sync_type": None,
        "did": None,
        "master_dpid": None,
        "pid_alias": None,
        "sync_mode": None,
        "timestamp_ms": None,
        "split": 0,
        "gzip": path.endswith(".gz"),
        "folder_date": None,
    }
    expected.update(fields)
    assert parse_outbound_name(path) == OutboundName(
        path=path,
        root=root,
        folder=path.rpartition("/")[0],
        **expected,
    )


@pytest.mark.parametrize(
    "path",
    [
        "S3_1234_5678_iter_1486140844000.info",
        "date=2017-02-03/S3_1234_5678_iter_1486140844000.info",
        "S3_1234_5678_iter_1486140844000.sync.part",
        "S3_1234_5678_iter_1486140844000.sync.gz.tmp",
        "S3_1234_5678_iter_1486140844000.syncx",
        "S3_1234_5678_iter_1486140844000.sync.pgp.part",
        "S3_1234_5678_iter_1486140844000.sync.asc",
        "S3_1234_5678_iter_1486140844000.csv",
        "README",
        ".sync",
        "date=2017-02-03/.sync.gz",
        "ftp__1234_1486140844000.sync",  # empty element
        "ftp_1_2_3_iter_1486140844000.sync",  # a third integer has no slot
        "date=2017-02-03/",
        "S3_1234_5678_iter_1486140844000.sync\n",
    ],
)
def test_parse_outbound_name_rejects(path: str) -> None:
    assert parse_outbound_name(path) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("S3_1_2_iter_1486140844000.sync", date(2017, 2, 3)),
        # timestamp wins over the folder
        ("date=2020-01-01/S3_1_2_iter_1486140844000.sync", date(2017, 2, 3)),
        ("date=2020-01-01/S3_1_2_full.sync", date(2020, 1, 1)),
        ("date=2020-02-30/S3_1_2_full.sync", None),  # impossible date
        ("S3_1_2_full.sync", None),
        ("S3_1_2_iter_1486166399999.sync", date(2017, 2, 3)),  # last ms of the UTC day
        ("S3_1_2_iter_1486166400000.sync", date(2017, 2, 4)),
    ],
)
def test_delivery_date(path: str, expected: date | None) -> None:
    name = parse_outbound_name(path)
    assert name is not None
    assert name.delivery_date == expected


def test_group_deliveries() -> None:
    paths = [
        "date=2017-02-03/S3_1_2_iter_1486140844000-2.sync.gz",
        "S3_1_2_iter_1486140844000002.sync",
        "date=2017-02-03/S3_1_2_iter_1486140844000-10.sync.gz",
        "S3_1_2_iter_1486140844000001.sync",
        "date=2017-02-03/S3_1_2_iter_1486140844000-1.sync.gz",
        "S3_1_2_full_1486140844000.sync",
        "S3_1_2_iter_1486140844000.info",
    ]
    names = [n for p in paths if (n := parse_outbound_name(p)) is not None]
    groups = group_deliveries(names)
    assert list(groups) == [
        ("", "S3_1_2_full_1486140844000"),
        ("", "S3_1_2_iter_1486140844000"),
        ("date=2017-02-03", "S3_1_2_iter_1486140844000"),
    ]
    assert [n.split for n in groups[("date=2017-02-03", "S3_1_2_iter_1486140844000")]] == [
        1,
        2,
        10,
    ]
    assert [n.path for n in groups[("", "S3_1_2_iter_1486140844000")]] == [
        "S3_1_2_iter_1486140844000001.sync",
        "S3_1_2_iter_1486140844000002.sync",
    ]


def test_group_deliveries_empty() -> None:
    assert group_deliveries([]) == {}


# --------------------------------------------------------------------------------------------
# .info control files
# --------------------------------------------------------------------------------------------

MD5_A = "0123456789abcdef0123456789abcdef"
MD5_B = "fedcba9876543210fedcba9876543210"
ROOT = "S3_1_2_iter_1486140844000"
ENTRIES = (
    InfoEntry(f"{ROOT}-1.sync", 120, 10, 1, MD5_A),
    InfoEntry(f"{ROOT}-2.sync", 30, 3, 2, MD5_B),
)
EXPECTED_INFO = InfoFile(
    files=ENTRIES,
    total_byte_size=150,
    total_line_count=13,
    total_file_count=2,
    file_name=f"{ROOT}.sync",
)

STRICT_INFO = json.dumps(
    {
        "Files": [
            {
                "FileName": f"{ROOT}-1.sync",
                "FileByteSize": 120,
                "FileLineCount": 10,
                "FileSequenceNumber": 1,
                "md5": MD5_A.upper(),
            },
            {
                "FileName": f"{ROOT}-2.sync",
                "FileByteSize": 30,
                "FileLineCount": 3,
                "FileSequenceNumber": 2,
                "md5": MD5_B,
            },
        ],
        "Totals": {
            "FileName": f"{ROOT}.sync",
            "TotalByteSize": 150,
            "TotalLineCount": 13,
            "TotalFileCount": 2,
        },
    }
)

# Adobe's documented form: bare keys, with a trailing comma for good measure.
RELAXED_INFO = f"""{{
    Files: [
        {{
            FileLineCount: 10,
            FileName: "{ROOT}-1.sync",
            FileSequenceNumber: 1,
            FileByteSize: 120,
            md5: "{MD5_A}"
        }},
        {{FileLineCount: 3, FileName: "{ROOT}-2.sync", FileSequenceNumber: 2,
          FileByteSize: 30, md5: "{MD5_B}"}},
    ],
    Totals: {{
        FileName: "{ROOT}.sync",
        TotalByteSize: 150,
        TotalLineCount: 13,
        TotalFileCount: 2
    }}
}}"""


@pytest.mark.parametrize("text", [STRICT_INFO, RELAXED_INFO], ids=["strict", "relaxed"])
def test_parse_info(text: str) -> None:
    assert parse_info(text) == EXPECTED_INFO


def test_parse_info_relaxed_keeps_strings_intact() -> None:
    # Colons, braces, quotes and key-like words inside strings must not be touched.
    tricky = 'we:ird {Files: [x]}, "FileName": \\"q\\" key:'
    text = (
        "{Files: [{FileName: "
        + json.dumps(tricky)
        + ", FileByteSize: 1, FileLineCount: 1}],"
        + ' Totals: {FileName: "a:b,}.sync"}}'
    )
    info = parse_info(text)
    assert info.files[0].file_name == tricky
    assert info.file_name == "a:b,}.sync"


def test_parse_info_optional_fields() -> None:
    info = parse_info('{Files: [{FileName: "a.sync", FileByteSize: 0, FileLineCount: 0}]}')
    assert info == InfoFile(
        files=(InfoEntry("a.sync", 0, 0, None, None),),
        total_byte_size=None,
        total_line_count=None,
        total_file_count=None,
        file_name=None,
    )


def _info(**entry: object) -> str:
    base: dict[str, object] = {"FileName": "a.sync", "FileByteSize": 5, "FileLineCount": 1}
    base.update(entry)
    return json.dumps({"Files": [{k: v for k, v in base.items() if v is not None}]})


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("", "not valid JSON"),
        ("{Files: [", "not valid JSON"),
        ("[]", "top level"),
        ("{}", "Files"),
        ('{"Files": []}', "Files"),
        ('{"Files": {}}', "Files"),
        ('{"Files": [1]}', "Files[0]"),
        (_info(FileName=None), "Files[0].FileName"),
        (_info(FileName=""), "Files[0].FileName"),
        (_info(FileName="../x.sync"), "Files[0].FileName"),
        (_info(FileName="a\nb.sync"), "Files[0].FileName"),  # one-line reasons only
        (_info(FileName="a\u2028.sync"), "Files[0].FileName"),
        (_info(FileByteSize=None), "Files[0].FileByteSize"),
        (_info(FileByteSize="5"), "Files[0].FileByteSize"),
        (_info(FileByteSize=-1), "Files[0].FileByteSize"),
        (_info(FileByteSize=True), "Files[0].FileByteSize"),
        (_info(FileByteSize=1.5), "Files[0].FileByteSize"),
        (_info(FileLineCount=None), "Files[0].FileLineCount"),
        (_info(FileSequenceNumber="1"), "Files[0].FileSequenceNumber"),
        (_info(md5="xyz"), "Files[0].md5"),
        (_info(md5=5), "Files[0].md5"),
        (_info(md5=MD5_A + "\n"), "Files[0].md5"),
        (
            '{"Files": [{"FileName": "a.sync", "FileByteSize": 1, "FileLineCount": 1},'
            ' {"FileName": "a.sync", "FileByteSize": 1, "FileLineCount": 1}]}',
            "twice",
        ),
        (_info()[:-1] + ', "Totals": []}', "Totals"),
        (_info()[:-1] + ', "Totals": {"TotalByteSize": 6}}', "Totals.TotalByteSize"),
        (_info()[:-1] + ', "Totals": {"TotalLineCount": 2}}', "Totals.TotalLineCount"),
        (_info()[:-1] + ', "Totals": {"TotalFileCount": 2}}', "Totals.TotalFileCount"),
        (_info()[:-1] + ', "Totals": {"FileName": 3}}', "Totals.FileName"),
    ],
)
def test_parse_info_errors(text: str, field: str) -> None:
    with pytest.raises(DeliveryFailed, match=field.replace("[", r"\[").replace("]", r"\]")) as exc:
        parse_info(text)
    message = str(exc.value)
    assert "\n" not in message
    assert "xyz" not in message  # no content values in the message


def test_render_info_roundtrip() -> None:
    text = render_info(ENTRIES, ROOT)
    assert json.loads(text)["Totals"] == {
        "FileName": f"{ROOT}.sync",
        "TotalByteSize": 150,
        "TotalLineCount": 13,
        "TotalFileCount": 2,
    }
    assert parse_info(text) == EXPECTED_INFO


def test_render_info_golden() -> None:
    text = render_info([InfoEntry("r-1.sync", 7, 2, None, None)], "r")
    assert text == (
        "{\n"
        '  "Files": [\n'
        "    {\n"
        '      "FileName": "r-1.sync",\n'
        '      "FileByteSize": 7,\n'
        '      "FileLineCount": 2,\n'
        '      "FileSequenceNumber": 1\n'
        "    }\n"
        "  ],\n"
        '  "Totals": {\n'
        '    "FileName": "r.sync",\n'
        '    "TotalByteSize": 7,\n'
        '    "TotalLineCount": 2,\n'
        '    "TotalFileCount": 1\n'
        "  }\n"
        "}\n"
    )


def test_info_name() -> None:
    assert info_name(ROOT) == f"{ROOT}.info"


# --------------------------------------------------------------------------------------------
# Segment lines
# --------------------------------------------------------------------------------------------

# line -> (user_id, added, removed, format_error); None for a dropped (blank) line
LINES: dict[str, tuple[str | None, list[int] | None, list[int] | None, str | None] | None] = {
    "u1 1,2,3": ("u1", [1, 2, 3], [], None),
    "u1 1,2 3,4": ("u1", [1, 2], [3, 4], None),
    "u1  5,6": ("u1", [], [5, 6], None),
    "u1 7\r": ("u1", [7], [], None),
    "u1 7,8 9 \t \r": ("u1", [7, 8], [9], None),
    "u1 007,4294967295": ("u1", [7, 4294967295], [], None),
    "u1 2,2": ("u1", [2, 2], [], None),
    "": None,
    "   ": None,
    "\r": None,
    " \t\r": None,
    " 1,2": (None, None, None, "no_user_id"),
    "  ": None,
    "u1": (None, None, None, "no_segments"),
    "u1 \r": (None, None, None, "no_segments"),
    "u1 1 2 3": (None, None, None, "too_many_fields"),
    "u1   5": (None, None, None, "too_many_fields"),
    "u1 1,x": (None, None, None, "bad_segment"),
    "u1 1 x": (None, None, None, "bad_segment"),
    "u1 1,,2": (None, None, None, "bad_segment"),
    "u1 1,": (None, None, None, "bad_segment"),
    "u1 -1": (None, None, None, "bad_segment"),
    "u1 +1": (None, None, None, "bad_segment"),
    "u1 1.5": (None, None, None, "bad_segment"),
    "u1 4294967296": (None, None, None, "bad_segment"),
    "u1 \u0661": (None, None, None, "bad_segment"),  # Arabic-Indic digit one
    "u1 0": (None, None, None, "segment_zero"),
    "u1 1 2,000": (None, None, None, "segment_zero"),
    "u1\t1,2": (None, None, None, "no_segments"),  # the separator is a space, not a tab
}


def _parsed(line: str, line_no: int) -> pl.DataFrame:
    return parse_lines(
        pl.LazyFrame({"line": [line], "file_seq": [1], "line_no": [line_no]})
    ).collect()


@pytest.mark.parametrize(("line_no", "line"), list(enumerate(LINES)))
def test_parse_lines_table(line_no: int, line: str) -> None:
    expected = LINES[line]
    rows = [expected] if expected is not None else []
    want = pl.DataFrame(
        {
            "line": [line] * len(rows),
            "file_seq": [1] * len(rows),
            "line_no": [line_no] * len(rows),
            "user_id": [r[0] for r in rows],
            "added": [r[1] for r in rows],
            "removed": [r[2] for r in rows],
            "format_error": [r[3] for r in rows],
        },
        schema={
            "line": pl.String,
            "file_seq": pl.Int64,
            "line_no": pl.Int64,
            "user_id": pl.String,
            "added": pl.List(pl.UInt32),
            "removed": pl.List(pl.UInt32),
            "format_error": pl.String,
        },
    )
    assert_frame_equal(_parsed(line, line_no), want)


def test_parse_lines_frame() -> None:
    frame = pl.LazyFrame(
        {
            "line": ["a 1,2\r", "", "b  3", " \r", "c 0", "d 4 5"],
            "file_seq": [2, 2, 2, 2, 2, 2],
            "line_no": [1, 2, 3, 4, 5, 6],
        }
    )
    out = parse_lines(frame).collect()
    assert out.columns == [
        "line",
        "file_seq",
        "line_no",
        "user_id",
        "added",
        "removed",
        "format_error",
    ]
    assert_frame_equal(
        out.select("line_no", "user_id", "format_error"),
        pl.DataFrame(
            {
                "line_no": [1, 3, 5, 6],
                "user_id": ["a", "b", None, "d"],
                "format_error": [None, None, "segment_zero", None],
            }
        ),
    )


def test_parse_lines_empty_input_keeps_schema() -> None:
    out = parse_lines(pl.LazyFrame(schema={"line": pl.String, "line_no": pl.UInt32})).collect()
    assert out.schema == pl.Schema(
        {
            "line": pl.String,
            "line_no": pl.UInt32,
            "user_id": pl.String,
            "added": pl.List(pl.UInt32),
            "removed": pl.List(pl.UInt32),
            "format_error": pl.String,
        }
    )
    assert out.height == 0


# --------------------------------------------------------------------------------------------
# merging segments (the rule lives in pipeline.stages.join)
# --------------------------------------------------------------------------------------------


def _merge(rows: list[tuple[str, int, int, list[int] | None, list[int] | None]]) -> pl.DataFrame:
    frame = pl.LazyFrame(
        rows,
        schema={
            "uid": pl.String,
            "file_seq": pl.Int64,
            "line_no": pl.Int64,
            "added": pl.List(pl.UInt32),
            "removed": pl.List(pl.UInt32),
        },
        orient="row",
    )
    return _audience(frame, "uid")


def _audience(frame: pl.LazyFrame, key: str) -> pl.DataFrame:
    """The pipeline's merge rule (stages.join), applied with `key` as the profile."""
    joined = frame.with_columns(profile_id=pl.col(key), matched_on=pl.lit("email"),
                                suppressed=pl.lit(False))
    return (join.audience(joined).select(pl.col("profile_id").alias(key), "segment_id",
                                         "action").collect())


def _expected(rows: list[tuple[str, int, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema={"uid": pl.String, "segment_id": pl.UInt32, "action": pl.String},
        orient="row",
    )


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        pytest.param(
            [("a", 1, 1, [1, 2], []), ("a", 1, 2, [3], [4])],
            [("a", 1, "add"), ("a", 2, "add"), ("a", 3, "add"), ("a", 4, "remove")],
            id="lines-merged",
        ),
        pytest.param(
            [("a", 1, 1, [5], []), ("a", 1, 2, [], [5])],
            [("a", 5, "remove")],
            id="later-line-removes",
        ),
        pytest.param(
            [("a", 1, 2, [], [5]), ("a", 1, 1, [5], [])],
            [("a", 5, "remove")],
            id="input-order-irrelevant",
        ),
        pytest.param(
            [("a", 1, 1, [], [5]), ("a", 1, 2, [5], [])],
            [("a", 5, "add")],
            id="later-line-adds",
        ),
        pytest.param(
            [("a", 2, 1, [5], []), ("a", 1, 900, [], [5])],
            [("a", 5, "add")],
            id="later-file-wins-over-higher-line-number",
        ),
        pytest.param(
            [("a", 1, 900, [5], []), ("a", 2, 1, [], [5])],
            [("a", 5, "remove")],
            id="later-file-removes",
        ),
        pytest.param(
            [("a", 1, 1, [5, 6], [5])],
            [("a", 5, "remove"), ("a", 6, "add")],
            id="removal-wins-within-line",
        ),
        pytest.param(
            [("a", 1, 1, [5], [5]), ("a", 1, 2, [5], [])],
            [("a", 5, "add")],
            id="within-line-then-later-add",
        ),
        pytest.param(
            [("b", 1, 1, [2, 2, 1], []), ("a", 1, 2, [9], []), ("b", 1, 3, [], [3])],
            [("a", 9, "add"), ("b", 1, "add"), ("b", 2, "add"), ("b", 3, "remove")],
            id="sorted-and-deduplicated",
        ),
        pytest.param(
            [("a", 1, 1, None, None), ("a", 1, 2, [1], None)],
            [("a", 1, "add")],
            id="null-lists-ignored",
        ),
        pytest.param([], [], id="empty"),
    ],
)
def test_merge_segments(
    rows: list[tuple[str, int, int, list[int] | None, list[int] | None]],
    expected: list[tuple[str, int, str]],
) -> None:
    assert_frame_equal(_merge(rows), _expected(expected))


def test_merge_segments_after_parse_lines() -> None:
    frame = pl.LazyFrame(
        {
            "line": ["u 1,2 3", "bad 0", "v  1", "u  1\r", "", "u 3"],
            "file_seq": [1, 1, 1, 1, 1, 2],
            "line_no": [1, 2, 3, 4, 5, 1],
        }
    )
    parsed = parse_lines(frame).filter(pl.col("format_error").is_null())
    assert_frame_equal(
        _audience(parsed, "user_id"),
        pl.DataFrame(
            {
                "user_id": ["u", "u", "u", "v"],
                "segment_id": [1, 2, 3, 1],
                "action": ["remove", "add", "add", "remove"],
            },
            schema_overrides={"segment_id": pl.UInt32},
        ),
    )


# --------------------------------------------------------------------------------------------
# AAM inbound output
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((12345, 1486140844, None, False), "ftp_dpm_12345_1486140844.sync"),
        ((12345, 1486140844, None, True), "ftp_dpm_12345_1486140844.sync.gz"),
        ((12345, 1486140844, 1, True), "ftp_dpm_12345_1486140844.sync.1.gz"),
        ((21, 1486140844, 12, False), "ftp_dpm_21_1486140844.sync.12"),
        ((21, 0, 0, False), "ftp_dpm_21_0.sync.0"),
    ],
)
def test_inbound_file_name(args: tuple[int, int, int | None, bool], expected: str) -> None:
    assert inbound_file_name(*args) == expected


@pytest.mark.parametrize("args", [(0, 1, None, False), (1, -1, None, False), (1, 1, -1, False)])
def test_inbound_file_name_rejects(args: tuple[int, int, int | None, bool]) -> None:
    with pytest.raises(ValueError, match="dpid"):
        inbound_file_name(*args)


@pytest.mark.parametrize(
    ("timestamp_s", "expected"),
    [
        (1486140844, "date=2017-02-03"),
        (1486166399, "date=2017-02-03"),
        (1486166400, "date=2017-02-04"),
        (0, "date=1970-01-01"),
    ],
)
def test_inbound_folder(timestamp_s: int, expected: str) -> None:
    assert inbound_folder(timestamp_s) == expected


def _inbound(rows: list[tuple[str, int, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows, schema={"dpuuid": pl.String, "trait_id": pl.Int64, "action": pl.String}, orient="row"
    )


def _lines(*lines: str) -> pl.DataFrame:
    return pl.DataFrame({"line": list(lines)}, schema={"line": pl.String})


def test_inbound_lines_golden() -> None:
    rows = _inbound(
        [
            ("bbb", 9002, "remove"),
            ("aaa", 9002, "add"),
            ("bbb", 9001, "add"),
            ("aaa", 9001, "add"),
            ("ccc", 9003, "remove"),
            ("bbb", 17, "remove"),
            ("bbb", 30000, "add"),
            ("aaa", 9001, "add"),  # duplicate collapses
            ("ddd", 5, "add"),  # a trait added via one segment, removed via another: add wins
            ("ddd", 5, "remove"),
        ]
    )
    assert_frame_equal(
        inbound_lines(rows),
        _lines(
            "aaa\td_sid=9001,d_sid=9002",
            "bbb\td_sid=9001,d_sid=30000,d_unsid=17,d_unsid=9002",
            "ccc\td_unsid=9003",
            "ddd\td_sid=5",
        ),
    )


def test_inbound_pieces_spell_the_same_lines() -> None:
    """The writer's fast path: same lines as inbound_lines, duplicates and add-vs-remove of
    one trait (two segments on one trait, or two profiles sharing a DPUUID) included."""
    rows = _inbound([
        ("ccc", 9003, "remove"), ("aaa", 9002, "remove"), ("bbb", 9001, "add"),
        ("aaa", 9002, "add"), ("aaa", 9001, "remove"), ("aaa", 9003, "add"),
        ("bbb", 9001, "add"), ("ccc", 9001, "remove"), ("aaa", 9002, "remove"),
        ("ccc", 9002, "add"),
    ])
    pieces = inbound_pieces(rows)
    assert pieces["text"].str.join("").item() == "".join(
        f"{line}\n" for line in inbound_lines(rows)["line"])
    assert pieces["text"].str.join("").item() == (
        "aaa\td_sid=9002,d_sid=9003,d_unsid=9001\nbbb\td_sid=9001\n"
        "ccc\td_sid=9002,d_unsid=9001,d_unsid=9003\n")
    assert pieces["line"].to_list() == [0, 0, 0, 1, 2, 2, 2]


@pytest.mark.parametrize("collide", [False, True])
def test_inbound_pieces_hex_order_sorts_like_strings(collide: bool) -> None:
    """SHA-256 DPUUIDs sorted on their first 16 hex digits give the very lines of the string
    sort; two DPUUIDs sharing those digits (`collide`) must not interleave their signals."""
    ids = [hashlib.sha256(str(n).encode()).hexdigest() for n in range(300)]
    if collide:  # same first 16 digits, different rest: only the strings tell them apart
        ids += [ids[0][:16] + "0" * 48, ids[0][:16] + "f" * 48]
    rng = random.Random(7)
    rows = _inbound([(rng.choice(ids), rng.choice([9001, 9002, 9003]),
                      rng.choice(["add", "remove"])) for _ in range(3000)]
                    + ([(ids[-2], 9001, "add"), (ids[-1], 9002, "add"),
                        (ids[-2], 9003, "remove"), (ids[-1], 9001, "remove")]
                       if collide else []))
    order = hex_order(rows["dpuuid"])
    assert order.has_nulls() == collide
    fast = inbound_pieces(rows.with_columns(order=order))
    assert_frame_equal(fast, inbound_pieces(rows))
    text = fast["text"].str.join("").item()
    assert text == "".join(f"{line}\n" for line in inbound_lines(rows)["line"])


def test_inbound_pieces_by_position_equal_the_strings() -> None:
    """Rows naming their DPUUID by position in a table of digests (the writer's numbered
    profiles) give the very pieces of rows carrying the strings; a position without a
    digest is refused, as a missing DPUUID is."""
    table = pl.Series([hashlib.sha256(str(n).encode()).hexdigest() for n in range(200)])
    rng = random.Random(11)
    picks = [(rng.randrange(200), rng.choice([9001, 9002]), rng.choice(["add", "remove"]))
             for _ in range(2000)]
    rows = _inbound([(table[p], t, a) for p, t, a in picks]).with_columns(
        pnum=pl.Series([p for p, _, _ in picks], dtype=pl.UInt32))
    order = hex_order(table).gather(rows["pnum"])
    by_string = inbound_pieces(rows.drop("pnum").with_columns(order=order))
    by_position = inbound_pieces(rows.drop("dpuuid").with_columns(order=order), table)
    assert_frame_equal(by_position, by_string)
    with pytest.raises(ValueError, match="empty DPUUID"):
        inbound_pieces(rows.drop("dpuuid").with_columns(order=order),
                       table.scatter(int(rows["pnum"][0]), None))


def test_inbound_lines_empty() -> None:
    assert_frame_equal(inbound_lines(_inbound([])), _lines())


def test_inbound_lines_one_line_per_dpuuid_by_default() -> None:
    rows = _inbound([("u", t, "add") for t in range(1, 1001)])
    out = inbound_lines(rows)
    assert out.height == 1
    assert out["line"][0].count("d_sid=") == 1000


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([("", 1, "add")], "DPUUID"),
        ([("a\tb", 1, "add")], "DPUUID"),
        ([("a\nb", 1, "add")], "DPUUID"),
        ([(None, 1, "add")], "DPUUID"),
        ([("a", 1, "delete")], "action"),
        ([("a", 1, None)], "action"),
        ([("a", None, "add")], "trait"),
    ],
)
def test_inbound_lines_rejects(rows: list[tuple[str, int, str]], problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as exc:
        inbound_lines(_inbound(rows))
    assert "a\tb" not in str(exc.value)


def test_valid_dpuuid() -> None:
    frame = pl.DataFrame({"dpuuid": ["ok", "", "a\tb", "a\rb", None, "é"]})
    assert frame.select(valid_dpuuid())["dpuuid"].to_list() == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
