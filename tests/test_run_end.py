"""How a run ends: every run that took the lock leaves a report saying how; errors name the
step that failed; one delivery's failure (full work disk) is that delivery's."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from moto.server import ThreadedMotoServer

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.context import RunOptions
from pipeline.errors import FatalError, PipelineError
from pipeline.flows import aam
from pipeline.lock import LOCK_PATH
from pipeline.run import execute
from pipeline.spill import Spill
from tests.factories import delivery_files, write_snapshot

ROOTS = ["ftp_1234_5678_iter_1486140844000", "ftp_1234_5678_iter_1486227244000"]
LINES = [["alice@example.com 111", "bob@example.com 112"]]
PROFILES = [{"profile_id": "P1", "email": "alice@example.com"},
            {"profile_id": "P2", "email": "bob@example.com"}]


def _env(tmp: Path, state: str = "state", feed_extra: str = "") -> Path:
    (tmp / "in").mkdir(exist_ok=True)
    for root in ROOTS:
        for name, data in delivery_files(root, LINES).items():
            (tmp / "in" / name).write_bytes(data)
    write_snapshot(tmp / "profiles" / "p.parquet", PROFILES)
    cfg = tmp / "c.toml"
    cfg.write_text(f"""
[state]
location = "{state}"
work_dir = "work"
[profiles]
snapshot = "profiles"
[[feeds]]
name = "emails"
source = "in"
{feed_extra}
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out"
""")
    return cfg


def _saved_runs(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state / "runs").glob("*.json"))]


def test_full_work_disk_fails_that_delivery_not_the_run(tmp_path, capsys, monkeypatch):
    cfg = _env(tmp_path)
    real = Spill.write
    calls = {"n": 0}

    def full_on_first_delivery(self, name, frame, bucket=None, part=None):
        calls["n"] += 1
        if calls["n"] == 1:  # the first spill write of the run: first delivery's lines
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, name, frame, bucket, part)

    monkeypatch.setattr(Spill, "write", full_on_first_delivery)
    code = main(["run", "--config", str(cfg), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 3
    first, second = report["deliveries"]
    assert (first["status"], first["reason"]) == ("failed",
                                                 "work disk full (No space left on device)")
    assert second["status"] == "processed" and second["matched"] == 2
    assert report["error"] is None
    assert _saved_runs(tmp_path / "state")[0]["deliveries"][0]["status"] == "failed"
    assert list((tmp_path / "work").iterdir()) == []


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 3 MB file system (tmpfs): needs root and mount rights, else the test skips."""
    import shutil
    import subprocess
    folder = tmp_path / "small"
    folder.mkdir()
    if not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(folder)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_really_full_work_disk_fails_only_the_big_delivery(tmp_path, small_disk, capsys,
                                                           monkeypatch):
    # The first delivery's spills (polars writing Arrow IPC) fill a 3 MB work disk; the
    # second, small one is processed after it in the same run. One-bucket deliveries keep
    # up to MEMORY_ROWS spilled rows in memory: none here, so this one goes to the disk.
    monkeypatch.setattr(aam, "MEMORY_ROWS", 0)
    cfg = _env(tmp_path)
    cfg.write_text(cfg.read_text().replace('work_dir = "work"', f'work_dir = "{small_disk}"'))
    big = [f"user{i:07d}@example.com 111,112,113 114" for i in range(200_000)]
    for name, data in delivery_files(ROOTS[0], [big]).items():
        (tmp_path / "in" / name).write_bytes(data)
    code = main(["run", "--config", str(cfg), "--json"])
    report = json.loads(capsys.readouterr().out)
    first, second = report["deliveries"]
    assert (first["status"], first["reason"]) == ("failed",
                                                 "work disk full (No space left on device)")
    assert (second["status"], second["matched"]) == ("processed", 2)
    assert code == 3 and report["error"] is None
    assert list(small_disk.iterdir()) == []


def test_fatal_error_mid_run_leaves_a_report_naming_the_step(tmp_path, capsys, monkeypatch):
    cfg = _env(tmp_path)

    def denied(self, unit, rep):
        raise FatalError("out/x.csv: permission denied")

    from pipeline.flows.aam import AamFlow
    monkeypatch.setattr(AamFlow, "process", denied)
    code = main(["run", "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    why = f"feed emails, delivery {ROOTS[0]}: out/x.csv: permission denied"
    assert code == 1
    assert err == f"error: {why}"
    [saved] = _saved_runs(tmp_path / "state")
    assert (saved["error"], saved["status"]) == (why, "failed")
    assert not (tmp_path / "state" / LOCK_PATH).exists()
    assert list((tmp_path / "work").iterdir()) == []


def test_s3_outage_mid_run_is_reported_where_it_happened(tmp_path, s3_endpoint, monkeypatch):
    # The state location is on an S3 server of its own, which goes down after the first
    # delivery: the run fails naming the step (the second delivery's ledger read), not the
    # release of the lock that follows.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import boto3
    boto3.client("s3").create_bucket(Bucket="state")
    config = load_config(_env(tmp_path, state="s3://state/pipeline"), {})
    stopped = []

    def outage(rep):
        if not stopped:
            server.stop()
            stopped.append(True)

    try:
        with pytest.raises(PipelineError) as raised:
            execute(config, RunOptions(retry_delays=(0.0,)), on_delivery=outage)
    finally:
        if not stopped:
            server.stop()
    message = str(raised.value)
    assert message.startswith(f"feed emails, delivery {ROOTS[1]}: read its ledger entry: "
                              "s3://state/pipeline/ledger/"), message
    assert "unreachable" in message and "lock" not in message


def test_status_needs_no_decryption_key(tmp_path, capsys):
    cfg = _env(tmp_path, feed_extra='id_encoding = "encrypted"\ndecryption = "aes-gcm"\n'
                                    'key_env = "NOT_SET_ANYWHERE"')
    assert main(["run", "--config", str(cfg)], env={}) == 2  # a run needs it
    capsys.readouterr()
    assert main(["status", "--config", str(cfg), "--json"], env={}) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == []


def test_work_dir_must_be_local(tmp_path):
    from pipeline.errors import ConfigError
    cfg = _env(tmp_path)
    cfg.write_text(cfg.read_text().replace('work_dir = "work"', 'work_dir = "s3://b/w"'))
    with pytest.raises(ConfigError, match="state.work_dir"):
        load_config(cfg, {})




def test_a_run_whose_lock_was_taken_over_stops_before_the_next_delivery(tmp_path, monkeypatch):
    # Its renewals failed for a whole lease and another host took the lock over: the run
    # must not go on publishing beside the new holder.
    import threading
    from datetime import UTC, datetime, timedelta

    from pipeline import lock as lock_module
    monkeypatch.setattr(lock_module, "RENEW_EVERY", timedelta(seconds=0.05))
    config = load_config(_env(tmp_path), {})
    state = tmp_path / "state"
    noticed = threading.Event()
    renew = lock_module.StateLock.renew
    # Renewal reads, checks, then writes: a takeover landing between the two would be
    # overwritten. A real takeover follows a lapsed lease (no renewal running); here the
    # heartbeat keeps beating, so the takeover waits for a renewal to finish.
    between_beats = threading.Lock()

    def watched_renew(self):
        with between_beats:
            renew(self)
        if self.lost:
            noticed.set()

    monkeypatch.setattr(lock_module.StateLock, "renew", watched_renew)

    def taken_over(rep):
        with between_beats:
            (state / LOCK_PATH).write_text(json.dumps({
                "run_id": "newcomer", "token": "newcomer", "host": "another-host", "pid": 1,
                "since": datetime.now(UTC).isoformat(),
                "expires": (datetime.now(UTC) + timedelta(minutes=10)).isoformat()}))
        assert noticed.wait(30)  # the next heartbeat finds it

    with pytest.raises(FatalError, match="state lock was taken over"):
        execute(config, RunOptions(), on_delivery=taken_over)
    [saved] = _saved_runs(state)
    assert [d["status"] for d in saved["deliveries"]] == ["processed"]  # not the second
    assert json.loads((state / LOCK_PATH).read_text())["run_id"] == "newcomer"  # kept
