"""Safe runs: reruns, --force, changed files, incomplete deliveries, dry run, lock, backfill."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.lock import LOCK_PATH
from tests.factories import delivery_files, write_snapshot

ROOT1 = "ftp_1234_5678_iter_1486140844000"  # 2017-02-03
ROOT2 = "ftp_1234_5678_iter_1486227244000"  # 2017-02-04
LINES = [["alice@example.com 111,112", "bob@example.com 113"], ["carol@example.com 111 112"]]
PROFILES = [{"profile_id": f"P{i}", "email": f"{n}@example.com"}
            for i, n in enumerate(["alice", "bob", "carol"], start=1)]


def config(tmp: Path, extra_feed: str = "") -> Path:
    path = tmp / "c.toml"
    path.write_text(f"""
[state]
location = "state"
[profiles]
snapshot = "profiles"
[[feeds]]
name = "emails"
source = "in"
id_kind = "email"
{extra_feed}
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out/campaign"
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "out/ec"
dpid = 7
segments = {{ "111" = 1, "112" = 2, "113" = 3 }}
gzip = true
""")
    return path


def put(tmp: Path, root: str, splits=LINES, gz: bool = True) -> dict[str, bytes]:
    files = delivery_files(root, splits, gz=gz)
    (tmp / "in").mkdir(exist_ok=True)
    for name, data in files.items():
        (tmp / "in" / name).write_bytes(data)
    return files


@pytest.fixture
def env(tmp_path: Path) -> Path:
    write_snapshot(tmp_path / "profiles" / "snap.parquet", PROFILES)
    return tmp_path


def run_json(cfg: Path, *args: str, capsys) -> tuple[int, dict]:
    code = main(["run", "--config", str(cfg), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def outputs(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp)): p.read_bytes()
            for p in sorted((tmp / "out").rglob("*")) if p.is_file()}


def test_rerun_skips_and_force_is_byte_identical(env, capsys):
    put(env, ROOT1)
    cfg = config(env)
    assert run_json(cfg, capsys=capsys)[0] == 0
    first = outputs(env)
    assert len(first) == 4  # campaign csv + inbound sync + two manifests
    code, report = run_json(cfg, capsys=capsys)
    assert code == 0 and report["deliveries_by_status"] == {"skipped": 1}
    assert outputs(env) == first
    code, report = run_json(cfg, "--force", capsys=capsys)
    assert report["deliveries_by_status"] == {"processed": 1}
    assert outputs(env) == first


def test_changed_files_are_reported_not_redone(env, capsys):
    put(env, ROOT1)
    cfg = config(env)
    run_json(cfg, capsys=capsys)
    before = outputs(env)
    put(env, ROOT1, [["alice@example.com 113"], ["bob@example.com 111"]])
    code, report = run_json(cfg, capsys=capsys)
    assert report["deliveries"][0]["status"] == "skipped"
    assert "changed" in report["deliveries"][0]["reason"]
    assert outputs(env) == before


def _drop(files: dict[str, bytes], env: Path, name: str) -> None:
    (env / "in" / name).unlink()


@pytest.mark.parametrize("damage", [
    "info_before_data", "missing_split", "wrong_size", "md5_mismatch", "truncated_gzip",
    "line_count"])
def test_incomplete_delivery_publishes_nothing_then_completes(env, capsys, damage):
    files = put(env, ROOT1)
    split2 = f"{ROOT1}-2.sync.gz"
    info = json.loads(files[f"{ROOT1}.info"])
    if damage == "info_before_data":
        for name in files:
            if name.endswith(".gz"):
                _drop(files, env, name)
    elif damage == "missing_split":
        _drop(files, env, split2)
    elif damage == "wrong_size":
        (env / "in" / split2).write_bytes(files[split2][:-3])
    elif damage == "md5_mismatch":  # same size, other bytes
        data = bytearray(files[split2])
        data[-5] ^= 0xFF
        (env / "in" / split2).write_bytes(bytes(data))
    elif damage == "truncated_gzip":  # truncated file, control file agrees on size and md5
        cut = files[split2][:-8]
        (env / "in" / split2).write_bytes(cut)
        import hashlib
        info["Files"][1].update(FileByteSize=len(cut), md5=hashlib.md5(cut).hexdigest())
        (env / "in" / f"{ROOT1}.info").write_text(json.dumps(info))
    elif damage == "line_count":
        info["Files"][0]["FileLineCount"] = 5
        info["Totals"]["TotalLineCount"] += 3
        (env / "in" / f"{ROOT1}.info").write_text(json.dumps(info))
    cfg = config(env)
    code, report = run_json(cfg, capsys=capsys)
    delivery = report["deliveries"][0]
    waiting = damage in ("info_before_data", "missing_split", "wrong_size")
    assert delivery["status"] == ("incomplete" if waiting else "failed")
    assert delivery["reason"]
    assert code == (0 if waiting else 1)  # waiting for data is not a failure
    assert not (env / "out").exists() or outputs(env) == {}
    ledger = json.loads((env / "state/ledger/emails" / f"{ROOT1}.json").read_text())
    assert ledger["status"] == delivery["status"]

    put(env, ROOT1)  # the delivery becomes whole
    code, report = run_json(cfg, capsys=capsys)
    assert code == 0 and report["deliveries"][0]["status"] == "processed"


def test_bad_control_file_fails_only_its_delivery(env, capsys):
    put(env, ROOT1)
    put(env, ROOT2)
    (env / "in" / f"{ROOT1}.info").write_text('{"Files": [{"FileName": 3}]}')
    code, report = run_json(config(env), capsys=capsys)
    assert code == 3
    first, second = report["deliveries"]
    assert first["status"] == "failed" and "FileName" in first["reason"]
    assert second["status"] == "processed"


def test_status_shows_failed_and_pending(env, capsys):
    files = put(env, ROOT1)
    _drop(files, env, f"{ROOT1}-1.sync.gz")
    put(env, ROOT2, [["nope 1"], ["nope 2"]])  # every ID invalid -> failed
    cfg = config(env)
    code, report = run_json(cfg, capsys=capsys)
    assert code == 1  # one failed, none processed
    assert main(["status", "--config", str(cfg), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert [d["delivery"] for d in status["pending"]] == [ROOT1]
    assert [d["delivery"] for d in status["failed"]] == [ROOT2]
    assert status["runs"][-1]["status"] == "failed"


def test_reject_threshold_fails_delivery_and_quarantines(env, capsys):
    put(env, ROOT1, [["alice@example.com 111", "bad 1,x"], ["bob@example.com 0"]])
    cfg = config(env)
    code, report = run_json(cfg, capsys=capsys)
    d = report["deliveries"][0]
    assert code == 1 and d["status"] == "failed" and "max_reject_ratio" in d["reason"]
    assert d["records_received"] == 3 and d["format_errors"] == 2 and d["matched"] == 1
    assert not (env / "out").exists()
    quarantine = (env / "state/quarantine/emails" / f"{ROOT1}.csv").read_text()
    assert "bad_segment" in quarantine and "segment_zero" in quarantine


def test_partial_run_exit_3(env, capsys):
    put(env, ROOT1)
    put(env, ROOT2, [["nope 1"], ["nope 2"]])
    code, report = run_json(config(env), capsys=capsys)
    assert code == 3
    assert report["deliveries_by_status"] == {"processed": 1, "failed": 1}


def test_dry_run_writes_nothing(env, capsys):
    put(env, ROOT1)
    code, report = run_json(config(env), "--dry-run", capsys=capsys)
    assert code == 0
    assert report["deliveries"][0]["status"] == "dry_run"
    assert report["deliveries"][0]["outputs"]  # what would be written
    assert not (env / "out").exists() and not (env / "state").exists()


def test_lock_held_by_live_run_refuses(env, capsys):
    put(env, ROOT1)
    (env / "state").mkdir()
    import os
    import socket
    (env / "state" / LOCK_PATH).write_text(json.dumps({
        "run_id": "other", "host": socket.gethostname(), "pid": os.getppid(),
        "since": "2026-01-01T00:00:00+00:00"}))
    code = main(["run", "--config", str(config(env))])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: another run (other")


def test_stale_lock_of_dead_process_is_taken_over(env, capsys):
    put(env, ROOT1)
    (env / "state").mkdir()
    (env / "state" / LOCK_PATH).write_text(json.dumps({
        "run_id": "dead", "host": __import__("socket").gethostname(), "pid": 2**22 + 7,
        "since": "2026-01-01T00:00:00+00:00"}))
    code, report = run_json(config(env), capsys=capsys)
    assert code == 0
    assert not (env / "state" / LOCK_PATH).exists()


def test_backfill_uses_as_of_snapshots(tmp_path, capsys):
    # Three deliveries on three days, three snapshot partitions: "dora" exists only in the
    # middle snapshot, so only the middle delivery matches her.
    for day, extra in (("2017-02-02", []), ("2017-02-04", ["dora"]), ("2017-02-06", [])):
        rows = PROFILES + [{"profile_id": "P9", "email": f"{n}@example.com"} for n in extra]
        write_snapshot(tmp_path / "profiles" / f"date={day}" / "part.parquet", rows)
    roots = ["ftp_1_2_iter_1486140844000", "ftp_1_2_iter_1486313644000",
             "ftp_1_2_iter_1486486444000"]  # 02-03, 02-05, 02-07
    for root in roots:
        put(tmp_path, root, [["dora@example.com 111"], ["alice@example.com 112"]])
    cfg = config(tmp_path)
    code, report = run_json(cfg, capsys=capsys)
    assert [d["matched"] for d in report["deliveries"]] == [1, 2, 1]
    first = outputs(tmp_path)
    code = main(["backfill", "--config", str(cfg), "--from", "2017-02-04", "--to",
                 "2017-02-07", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [d["delivery"] for d in report["deliveries"]] == roots[1:]
    assert [d["status"] for d in report["deliveries"]] == ["processed", "processed"]
    assert [d["matched"] for d in report["deliveries"]] == [2, 1]
    assert outputs(tmp_path) == first  # replaced in place, nothing duplicated
    csv = (tmp_path / "out/campaign/emails" / f"{roots[1]}.csv").read_text()
    assert "P9,111,add" in csv


def test_inbound_split_files_and_gzip_are_deterministic(env, capsys):
    lines = [[f"u{i}@example.com 111" for i in range(3)]]
    profiles = [{"profile_id": f"P{i}", "email": f"u{i}@example.com"} for i in range(3)]
    write_snapshot(env / "profiles" / "snap.parquet", profiles)
    put(env, ROOT1, lines)
    cfg = config(env)
    cfg.write_text(cfg.read_text().replace("gzip = true", "gzip = true\nmax_lines_per_file = 2"))
    run_json(cfg, capsys=capsys)
    names = sorted(p.name for p in (env / "out/ec/date=2017-02-03").iterdir())
    assert names == ["ftp_dpm_7_1486140844.sync.712060001.gz",
                     "ftp_dpm_7_1486140844.sync.712060002.gz"]
    texts = [gzip.decompress((env / "out/ec/date=2017-02-03" / n).read_bytes()).decode()
             for n in names]
    assert [t.count("\n") for t in texts] == [2, 1]


def test_failed_delivery_counts_still_add_up(env, capsys):
    files = put(env, ROOT1)
    split2 = f"{ROOT1}-2.sync.gz"
    data = bytearray(files[split2])
    data[-5] ^= 0xFF  # md5 mismatch found only after split 1 was read and counted
    (env / "in" / split2).write_bytes(bytes(data))
    code, report = run_json(config(env), capsys=capsys)
    d = report["deliveries"][0]
    assert d["status"] == "failed"
    received = d["records_received"]
    assert received == (d["format_errors"] + d["invalid_ids"] + d["decrypt_failures"]
                        + d["matched"] + d["unmatched"])


def test_unwritable_ledger_stops_before_publishing(env, capsys):
    """Publishing without a ledger record would republish on every rerun: refuse first."""
    put(env, ROOT1)
    cfg = config(env)
    (env / "state").mkdir()
    (env / "state" / "ledger").write_text("not a folder")
    code = main(["run", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert "ledger is not writable" in err[-1] and "Traceback" not in "".join(err)
    assert not (env / "out").exists() or outputs(env) == {}


def test_export_and_aam_feeds_share_one_retry_path(env, capsys, monkeypatch):
    """A retriable store error is retried for export files as for AAM deliveries (#11.6)."""
    from pipeline.config import load_config
    from pipeline.context import RunOptions
    from pipeline.errors import TransientError
    from pipeline.run import execute
    from pipeline.stores.local import LocalStore

    cfg = config(env, extra_feed="")
    text = cfg.read_text().replace('segments = { "111" = 1, "112" = 2, "113" = 3 }',
                                   'segments = { "111" = 1, "112" = 2, "113" = 3 }\n'
                                   'audiences = { "vip" = 9 }')
    text = text.replace('[[destinations]]\nname = "campaign"', '''[[feeds]]
name = "exports"
kind = "campaign_export"
source = "exports"
[[destinations]]
name = "campaign"''', 1)
    cfg.write_text(text)
    (env / "exports").mkdir()
    (env / "exports" / "vip_20170203.csv").write_text("audience,profile_id\nvip,P1\n")
    reads = {"n": 0}
    real = LocalStore.read_bytes

    def flaky(self, path):
        if path.endswith(".csv") and "exports" in str(self.root) and reads["n"] == 0:
            reads["n"] += 1
            raise TransientError("injected outage")
        return real(self, path)

    monkeypatch.setattr(LocalStore, "read_bytes", flaky)
    report = execute(load_config(cfg, {}), RunOptions(retry_delays=(0.0,)))
    statuses = {d.delivery: d.status for d in report.deliveries}
    assert reads["n"] == 1 and statuses["vip_20170203"] == "processed", statuses
