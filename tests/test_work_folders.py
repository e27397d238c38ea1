"""Work folders (SPEC §14): one owner-only folder per run, removed when the run ends (also on
an error or SIGTERM); the next run removes the folders of runs whose process is gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.lock import LOCK_PATH
from pipeline.procs import process_start
from pipeline.workdir import OWNER, PREFIX, remove_stale, run_folder
from tests.factories import delivery_files, write_snapshot

RUNNER = Path(__file__).with_name("signal_runner.py")
ROOT = "ftp_1234_5678_iter_1486140844000"


def test_run_folder_is_private_and_removed(tmp_path):
    with run_folder(str(tmp_path), "RUN1") as folder:
        assert folder.parent == tmp_path
        assert folder.name == f"{PREFIX}{os.getpid()}-RUN1"
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        owner = json.loads((folder / OWNER).read_text())
        assert owner["pid"] == os.getpid() and owner["started"] == process_start(os.getpid())
        (folder / "spill.arrow").write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ZeroDivisionError), run_folder(str(tmp_path), "RUN2"):
        1 / 0  # noqa: B018
    assert list(tmp_path.iterdir()) == []


def _left(root: Path, name: str, **owner) -> Path:
    folder = root / f"{PREFIX}{name}"
    folder.mkdir(mode=0o700)
    (folder / "resolved.arrow").write_bytes(b"decrypted addresses")
    if owner:
        (folder / OWNER).write_text(json.dumps({"host": socket.gethostname(), **owner}))
    return folder


def test_only_folders_of_gone_processes_are_removed(tmp_path):
    me, started = os.getpid(), process_start(os.getpid())
    dead = _left(tmp_path, "dead", pid=2**22 + 11, started=1.0)
    reused = _left(tmp_path, "reused", pid=me, started=started - 3600)  # pid reused since
    live = _left(tmp_path, "live", pid=me, started=started)
    other_host = _left(tmp_path, "remote", pid=2**22 + 11, started=1.0)
    (other_host / OWNER).write_text(json.dumps({"host": "elsewhere", "pid": 2**22 + 11}))
    unnamed_dead = _left(tmp_path, f"{2**22 + 13}-RUN")  # killed before writing its owner
    foreign = tmp_path / "something-else"
    foreign.mkdir()
    assert remove_stale(tmp_path) == 3
    assert not dead.exists() and not reused.exists() and not unnamed_dead.exists()
    assert live.exists() and other_host.exists() and foreign.exists()


@pytest.fixture
def env(tmp_path: Path) -> Path:
    (tmp_path / "in").mkdir()
    for name, data in delivery_files(ROOT, [["alice@example.com 111"]]).items():
        (tmp_path / "in" / name).write_bytes(data)
    write_snapshot(tmp_path / "profiles" / "p.parquet",
                   [{"profile_id": "P1", "email": "alice@example.com"}])
    (tmp_path / "c.toml").write_text("""
[state]
location = "state"
work_dir = "work"
[profiles]
snapshot = "profiles"
[[feeds]]
name = "emails"
source = "in"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out"
""")
    return tmp_path


def _start_paused(env: Path) -> subprocess.Popen:
    ready = env / "ready"
    proc = subprocess.Popen([sys.executable, str(RUNNER), str(ready), "run", "--config",
                             str(env / "c.toml"), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the run never reached its pause"
        time.sleep(0.05)
    return proc


def _work_folders(env: Path) -> list[Path]:
    return sorted((env / "work").glob(f"{PREFIX}*"))


def test_sigterm_ends_the_run_like_an_interrupt(env):
    proc = _start_paused(env)
    [folder] = _work_folders(env)
    assert any(folder.rglob("*.arrow"))  # spilled index files are there while it runs
    assert (env / "state" / LOCK_PATH).exists()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert json.loads(out)["error"] == "terminated (SIGTERM)"
    assert _work_folders(env) == []
    assert not (env / "state" / LOCK_PATH).exists()
    [saved] = (env / "state" / "runs").glob("*.json")
    assert json.loads(saved.read_text())["error"] == "terminated (SIGTERM)"


def test_next_run_removes_the_folder_of_a_killed_run(env):
    proc = _start_paused(env)
    [folder] = _work_folders(env)
    proc.kill()
    proc.communicate(timeout=60)
    assert folder.exists() and (env / "state" / LOCK_PATH).exists()  # left by SIGKILL
    again = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--config",
                            str(env / "c.toml"), "--json"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["deliveries"][0]["status"] == "processed"
    assert _work_folders(env) == []
    assert not (env / "state" / LOCK_PATH).exists()


def test_decrypted_addresses_stay_out_of_spills_without_a_contacts_destination(
        tmp_path, monkeypatch, capsys):
    from localdev.generate import KEY_ENV, GenerateSpec, demo_key, generate
    from pipeline.cli import main
    from pipeline.spill import Spill

    data = generate(tmp_path / "data", GenerateSpec(lines=400, profiles=300, files=1))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[state]
location = "{tmp_path}/state"
work_dir = "{tmp_path}/work"
[profiles]
snapshot = "{data['profiles']}"
[[feeds]]
name = "email"
source = "{data['feeds']['email']}"
id_kind = "email"
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "{KEY_ENV}"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp_path}/out"
""")
    spilled: dict[str, set[str]] = {}
    real = Spill.write

    def spy(self, name, frame, bucket=None, part=None):
        spilled.setdefault(name, set()).update(frame.columns)
        return real(self, name, frame, bucket, part)

    monkeypatch.setattr(Spill, "write", spy)
    assert main(["run", "--config", str(cfg), "--json"], env={KEY_ENV: demo_key(1).hex()}) == 0
    report = json.loads(capsys.readouterr().out)["deliveries"][0]
    assert report["unmatched"] > 0  # there were addresses without a profile to leak
    assert "key" in spilled["resolved"] and "contact" not in spilled["resolved"]
    assert "contacts" not in spilled
