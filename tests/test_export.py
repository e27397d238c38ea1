"""Campaign -> Experience Cloud export feeds (SPEC §10): names, reading, diff, state, end to end."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from pipeline.cli import main
from pipeline.errors import DeliveryFailed, FatalError, IncompleteDelivery
from pipeline.membership import MembershipState, diff, folder_name
from pipeline.stages import export
from pipeline.stores import Store, StoreOptions, open_store

REPO = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden"
RUNNER = REPO / "tests" / "export_crash_runner.py"
DAY1, DAY2, DAY3 = 1709283600, 1709370000, 1709456400  # 2024-03-01/02/03 09:00 UTC
VIP, CHURN = "VIP Customers", "Churn Risk"
EXPORTS = {
    DAY1: [(VIP, "P1"), (VIP, "P2"), (VIP, "P3"), (VIP, "P7"), (VIP, "P8"),
           (CHURN, "P4"), (CHURN, "P5"), (CHURN, "P99")],
    # P2 left VIP, P3 opted out, P4 moved from Churn to VIP, P6 joined Churn, a bad row.
    DAY2: [(VIP, "P1"), (VIP, "P3"), (VIP, "P4"), (VIP, "P8"), (CHURN, "P5"), (CHURN, "P6"),
           (CHURN, "")],
    DAY3: [(VIP, "P1"), (VIP, "P2"), (CHURN, "P5")],
}


def email(pid: str) -> str:
    return f"{pid.lower()}@example.com"


def sha(pid: str) -> str:
    return hashlib.sha256(email(pid).encode()).hexdigest()


def profiles(opted_out: set[str]) -> pl.DataFrame:
    ids = [f"P{i}" for i in range(1, 9)]
    return pl.DataFrame({
        "profile_id": ids,
        "email": [None if p == "P8" else email(p) for p in ids],  # P8: no email
        "opt_out": [p in opted_out for p in ids],
    })


def export_csv(rows: list[tuple[str, str]]) -> bytes:
    return ("audience,profile_id\n" + "".join(f"{a},{p}\n" for a, p in rows)).encode()


# --------------------------------------------------------------------------------------------
# Names and order
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "root", "timestamp", "day"), [
    ("aud_1709370000.csv", "aud_1709370000", 1709370000, date(2024, 3, 2)),
    ("x/aud_1709370000123.parquet", "x/aud_1709370000123", 1709370000, date(2024, 3, 2)),
    ("aud_20240302093000.csv.gz", "aud_20240302093000", 1709371800, date(2024, 3, 2)),
    ("date=2024-03-02/aud_1709283600.CSV", "date=2024-03-02/aud_1709283600", 1709283600,
     date(2024, 3, 1)),  # a timestamp in the name wins over the folder
])
def test_export_file_takes_its_timestamp_from_the_name(path, root, timestamp, day):
    f = export.export_file(path, 10)
    assert (f.root, f.timestamp_s, f.date) == (root, timestamp, day)


@pytest.mark.parametrize(("path", "day"), [
    ("date=2024-03-02/aud.csv", date(2024, 3, 2)),
    ("aud_20240302.csv", date(2024, 3, 2)),
    ("aud.csv", None),
    ("aud_20241399.csv", None),  # not a date: ignored
])
def test_date_only_names_get_a_stable_offset_within_their_day(path, day):
    f = export.export_file(path, 10)
    midnight = 1709337600 if day else 0
    assert f.date == day
    assert midnight <= f.timestamp_s < midnight + 86_400
    assert export.export_file(path, 99).timestamp_s == f.timestamp_s  # not from size/mtime


def test_two_exports_of_one_day_never_share_an_output_name():
    a = export.export_file("date=2024-03-02/vip.csv", 1)
    b = export.export_file("date=2024-03-02/churn.csv", 1)
    assert a.timestamp_s != b.timestamp_s


def test_find_exports_orders_files_and_flags_clashing_roots(tmp_path):
    store = open_store(str(tmp_path))
    for name in ["b_1709370000.csv", "a_1709283600.parquet", "c.csv", "c.parquet", "notes.txt",
                 "date=2024-03-02/d.csv.gz"]:
        store.write_bytes(name, b"x\n")
    found = export.find_exports(store)
    assert [f.path for f in found][:2] == ["c.csv", "c.parquet"]  # no date: timestamp < 1 day
    assert [f.path for f in found][2:] == ["a_1709283600.parquet", "b_1709370000.csv",
                                           "date=2024-03-02/d.csv.gz"]
    assert all(f.problem for f in found[:2]) and not any(f.problem for f in found[2:])


# --------------------------------------------------------------------------------------------
# Reading and validation
# --------------------------------------------------------------------------------------------


def test_csv_rows_are_trimmed_and_bad_rows_get_a_reason():
    data = ("\ufeffAudience ; Profile_ID\r\n"
            "VIP ; P1 \r\n\r\n; P2\nVIP;\nVIP;P3;extra\nVIP;P4\n").encode() + b"VIP;P\xff5\n"
    rows = export.read_export(data, export.export_file("e_1709370000.csv", len(data)))
    expected = pl.DataFrame({
        "line_no": [2, 4, 5, 6, 7, 8],
        "audience": ["VIP", None, "VIP", "VIP", "VIP", "VIP"],
        "profile_id": ["P1", "P2", None, "P3", "P4", "P\ufffd5"],
        "reject": [None, "no_audience", "no_profile_id", "too_many_fields", None, "bad_utf8"],
    }, schema_overrides={"line_no": pl.UInt64})
    assert_frame_equal(rows.with_columns(pl.col("audience").replace("", None)), expected)


def test_parquet_export_accepts_integer_profile_ids():
    buf = io.BytesIO()
    pl.DataFrame({"audience": ["VIP", None], "profile_id": [7, 8]}).write_parquet(buf)
    rows = export.read_export(buf.getvalue(), export.export_file("e.parquet", 1))
    assert rows["profile_id"].to_list() == ["7", "8"]
    assert rows["reject"].to_list() == [None, "no_audience"]
    assert rows["line_no"].to_list() == [1, 2]


def test_gzip_csv_is_read():
    data = gzip.compress(export_csv([(VIP, "P1")]))
    rows = export.read_export(data, export.export_file("e.csv.gz", len(data)))
    assert rows.select("audience", "profile_id").row(0) == (VIP, "P1")


@pytest.mark.parametrize(("data", "error", "message"), [
    (b"audience,id\nVIP,P1\n", DeliveryFailed, "required column 'profile_id' is missing"),
    (b"audience,profile_id\nVIP,P1", IncompleteDelivery, "does not end with a line break"),
    (b"", IncompleteDelivery, "empty file"),
    (b"audience,audience,profile_id\n", DeliveryFailed, "names a column twice"),
])
def test_unusable_csv_is_refused_as_a_whole(data, error, message):
    with pytest.raises(error, match=message):
        export.read_export(data, export.export_file("e.csv", len(data)))


def test_unreadable_parquet_is_refused():
    with pytest.raises(DeliveryFailed, match="not readable Parquet"):
        export.read_export(b"PAR1 truncated", export.export_file("e.parquet", 14))


# --------------------------------------------------------------------------------------------
# Resolution, counts, membership (frames only)
# --------------------------------------------------------------------------------------------


def _profile_table(opted_out: set[str]) -> pl.LazyFrame:
    from pipeline.stages.join import profile_table

    return profile_table(profiles(opted_out).lazy(), None)


def test_counts_follow_the_accounting_invariant():
    rows = pl.LazyFrame({"line_no": [2, 3, 4, 5, 6], "audience": ["A"] * 5,
                         "profile_id": ["P1", "P7", "P99", None, "P8"],
                         "reject": [None, None, None, "no_profile_id", None]})
    resolved = export.resolve(rows, _profile_table({"P7"}), ["email_key"]).collect()
    counts = export.count(resolved)
    assert counts == {"records_received": 5, "format_errors": 1, "matched": 3, "unmatched": 1,
                      "suppressed": 1}
    assert counts["records_received"] == (counts["format_errors"] + counts["matched"]
                                          + counts["unmatched"])


def test_members_drop_suppressed_and_profiles_without_the_dpuuid():
    from pipeline.config import DestinationConfig, Location

    dest = DestinationConfig("ec", "aam_inbound", Location("x"), dpid=1, id="email_sha256",
                             audiences={"A": 11})
    rows = pl.LazyFrame({"line_no": [1, 2, 3, 4], "audience": ["A"] * 4,
                         "profile_id": ["P1", "P1", "P7", "P8"], "reject": [None] * 4})
    resolved = export.resolve(rows, _profile_table({"P7"}), ["email_key"]).collect()
    new, missing = export.members(resolved.lazy(), dest)
    assert new.collect().rows() == [("A", 11, sha("P1"))]  # duplicate row collapses
    assert resolved.lazy().select(missing).collect().item() == 1  # P8 has no email


def ids(*values: str) -> pl.DataFrame:
    return pl.DataFrame({"dpuuid": list(values)}, schema={"dpuuid": pl.String})


@pytest.mark.parametrize(("full", "expected"), [
    (False, [("c", 1, "add"), ("a", 1, "remove")]),
    (True, [("b", 1, "add"), ("c", 1, "add"), ("a", 1, "remove")]),
])
def test_diff_sends_joiners_and_leavers(full, expected):
    out = diff(ids("a", "b"), ids("b", "c"), 1, 1, full).sort("action", "dpuuid")
    assert out.rows() == expected


def test_a_first_export_sends_every_member():
    assert diff(ids(), ids("a"), None, 7).rows() == [("a", 7, "add")]


def test_a_changed_trait_id_moves_every_member():
    out = diff(ids("a", "b"), ids("a"), 1, 2)
    assert sorted(out.rows()) == [("a", 1, "remove"), ("a", 2, "add"), ("b", 1, "remove")]


# --------------------------------------------------------------------------------------------
# Membership state
# --------------------------------------------------------------------------------------------


def test_state_keeps_current_and_previous_versions(tmp_path):
    store = open_store(str(tmp_path))
    state = MembershipState(store, "ec")
    m = pl.DataFrame({"dpuuid": ["b", "a"]})
    assert state.base("VIP", "x") is None
    v1 = state.save("VIP", "x", 10, 5, m)
    assert state.base("VIP", "y") == v1
    v2 = state.save("VIP", "y", 20, 5, m.head(1))
    assert state.base("VIP", "y") == v1  # a re-run of y diffs against x
    assert state.base("VIP", "z") == v2
    state.save("VIP", "y", 20, 5, m.head(1))  # re-saving y keeps x as its predecessor
    assert state.head("VIP").previous == v1
    state.save("VIP", "z", 30, 5, m)
    files = sorted(e.path.rpartition("/")[2] for e in store.list("membership/"))
    assert len(files) == 3 and "HEAD.json" in files  # x is gone, y and z stay
    with pytest.raises(FatalError, match="missing"):
        state.read("VIP", v1)
    assert sorted(state.read("VIP", state.head("VIP").current)["dpuuid"]) == ["a", "b"]
    assert state.current_exports() == {"z"}


def test_folder_names_are_safe_and_distinct():
    assert folder_name("ec") == "ec"
    names = {folder_name(n) for n in ["VIP Customers", "VIP/Customers", "VIP-Customers", "é"]}
    assert len(names) == 4
    assert all("/" not in n and " " not in n for n in names)


# --------------------------------------------------------------------------------------------
# End to end: SFTP (real sshd) and S3 (moto)
# --------------------------------------------------------------------------------------------


class Setup:
    """An export feed, two inbound destinations (email hash, profile ID) and a state store."""

    def __init__(self, tmp: Path, request: pytest.FixtureRequest, layout: str) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tmp = tmp
        self.sftp_keys, self.sftp_opts = "", StoreOptions()
        if layout == "local":
            urls = [str(tmp / n) for n in ("in", "state", "out/ec", "out/crm")]
        else:
            server = request.getfixturevalue("sftp_server")
            bucket = request.getfixturevalue("make_bucket")()
            self.sftp_opts = StoreOptions(known_hosts=server.known_hosts,
                                          identity_file=server.identity_file)
            self.sftp_keys = (f'known_hosts = "{server.known_hosts}"\n'
                              f'identity_file = "{server.identity_file}"\n')
            sftp, s3 = f"{server.url}/export-{tag}", f"s3://{bucket}"
            urls = ([f"{sftp}/in", f"{s3}/state", f"{s3}/ec", f"{sftp}/crm"]
                    if layout == "sftp-in" else
                    [f"{s3}/in", f"{sftp}/state", f"{sftp}/ec", f"{s3}/crm"])
        self.source, self.state, ec, crm = urls
        self.targets = {"ec": ec, "crm": crm}
        for day, opted_out in (("2024-03-01", {"P7"}), ("2024-03-02", {"P3", "P7"})):
            folder = tmp / "profiles" / f"date={day}"
            folder.mkdir(parents=True)
            profiles(opted_out).write_parquet(folder / "part.parquet")
        self.config = tmp / "export.toml"
        self.config.write_text(f"""
[state]
location = "{self.state}"
{self._keys(self.state)}
[profiles]
snapshot = "{tmp}/profiles"
[[feeds]]
name = "campaign"
kind = "campaign_export"
source = "{self.source}"
{self._keys(self.source)}
max_reject_ratio = 0.2
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "{ec}"
{self._keys(ec)}
dpid = 777
id = "email_sha256"
audiences = {{ "{VIP}" = 5001, "{CHURN}" = 5002 }}
[[destinations]]
name = "crm"
kind = "aam_inbound"
target = "{crm}"
{self._keys(crm)}
dpid = 888
id = "profile_id"
audiences = {{ "{VIP}" = 5001, "{CHURN}" = 5002 }}
""")

    def _keys(self, url: str) -> str:
        return self.sftp_keys if url.startswith("sftp") else ""

    def store(self, url: str) -> Store:
        return open_store(url, self.sftp_opts if url.startswith("sftp") else StoreOptions())

    def drop(self, day: int, rows: list[tuple[str, str]] | None = None,
             name: str | None = None) -> None:
        store = self.store(self.source)
        store.write_bytes(name or f"campaign_audiences_{day}.csv", export_csv(rows or EXPORTS[day]))
        store.close()

    def run(self, *extra: str, capsys: pytest.CaptureFixture | None = None) -> tuple[int, dict]:
        code = main(["run", "--config", str(self.config), "--json", *extra], env={})
        report = json.loads(capsys.readouterr().out) if capsys else {}
        return code, report

    def outputs(self) -> dict[str, bytes]:
        files = {}
        for name, url in self.targets.items():
            store = self.store(url)
            files.update({f"{name}/{e.path}": store.read_bytes(e.path) for e in store.list()
                          if not e.path.startswith("_manifests/")})
            store.close()
        return files


def inbound(day: int, dpid: int) -> str:
    folder = {DAY1: "2024-03-01", DAY2: "2024-03-02", DAY3: "2024-03-03"}[day]
    tag = {DAY1: 220737, DAY2: 423197, DAY3: 127843}[day]  # of campaign/campaign_audiences_<day>
    return f"date={folder}/ftp_dpm_{dpid}_{day}.sync.{tag}001"


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


@pytest.mark.parametrize("layout", ["sftp-in", "s3-in"])
def test_day1_full_day2_diff_rerun_and_full(layout, tmp_path, request, capsys):
    setup = Setup(tmp_path, request, layout)
    setup.drop(DAY1)
    code, report = setup.run(capsys=capsys)
    assert code == 0, report
    (day1,) = report["deliveries"]
    assert (day1["status"], day1["records_received"], day1["matched"], day1["unmatched"],
            day1["suppressed"], day1["format_errors"]) == ("processed", 8, 7, 1, 1, 0)
    assert day1["missing_ids"] == {"ec": 1}  # P8 has no email: counted, not exported
    out = setup.outputs()
    assert out[f"ec/{inbound(DAY1, 777)}"] == golden("export_day1_email_sha256.sync")
    assert out[f"crm/{inbound(DAY1, 888)}"] == golden("export_day1_profile_id.sync")

    setup.drop(DAY2)
    code, report = setup.run(capsys=capsys)
    assert code == 0, report
    assert [d["status"] for d in report["deliveries"]] == ["skipped", "processed"]
    day2 = report["deliveries"][1]
    counts = {k: day2[k] for k in ("records_received", "format_errors", "invalid_ids",
                                   "decrypt_failures", "matched", "unmatched", "suppressed")}
    assert counts == {"records_received": 7, "format_errors": 1, "invalid_ids": 0,
                      "decrypt_failures": 0, "matched": 6, "unmatched": 0, "suppressed": 1}
    assert day2["rows_written"] == {"ec": 5, "crm": 5}
    assert day2["missing_ids"] == {"ec": 1}
    after_day2 = setup.outputs()
    assert len(after_day2) == 4
    assert after_day2[f"ec/{inbound(DAY2, 777)}"] == golden("export_day2_email_sha256.sync")
    assert after_day2[f"crm/{inbound(DAY2, 888)}"] == golden("export_day2_profile_id.sync")

    code, report = setup.run(capsys=capsys)  # rerun: nothing new
    assert code == 0 and [d["status"] for d in report["deliveries"]] == ["skipped", "skipped"]
    assert setup.outputs() == after_day2
    code, report = setup.run("--force", capsys=capsys)  # same names, same bytes
    assert code == 0 and [d["status"] for d in report["deliveries"]] == ["skipped", "processed"]
    assert "older than the export already applied" in report["deliveries"][0]["reason"]
    assert setup.outputs() == after_day2

    code, report = setup.run("--full", capsys=capsys)  # day 2's whole membership again
    assert code == 0 and [d["status"] for d in report["deliveries"]] == ["skipped", "processed"]
    full = setup.outputs()
    assert full[f"ec/{inbound(DAY2, 777)}"] == golden("export_day2_full_email_sha256.sync")
    assert full[f"crm/{inbound(DAY2, 888)}"] == golden("export_day2_full_profile_id.sync")
    assert full[f"crm/{inbound(DAY1, 888)}"] == after_day2[f"crm/{inbound(DAY1, 888)}"]
    code, report = setup.run(capsys=capsys)
    assert [d["status"] for d in report["deliveries"]] == ["skipped", "skipped"]


def test_golden_files_say_what_the_story_says():
    """The golden bytes, derived by hand from EXPORTS and the two snapshots."""
    lines = golden("export_day2_profile_id.sync").decode().splitlines()
    assert lines == ["P2\td_unsid=5001", "P3\td_unsid=5001", "P4\td_sid=5001,d_unsid=5002",
                     "P6\td_sid=5002"]
    by_hash = {sha(p): p for p in ("P2", "P3", "P4", "P6")}
    hashed = golden("export_day2_email_sha256.sync").decode().splitlines()
    assert sorted(f"{by_hash[h]}\t{s}" for h, s in (x.split("\t") for x in hashed)) == lines
    full = golden("export_day2_full_profile_id.sync").decode().splitlines()
    assert full == ["P1\td_sid=5001", "P2\td_unsid=5001", "P3\td_unsid=5001",
                    "P4\td_sid=5001,d_unsid=5002", "P5\td_sid=5002", "P6\td_sid=5002",
                    "P8\td_sid=5001"]
    day1 = golden("export_day1_profile_id.sync").decode().splitlines()
    assert day1 == ["P1\td_sid=5001", "P2\td_sid=5001", "P3\td_sid=5001", "P4\td_sid=5002",
                    "P5\td_sid=5002", "P8\td_sid=5001"]


def test_unmapped_audience_is_refused_before_anything_is_published(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1)
    assert setup.run(capsys=capsys)[0] == 0
    before = setup.outputs()
    setup.drop(DAY2, EXPORTS[DAY2] + [("Secret Audience", "P1")])
    code, report = setup.run(capsys=capsys)
    day2 = report["deliveries"][1]
    assert code == 1 and day2["status"] == "failed"
    assert "'Secret Audience' not mapped in destinations.ec.audiences" in day2["reason"]
    assert day2["records_received"] == 8 and day2["outputs"] == []
    assert setup.outputs() == before
    # The state did not move: once fixed, the same file publishes the day-2 diff.
    setup.drop(DAY2)
    code, report = setup.run(capsys=capsys)
    assert code == 0
    assert setup.outputs()[f"crm/{inbound(DAY2, 888)}"] == golden("export_day2_profile_id.sync")


def test_export_files_without_a_date_or_with_control_characters_fail(tmp_path, request,
                                                                      capsys):
    """Neither lands in date=1970-01-01 nor under a name with a line break."""
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1)
    setup.drop(DAY2, name="campaign_audiences.csv")  # no date in the name nor a date= folder
    setup.drop(DAY2, name=f"campaign\naudiences_{DAY2}.csv")
    code, report = setup.run(capsys=capsys)
    assert code == 3
    by_root = {d["delivery"]: d for d in report["deliveries"]}
    undated, broken = by_root["campaign_audiences"], by_root[f"campaign\\naudiences_{DAY2}"]
    assert undated["status"] == "failed" and "no date" in undated["reason"]
    assert broken["status"] == "failed" and "control character" in broken["reason"]
    assert by_root[f"campaign_audiences_{DAY1}"]["status"] == "processed"
    assert setup.outputs() and all(str(DAY1) in name for name in setup.outputs())
    assert not any("\n" in p.name for p in (tmp_path / "state").rglob("*"))

def test_a_name_taken_by_another_delivery_fails_the_export_and_publishes_nothing(
        tmp_path, request, capsys):
    """The same check as for AAM deliveries (publish.publish_outputs), every destination
    checked before the first file is written."""
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1)
    assert setup.run(capsys=capsys)[0] == 0
    name, out = inbound(DAY1, 888), tmp_path / "out"
    (out / "crm/_manifests/campaign" / f"campaign_audiences_{DAY1}.json").unlink()
    (out / "crm" / name).write_bytes(b"X9\td_sid=5001\n")  # someone else's file
    (out / "ec" / inbound(DAY1, 777)).unlink()
    code, report = setup.run("--force", capsys=capsys)
    (rep,) = report["deliveries"]
    assert code == 1 and rep["status"] == "failed"
    assert rep["reason"] == (f"destinations.crm: {name} already holds another delivery's "
                             "output; nothing published")
    assert (out / "crm" / name).read_bytes() == b"X9\td_sid=5001\n"
    assert not (out / "ec" / inbound(DAY1, 777)).exists()

def test_too_many_bad_rows_fail_the_file_and_quarantine_them(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1, [(VIP, "P1"), (VIP, ""), ("", "P2")])
    code, report = setup.run(capsys=capsys)
    (rep,) = report["deliveries"]
    assert code == 1 and rep["status"] == "failed" and "reject ratio" in rep["reason"]
    assert (rep["records_received"], rep["format_errors"], rep["matched"]) == (3, 2, 1)
    assert setup.outputs() == {}
    quarantine = pl.read_csv(tmp_path / "state/quarantine/campaign"
                             / f"campaign_audiences_{DAY1}.csv")
    assert quarantine.select("line_no", "reason", "line").rows() == [
        (3, "no_profile_id", f"{VIP},"), (4, "no_audience", ",P2")]


def test_dry_run_writes_nothing(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1)
    code, report = setup.run("--dry-run", capsys=capsys)
    assert code == 0 and report["deliveries"][0]["status"] == "dry_run"
    assert report["deliveries"][0]["outputs"] == [f"ec:{inbound(DAY1, 777)}",
                                                  f"crm:{inbound(DAY1, 888)}"]
    assert setup.outputs() == {} and not (tmp_path / "state/membership").exists()


def test_aam_segment_feeds_skip_export_only_destinations(tmp_path, request, capsys):
    from tests.factories import delivery_files, put_all

    setup = Setup(tmp_path, request, "local")
    text = setup.config.read_text().replace('kind = "campaign_export"', 'id_kind = "email"\n'
                                            'id_encoding = "plain"\nrequire_info = true')
    setup.config.write_text(text)
    put_all(open_store(setup.source), delivery_files("ftp_1_2_iter_1709283600000",
                                                     [["p1@example.com 111"]]))
    code, report = setup.run(capsys=capsys)
    assert code == 0 and report["deliveries"][0]["status"] == "processed"
    assert report["deliveries"][0]["outputs"] == [] and setup.outputs() == {}


# --------------------------------------------------------------------------------------------
# Crash between publishing and saving the membership state (real SIGKILL)
# --------------------------------------------------------------------------------------------


def _run_subprocess(setup: Setup, crash_at: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(RUNNER), str(crash_at), "run", "--config", str(setup.config),
         "--json"], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)


def _ledger_status(setup: Setup, day: int) -> str | None:
    path = setup.tmp / "state/ledger/campaign" / f"campaign_audiences_{day}.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


@pytest.mark.parametrize("crash_at", [1, 3])  # before any save; after one destination's saves
def test_crash_before_state_is_saved_loses_and_duplicates_nothing(crash_at, tmp_path, request):
    reference = Setup(tmp_path / "reference", request, "local")
    setup = Setup(tmp_path / "crashed", request, "local")
    for s in (reference, setup):
        s.drop(DAY1)
        assert _run_subprocess(s, 0).returncode == 0
        s.drop(DAY2)
    assert _run_subprocess(reference, 0).returncode == 0

    crashed = _run_subprocess(setup, crash_at)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert _ledger_status(setup, DAY2) is None
    partial = setup.outputs()  # published in full before the crash
    assert partial == reference.outputs()

    again = _run_subprocess(setup, 0)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _ledger_status(setup, DAY2) == "processed"
    assert setup.outputs() == reference.outputs()
    assert setup.outputs()[f"crm/{inbound(DAY2, 888)}"] == golden("export_day2_profile_id.sync")

    for s in (reference, setup):  # the next day diffs against the right state
        s.drop(DAY3)
        assert _run_subprocess(s, 0).returncode == 0
    assert setup.outputs() == reference.outputs()
    day3 = setup.outputs()[f"crm/{inbound(DAY3, 888)}"].decode().splitlines()
    assert day3 == ["P2\td_sid=5001", "P4\td_unsid=5001", "P6\td_unsid=5002",
                    "P8\td_unsid=5001"]


def test_a_late_older_export_is_not_applied_over_a_newer_one(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY2)
    assert setup.run(capsys=capsys)[0] == 0
    before = setup.outputs()
    setup.drop(DAY1)  # arrives late
    code, report = setup.run(capsys=capsys)
    late = report["deliveries"][0]
    assert code == 0 and late["delivery"] == f"campaign_audiences_{DAY1}"
    assert late["status"] == "skipped" and "older than the export" in late["reason"]
    assert setup.outputs() == before
    code, report = setup.run(capsys=capsys)  # recorded: not read again
    assert [d["status"] for d in report["deliveries"]] == ["skipped", "skipped"]


def test_a_file_changed_after_processing_is_reported(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(DAY1)
    assert setup.run(capsys=capsys)[0] == 0
    setup.drop(DAY1, EXPORTS[DAY1] + [(VIP, "P6")])
    code, report = setup.run(capsys=capsys)
    assert report["deliveries"][0]["status"] == "skipped"
    assert "changed since processed" in report["deliveries"][0]["reason"]


def test_exports_of_one_day_in_separate_files_publish_separately(tmp_path, request, capsys):
    setup = Setup(tmp_path, request, "local")
    setup.drop(0, [(VIP, "P1")], name="date=2024-03-01/vip.csv")
    setup.drop(0, [(CHURN, "P5")], name="date=2024-03-01/churn.csv")
    code, report = setup.run(capsys=capsys)
    assert code == 0 and [d["status"] for d in report["deliveries"]] == ["processed"] * 2
    crm = sorted(v for k, v in setup.outputs().items() if k.startswith("crm/"))
    assert crm == [b"P1\td_sid=5001\n", b"P5\td_sid=5002\n"]
