"""Full deliveries mirror segment membership (SPEC §11), end to end over real servers: the
feed on SFTP (sshd), outputs and state on S3 (moto)."""

from __future__ import annotations

import gzip
import hashlib
import json
import uuid
from pathlib import Path

import polars as pl

from pipeline.cli import main
from pipeline.config import DestinationConfig, Location
from pipeline.membership import FeedMembership, mirror
from pipeline.spill import Spill
from pipeline.stages.publish import CampaignListWriter, DeliveryKey
from pipeline.stores import StoreOptions, open_store
from pipeline.tables import check_output, check_rows
from tests.factories import delivery_files, put_all, read_outputs, two_destinations, write_snapshot

GOLDEN = Path(__file__).parent / "golden"
ROOTS = {1: "ftp_1234_5678_full_1485943200000",  # 2017-02-01 10:00 UTC
         2: "ftp_1234_5678_iter_1486029600000",  # 2017-02-02
         3: "ftp_1234_5678_full_1486116000000"}  # 2017-02-03
LATE = "ftp_1234_5678_iter_1485979200000"  # 2017-02-01 20:00: after day 1, before day 2
DAYS = {
    1: [["alice@example.com 111,112", "bob@example.com 111", "carol@example.com 112,113",
         "dave@example.com 111"],
        ["frank@example.com 113", "gina@example.com 111,112,113",
         "hank@example.com 111,112,113"]],
    2: [["alice@example.com  112", "erin@example.com 111", "carol@example.com 111"]],
    # dave, frank and carol's 111/112 are gone; bob is opted out in the day-3 snapshot and
    # frank is no longer in it.
    3: [["alice@example.com 111,112", "bob@example.com 111", "carol@example.com 113"],
        ["erin@example.com 111", "gina@example.com 111,112,113",
         "hank@example.com 111,112,113"]],
}
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank"]
PROFILES = [{"profile_id": f"P{i}", "email": f"{n}@example.com"}
            for i, n in enumerate(NAMES, start=1)]
DAY3_PROFILES = [dict(p, opt_out=p["profile_id"] == "P2") for p in PROFILES
                 if p["profile_id"] != "P6"]
AFTER_DAY3 = [("P1", 111), ("P1", 112), ("P3", 113), ("P5", 111), *[
    (p, s) for p in ("P7", "P8") for s in (111, 112, 113)]]
DAY3_LEAVERS = 5  # P2/111 (opted out), P3/111, P3/112, P4/111, P6/113 (not in snapshot)


class Setup:
    """Feed on SFTP, campaign list and AAM inbound outputs and the state on S3."""

    def __init__(self, tmp: Path, request, feed_extra: str = "") -> None:
        server = request.getfixturevalue("sftp_server")
        bucket = request.getfixturevalue("make_bucket")()
        self.sftp = StoreOptions(known_hosts=server.known_hosts,
                                 identity_file=server.identity_file)
        self.source = f"{server.url}/full-{uuid.uuid4().hex[:8]}"
        self.state = f"s3://{bucket}/state/"
        self.targets = {"campaign": f"s3://{bucket}/campaign/", "ec": f"s3://{bucket}/ec/"}
        write_snapshot(tmp / "profiles/date=2017-02-01/part.parquet", PROFILES)
        write_snapshot(tmp / "profiles/date=2017-02-03/part.parquet", DAY3_PROFILES)
        self.tmp = tmp
        self.config = tmp / "c.toml"
        self.config.write_text(f"""
[state]
location = "{self.state}"
[profiles]
snapshot = "{tmp}/profiles"
[[feeds]]
name = "emails"
source = "{self.source}"
known_hosts = "{server.known_hosts}"
identity_file = "{server.identity_file}"
id_kind = "email"
{feed_extra}
""" + two_destinations(self.targets, {111: 9001, 112: 9002, 113: 9003}))

    def put(self, root: str, splits: list[list[str]]) -> None:
        store = open_store(self.source, self.sftp)
        put_all(store, delivery_files(root, splits))
        store.close()

    def run(self, *args: str, capsys, command: str = "run") -> tuple[int, dict]:
        code = main([command, "--config", str(self.config), "--json", *args])
        out = capsys.readouterr()
        assert out.out, out.err[-1000:]
        return code, json.loads(out.out)

    def outputs(self) -> dict[str, bytes]:
        return read_outputs(self.targets)

    def campaign(self, day: int) -> str:
        return self.outputs()[f"campaign/emails/{ROOTS[day]}.csv"].decode()

    def inbound(self, day: int) -> str:
        stamp = int(ROOTS[day].rpartition("_")[2]) // 1000
        prefix = f"ec/date=2017-02-0{day}/ftp_dpm_7_{stamp}.sync."
        (data,) = [v for k, v in self.outputs().items() if k.startswith(prefix)]
        return gzip.decompress(data).decode()

    def membership(self) -> tuple[list[tuple[str, int]], pl.DataFrame]:
        """(delivery, pairs) of every kept version, and the newest version's pairs."""
        store = open_store(self.state)
        fm = FeedMembership(store, "emails")
        head = fm.head()
        spill = Spill(self.tmp / f"load-{uuid.uuid4().hex[:6]}")
        fm.load(head.newest, 1, spill)
        part = spill.scan("members")
        store.close()
        pairs = (part.collect().sort("profile_id", "segment_id") if part is not None
                 else pl.DataFrame())
        return [(v.delivery, v.pairs) for v in head.versions], pairs


def by_root(report: dict) -> dict[str, dict]:
    return {d["delivery"]: d for d in report["deliveries"]}


def pairs(rows: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return sorted(rows)


def three_days(setup: Setup, capsys) -> list[dict]:
    reports = []
    for day in (1, 2, 3):
        setup.put(ROOTS[day], DAYS[day])
        code, report = setup.run(capsys=capsys)
        assert code == 0, report
        reports.append(report)
    return reports


def test_full_iter_full_golden_outputs_and_leavers(tmp_path, request, capsys):
    setup = Setup(tmp_path, request)
    day1, day2, day3 = three_days(setup, capsys)
    assert [r["leavers"] for r in (day1, day2, day3)] == [0, 0, DAY3_LEAVERS]
    d3 = day3["deliveries"][-1]
    assert [d["status"] for d in day3["deliveries"]] == ["skipped", "skipped", "processed"]
    assert d3["status"] == "processed" and d3["leavers"] == DAY3_LEAVERS
    assert d3["missing_ids"] == {"ec": 1}  # frank left 113 but has no DPUUID any more
    assert d3["rows_written"] == {"campaign": 10 + DAY3_LEAVERS, "ec": 10 + DAY3_LEAVERS - 1}
    # Day 2 (iter) is what the file says, nothing more: adds and the one removal.
    assert setup.campaign(2).splitlines()[1:] == [
        f"P1,112,remove,email,{ROOTS[2]}", f"P3,111,add,email,{ROOTS[2]}",
        f"P5,111,add,email,{ROOTS[2]}"]
    assert setup.campaign(3) == (GOLDEN / "full_day3_campaign.csv").read_text()
    assert setup.inbound(3) == (GOLDEN / "full_day3_inbound.sync").read_text()
    versions, members = setup.membership()
    assert versions == [(ROOTS[1], 13), (ROOTS[2], 14), (ROOTS[3], 10)]
    assert members.rows() == pairs(AFTER_DAY3)


def test_buckets_sized_by_the_membership_same_results(tmp_path, request, capsys, monkeypatch):
    """A delivery's buckets count the pairs of the membership it applies to: day 2 applies to
    13 pairs, day 3 to 14 (4 per bucket here), so their versions have 4 buckets, day 1's one;
    leavers and membership are those of the one-bucket run."""
    monkeypatch.setattr("pipeline.flows.aam.PAIRS_PER_BUCKET", 4)
    setup = Setup(tmp_path, request)
    reports = three_days(setup, capsys)
    assert [r["leavers"] for r in reports] == [0, 0, DAY3_LEAVERS]
    store = open_store(setup.state)
    assert [v.buckets for v in FeedMembership(store, "emails").head().versions] == [1, 4, 4]
    store.close()
    versions, members = setup.membership()
    assert versions == [(ROOTS[1], 13), (ROOTS[2], 14), (ROOTS[3], 10)]
    assert members.rows() == pairs(AFTER_DAY3)


def test_golden_day3_says_what_the_spec_says():
    """The golden files checked by hand: leavers as removals, `matched_on` empty, the opted
    out profile only in removal rows, a profile missing from the snapshot only in the list."""
    rows = [line.split(",") for line in
            (GOLDEN / "full_day3_campaign.csv").read_text().splitlines()[1:]]
    removals = {(r[0], int(r[1])) for r in rows if r[2] == "remove"}
    assert removals == {("P2", 111), ("P3", 111), ("P3", 112), ("P4", 111), ("P6", 113)}
    assert all(r[3] == "" for r in rows if r[2] == "remove")
    assert all(r[3] == "email" for r in rows if r[2] == "add")
    assert {(r[0], int(r[1])) for r in rows if r[2] == "add"} == set(AFTER_DAY3)
    lines = dict(line.split("\t") for line in
                 (GOLDEN / "full_day3_inbound.sync").read_text().splitlines())
    sha = {n: hashlib.sha256(f"{n}@example.com".encode()).hexdigest() for n in NAMES}
    assert lines[sha["bob"]] == "d_unsid=9001"
    assert lines[sha["carol"]] == "d_sid=9003,d_unsid=9001,d_unsid=9002"
    assert lines[sha["dave"]] == "d_unsid=9001"
    assert sha["frank"] not in lines


def test_safety_valve_fails_the_delivery_until_the_ratio_allows_it(tmp_path, request, capsys):
    setup = Setup(tmp_path, request)
    setup.put(ROOTS[1], [*DAYS[1], ["erin@example.com 111,112"]])  # 15 pairs
    assert setup.run(capsys=capsys)[0] == 0
    before_outputs, before_membership = setup.outputs(), setup.membership()
    empty = "ftp_1234_5678_full_1486029600000"  # day 2: an empty full file
    setup.put(empty, [[]])
    code, report = setup.run(capsys=capsys)
    assert code == 1  # as for any failed delivery: none processed
    failed = by_root(report)[empty]
    assert failed["status"] == "failed" and "max_removal_ratio" in failed["reason"]
    assert "remove 15 of 15" in failed["reason"] and "\n" not in failed["reason"]
    # 60%: day 3 keeps 6 of the 15 pairs
    sixty = "ftp_1234_5678_full_1486116000000"
    setup.put(sixty, [["alice@example.com 111,112", "gina@example.com 111,112",
                       "hank@example.com 111,112"]])
    code, report = setup.run(capsys=capsys)
    assert code == 1
    assert [by_root(report)[r]["status"] for r in (empty, sixty)] == ["failed", "failed"]
    assert "remove 9 of 15" in by_root(report)[sixty]["reason"]
    assert report["leavers"] == 0
    assert setup.outputs() == before_outputs  # nothing published
    assert setup.membership()[0] == before_membership[0]
    assert setup.membership()[1].equals(before_membership[1])

    setup.config.write_text(setup.config.read_text().replace(
        'id_kind = "email"', 'id_kind = "email"\nmax_removal_ratio = 1.0'))
    code, report = setup.run(capsys=capsys)
    assert code == 0
    assert [(by_root(report)[r]["status"], by_root(report)[r]["leavers"])
            for r in (empty, sixty)] == [("processed", 15), ("processed", 0)]
    assert setup.membership()[1].rows() == pairs(
        [("P1", 111), ("P1", 112), ("P7", 111), ("P7", 112), ("P8", 111), ("P8", 112)])


def test_late_delivery_skipped_then_backfill_replays_identically(tmp_path, request, capsys):
    setup = Setup(tmp_path, request)
    three_days(setup, capsys)
    first, first_membership = setup.outputs(), setup.membership()

    setup.put(LATE, [["dave@example.com 112"]])
    code, report = setup.run(capsys=capsys)
    assert code == 0
    late = by_root(report)[LATE]
    assert late["status"] == "skipped"
    assert late["reason"] == (f"older than the newest applied delivery {ROOTS[3]}; "
                              "replay it with backfill")
    assert setup.outputs() == first

    # Backfill from day 2: days 2 and 3 replayed whatever --to says, same bytes, same state.
    code, report = setup.run("--from", "2017-02-02", "--to", "2017-02-02", capsys=capsys,
                             command="backfill")
    assert code == 0
    assert [(d["delivery"], d["status"]) for d in report["deliveries"]] == [
        (ROOTS[2], "processed"), (ROOTS[3], "processed")]
    assert setup.outputs() == first
    versions, members = setup.membership()
    assert versions == first_membership[0] and members.equals(first_membership[1])


def test_backfill_with_a_changed_day_propagates_to_later_leavers(tmp_path, request, capsys):
    setup = Setup(tmp_path, request)
    three_days(setup, capsys)
    golden = (GOLDEN / "full_day3_campaign.csv").read_text().splitlines()
    # Day 2 is re-delivered: dave also joined 112, which day 3 (full) no longer has.
    setup.put(ROOTS[2], [DAYS[2][0] + ["dave@example.com 112"]])
    code, report = setup.run("--from", "2017-02-02", "--to", "2017-02-03", capsys=capsys,
                             command="backfill")
    assert code == 0
    assert [d["leavers"] for d in report["deliveries"]] == [0, DAY3_LEAVERS + 1]
    expected = golden[:]
    expected.insert(golden.index(f"P4,111,remove,,{ROOTS[3]}") + 1, f"P4,112,remove,,{ROOTS[3]}")
    assert setup.campaign(3).splitlines() == expected
    dave = hashlib.sha256(b"dave@example.com").hexdigest()
    assert f"{dave}\td_unsid=9001,d_unsid=9002" in setup.inbound(3).splitlines()
    versions, members = setup.membership()
    assert versions == [(ROOTS[1], 13), (ROOTS[2], 15), (ROOTS[3], 10)]
    assert members.rows() == pairs(AFTER_DAY3)


def test_backfill_before_the_oldest_kept_version_is_refused(tmp_path, capsys):
    for day in ("2017-02-01", "2017-02-03"):
        write_snapshot(tmp_path / f"profiles/date={day}/part.parquet", PROFILES)
    for day in (1, 2, 3):
        put_all(open_store(str(tmp_path / "in")), delivery_files(ROOTS[day], DAYS[day]))
    config = tmp_path / "c.toml"
    config.write_text(f"""
[state]
location = "{tmp_path}/state"
[profiles]
snapshot = "{tmp_path}/profiles"
[[feeds]]
name = "emails"
source = "{tmp_path}/in"
id_kind = "email"
membership_retention_days = 1
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp_path}/out"
""")
    assert main(["run", "--config", str(config), "--json"]) == 0
    capsys.readouterr()
    head = FeedMembership(open_store(str(tmp_path / "state")), "emails").head()
    assert [v.delivery for v in head.versions] == [ROOTS[2], ROOTS[3]]  # day 1 is > 1 day old
    argv = ["backfill", "--config", str(config), "--to", "2017-02-03", "--json"]
    assert main([*argv, "--from", "2017-02-02"]) == 2
    err = capsys.readouterr()
    assert json.loads(err.out)["deliveries"] == []  # refused before any delivery
    assert err.err.strip().splitlines() == [
        "error: backfill --from 2017-02-02: feed emails needs its membership before that day, "
        "but versions before 2017-02-02 were deleted (membership_retention_days = 1); "
        "backfill from a later date"]
    assert main([*argv, "--from", "2017-02-03"]) == 0


def test_parquet_campaign_list_leavers_have_null_matched_on(tmp_path):
    old = pl.DataFrame({"profile_id": ["P1", "P2"], "segment_id": [111, 111]},
                       schema={"profile_id": pl.String, "segment_id": pl.UInt32})
    today = pl.DataFrame({"profile_id": ["P1"], "segment_id": [111], "action": ["add"],
                          "matched_on": ["email"]},
                         schema={"profile_id": pl.String, "segment_id": pl.UInt32,
                                 "action": pl.String, "matched_on": pl.String})
    leavers = mirror(today, old, full=True).leavers
    dest = DestinationConfig("crm", "campaign_list", Location("/unused"), format="parquet")
    writer = CampaignListWriter(dest, DeliveryKey("emails", ROOTS[3], 1486116000), tmp_path)
    writer.add(pl.concat([today, leavers]))
    ((_, local),) = writer.finish().files
    table = pl.read_parquet(local)
    assert table.select("profile_id", "action", "matched_on").rows() == [
        ("P1", "add", "email"), ("P2", "remove", None)]
    check_output(table.schema, "campaign_list", "written")
    check_rows(table.lazy(), "campaign_list", "written")
