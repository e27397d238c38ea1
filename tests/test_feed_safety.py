"""Feed discovery on hostile or unusual input: control files without sequence numbers,
control characters in file names, links leaving the feed folder."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.console import Progress, print_report, print_status
from pipeline.report import DeliveryReport, RunReport
from pipeline.stages.ingest import find_deliveries
from pipeline.stores import open_store
from tests.factories import delivery_files, write_snapshot
from tests.test_runs import PROFILES, ROOT1, ROOT2, config, outputs, put, run_json


@pytest.fixture
def env(tmp_path: Path) -> Path:
    write_snapshot(tmp_path / "profiles" / "snap.parquet", PROFILES)
    return tmp_path


def test_info_without_sequence_numbers_orders_files_by_split_number(env, capsys):
    """FileSequenceNumber is optional: files are then taken in the split order of their
    names (2 before 10), whatever order the control file lists them in."""
    splits = [["alice@example.com 111"]] * 9 + [["alice@example.com  111"]]  # 10th removes
    files = put(env, ROOT1, splits)
    info = json.loads(files[f"{ROOT1}.info"])
    for entry in info["Files"]:
        del entry["FileSequenceNumber"]
    info["Files"].reverse()
    (env / "in" / f"{ROOT1}.info").write_text(json.dumps(info))

    (delivery,) = find_deliveries(open_store(str(env / "in")), "emails")
    assert delivery.complete
    assert [f.name.split for f in delivery.files] == list(range(1, 11))
    code, report = run_json(config(env), capsys=capsys)
    assert code == 0 and report["deliveries"][0]["status"] == "processed"
    csv = (env / "out/campaign/emails" / f"{ROOT1}.csv").read_text()
    assert "P1,111,remove" in csv  # split 10 came last


@pytest.mark.parametrize("char", ["\n", "\r", "\t", "\x1b", "\u2028", "\udcff"])
def test_control_characters_in_file_names_fail_only_that_delivery(env, capsys, char):
    """`\udcff` is how Python shows a file name byte that is not UTF-8 (0xFF here)."""
    put(env, ROOT1)
    bad_root = ROOT2.replace("_iter_", f"_it{char}er_")
    for name, data in delivery_files(bad_root, [["bob@example.com 111"]]).items():
        (env / "in" / name).write_bytes(data)
    code, report = run_json(config(env), capsys=capsys)
    assert code == 3
    by_status = {d["status"]: d for d in report["deliveries"]}
    assert set(by_status) == {"processed", "failed"}
    failed = by_status["failed"]
    reason = "not valid UTF-8" if char == "\udcff" else "control character"
    assert reason in failed["reason"] and failed["outputs"] == []
    assert char not in failed["delivery"]  # shown escaped, in the report and the ledger
    assert not any(char in name for name in outputs(env))
    state = [p.name for p in (env / "state").rglob("*")]
    assert not any(char in name for name in state)


def test_links_leaving_the_feed_folder_are_not_followed(env, capsys):
    put(env, ROOT1)
    secret = delivery_files(ROOT2, [["carol@example.com 113"]])
    (env / "elsewhere").mkdir()
    for name, data in secret.items():
        if name.endswith(".info"):
            (env / "in" / name).write_bytes(data)
        else:  # the data file is a link to a file outside the feed
            (env / "elsewhere" / name).write_bytes(data)
            (env / "in" / name).symlink_to(env / "elsewhere" / name)
    code, report = run_json(config(env), capsys=capsys)
    (second,) = [d for d in report["deliveries"] if d["delivery"] == ROOT2]
    assert second["status"] == "incomplete"
    assert "missing" in second["reason"]
    assert not any(ROOT2 in name for name in outputs(env))
    assert "P3,113" not in "".join(p.read_text() for p in (env / "out").rglob("*.csv"))


def test_a_feed_whose_listing_fails_does_not_stop_the_others(env, capsys, s3_endpoint):
    """Discovery (opening the feed's store, listing it, reading control files) is the feed's
    own: a missing bucket fails that feed with one line; the next feed runs."""
    put(env, ROOT1)
    cfg = config(env)
    text = cfg.read_text().replace("[[feeds]]", f"""[[feeds]]
name = "gone"
source = "s3://missing-{uuid.uuid4().hex[:12]}/in"
[[feeds]]""", 1)
    cfg.write_text(text)
    code, report = run_json(cfg, capsys=capsys)
    assert code == 3
    gone, emails = report["deliveries"]
    assert (gone["feed"], gone["delivery"], gone["status"]) == ("gone", "*", "failed")
    assert gone["reason"].startswith("feed not listed: s3://missing-")
    assert "bucket does not exist" in gone["reason"] and "\n" not in gone["reason"]
    assert (emails["feed"], emails["status"]) == ("emails", "processed")
    assert report["totals"]["records_received"] == 3


def test_names_that_look_like_console_markup_are_printed_as_they_are(capsys):
    """File names reach the console; `[/x]` in one (an S3 key, an export in folders `a[` and
    `x]`) must neither crash the report nor be swallowed as markup."""
    name = "a[/x]/[bold]ftp_1_2_iter_1486140844000"
    rep = DeliveryReport(feed="emails", delivery=name, status="failed", reason=f"{name}: [/x]")
    Progress(enabled=True).delivery_done(rep)
    print_report(RunReport(run_id="r", command="run", deliveries=[rep]),
                 Console(file=sys.stdout, width=400))
    print_status({"runs": [], "failed": [{"feed": "emails", "delivery": name, "status": "failed",
                                          "reason": "[/x]"}], "pending": [], "processed": 0},
                 Console(file=sys.stdout, width=400))
    out, err = capsys.readouterr()
    assert f"emails/{name}: failed" in err
    assert f"emails/{name}" in out and f"{name}: failed: {name}: [/x]" in out
    assert out.count(name) == 4
