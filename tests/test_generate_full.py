"""`generate` writes `full` deliveries (SPEC §11): the same members every day, no removal
lists, each day without a different tenth of the lines."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from localdev.generate import MISSING_EVERY, GenerateSpec, generate
from pipeline.cli import main


def lines_by_root(folder: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.sync.gz")):
        root = path.name.partition("-")[0].removesuffix(".sync.gz")
        out.setdefault(root, []).extend(gzip.decompress(path.read_bytes()).decode().splitlines())
    return out


def test_full_feed_repeats_its_members_less_one_tenth_a_day(tmp_path):
    result = generate(tmp_path, GenerateSpec(lines=400, profiles=200, files=2, deliveries=3,
                                             full_feeds=("ecid",)))
    ecid = lines_by_root(Path(result["feeds"]["ecid"]))
    assert [r.split("_")[3] for r in ecid] == ["full"] * 3
    assert all(r.split("_")[3] == "iter" for r in lines_by_root(Path(result["feeds"]["email"])))
    days = [set(lines) for lines in ecid.values()]
    every = set().union(*days)
    assert all(len(line.split(" ")) == 2 for line in every)  # no removal lists
    for day in days:  # each day lacks its own tenth of the 40 lines
        assert len(day) == 40 - 40 // MISSING_EVERY
    assert days[0] - days[1] and days[1] - days[0]  # leavers and returners every day
    assert days[0] - days[1] == every - days[1]


def test_cli_full_feeds(tmp_path, capsys):
    argv = ["generate", "--output", str(tmp_path), "--lines", "50", "--profiles", "20"]
    assert main([*argv, "--full-feeds", "phone,ecid"]) == 0
    files = json.loads(capsys.readouterr().out)["files"]
    assert all("_full_" in n for n in files["phone"] + files["ecid"])
    assert all("_iter_" in n for n in files["email"])
    assert main([*argv, "--full-feeds", "fax"]) == 2
    assert "unknown feed 'fax'" in capsys.readouterr().err
