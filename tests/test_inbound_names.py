"""AAM inbound names are unique per (destination, delivery) and deterministic (SPEC §5)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.factories import delivery_files, write_snapshot
from tests.test_runs import outputs

PROFILES = [{"profile_id": f"P{i}", "email": f"u{i}@example.com"} for i in range(6)]
DAY = "date=2017-02-03"


def config(tmp: Path) -> Path:
    path = tmp / "c.toml"
    path.write_text("""
[state]
location = "state"
[profiles]
snapshot = "profiles"
[[feeds]]
name = "emails"
source = "in"
[[feeds]]
name = "more"
source = "in2"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out/campaign"
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "out/ec"
dpid = 7
id = "profile_id"
segments = { "111" = 1 }
gzip = true
""")
    return path


@pytest.fixture
def env(tmp_path: Path) -> Path:
    write_snapshot(tmp_path / "profiles" / "snap.parquet", PROFILES)
    return tmp_path


def put(tmp: Path, feed_folder: str, root: str, users: range, folder: str = "") -> None:
    target = tmp / feed_folder / folder
    target.mkdir(parents=True, exist_ok=True)
    lines = [[f"u{i}@example.com 111" for i in users]]
    for name, data in delivery_files(root, lines).items():
        (target / name).write_bytes(data)


def run(cfg: Path, capsys, *args: str) -> tuple[int, dict]:
    code = main(["run", "--config", str(cfg), "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def inbound(tmp: Path) -> dict[str, list[str]]:
    """Inbound files (path -> lines) under out/ec, manifests left out."""
    return {p.relative_to(tmp / "out/ec").as_posix():
            gzip.decompress(p.read_bytes()).decode().splitlines()
            for p in sorted((tmp / "out/ec").rglob("*.gz"))}


def test_two_feeds_delivering_in_the_same_second_lose_nothing(env, capsys):
    put(env, "in", "ftp_1234_5678_iter_1486140844000", range(0, 3))
    put(env, "in2", "ftp_1234_9999_iter_1486140844900", range(3, 6))  # same second
    cfg = config(env)
    code, report = run(cfg, capsys)
    assert code == 0 and report["deliveries_by_status"] == {"processed": 2}
    files = inbound(env)
    assert len(files) == 2
    assert all(p.startswith(f"{DAY}/ftp_dpm_7_1486140844.sync.") for p in files)
    assert sorted(sum(files.values(), [])) == [f"P{i}\td_sid=1" for i in range(6)]
    before = outputs(env)
    assert run(cfg, capsys, "--force")[0] == 0
    assert outputs(env) == before  # same names, same bytes


def test_undated_deliveries_of_one_date_folder_lose_nothing(env, capsys):
    put(env, "in", "ftp_1234_5678_iter", range(0, 3), folder=DAY)
    put(env, "in", "ftp_1234_5679_iter", range(3, 6), folder=DAY)
    code, report = run(config(env), capsys)
    assert code == 0 and report["deliveries_by_status"] == {"processed": 2}
    files = inbound(env)
    assert len(files) == 2 and all(p.startswith(f"{DAY}/ftp_dpm_7_1486080000.sync.")
                                   for p in files)  # midnight of the folder's date
    assert sorted(sum(files.values(), [])) == [f"P{i}\td_sid=1" for i in range(6)]


@pytest.mark.parametrize(("root", "folder"), [
    ("ftp_1234_5679_iter", ""),  # no TIMESTAMP, no date= folder
    ("ftp_1234_5679_iter_0000000005000", ""),  # 1970-01-01 00:00:05
    ("ftp_1234_5679_iter", "date=1970-01-01"),
])
def test_a_delivery_without_a_usable_date_fails_instead_of_landing_in_1970(env, capsys, root,
                                                                           folder):
    put(env, "in", "ftp_1234_5678_iter_1486140844000", range(0, 3))
    put(env, "in", root, range(3, 6), folder=folder)
    code, report = run(config(env), capsys)
    assert code == 3
    (undated,) = [d for d in report["deliveries"] if d["delivery"] == root]
    assert undated["status"] == "failed" and "no usable date" in undated["reason"]
    assert undated["outputs"] == []
    assert not any("1970" in name or "5679" in name for name in outputs(env))


def test_a_name_taken_by_another_delivery_fails_loudly_and_overwrites_nothing(env, capsys):
    root = "ftp_1234_5678_iter_1486140844000"
    put(env, "in", root, range(0, 3))
    cfg = config(env)
    run(cfg, capsys)
    (name,) = inbound(env)
    # The file now belongs to someone else: not in this delivery's manifest, other bytes.
    (env / "out/ec/_manifests/emails" / f"{root}.json").unlink()
    foreign = gzip.compress(b"X1\td_sid=1\n", mtime=0)
    (env / "out/ec" / name).write_bytes(foreign)
    (env / "out/campaign/emails" / f"{root}.csv").unlink()
    code, report = run(cfg, capsys, "--force")
    (rep,) = report["deliveries"]
    assert code == 1 and rep["status"] == "failed"
    assert rep["reason"] == (f"destinations.ec: {name} already holds another delivery's "
                             "output; nothing published")
    assert (env / "out/ec" / name).read_bytes() == foreign
    assert not (env / "out/campaign/emails" / f"{root}.csv").exists()  # nothing published
