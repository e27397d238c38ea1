"""Crash recovery of membership (SPEC §11): SIGKILL between publishing a delivery's outputs and
saving its membership version, between that and its ledger record, and between two feeds;
the next `run` ends with the same outputs and the same membership as an uninterrupted run."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline.membership import FeedMembership
from pipeline.spill import Spill
from pipeline.stores import StoreOptions, open_store
from tests.factories import (
    delivery_files,
    put_all,
    read_outputs,
    run_crashing,
    two_destinations,
    write_snapshot,
)

FEEDS = {
    "feed-a": {"ftp_1_2_full_1486140844000": [["alice@example.com 111,112", "bob@example.com 111"],
                                              ["carol@example.com 113"]],
               "ftp_1_2_full_1486227244000": [["alice@example.com 111", "bob@example.com 111"],
                                              ["carol@example.com 113", "dave@example.com 112"]]},
    "feed-b": {"ftp_1_3_full_1486140844000": [["alice@example.com 111", "bob@example.com 112"]],
               "ftp_1_3_iter_1486227244000": [["carol@example.com 111", "bob@example.com  112"]]},
}
PROFILES = [{"profile_id": f"P{i}", "email": f"{n}@example.com"}
            for i, n in enumerate(["alice", "bob", "carol", "dave"], start=1)]


class Setup:
    def __init__(self, tmp: Path, where: str, request) -> None:
        tag = uuid.uuid4().hex[:8]
        self.tmp = tmp
        write_snapshot(tmp / "profiles" / "snap.parquet", PROFILES)
        self.opts, keys = StoreOptions(), ""
        if where == "local":
            root, self.state = str(tmp), str(tmp / "state")
            self.targets = {"campaign": str(tmp / "out/campaign"), "ec": str(tmp / "out/ec")}
        else:
            server = request.getfixturevalue("sftp_server")
            bucket = request.getfixturevalue("make_bucket")()
            self.opts = StoreOptions(known_hosts=server.known_hosts,
                                     identity_file=server.identity_file)
            keys = (f'known_hosts = "{server.known_hosts}"\n'
                    f'identity_file = "{server.identity_file}"\n')
            root, self.state = f"{server.url}/crash-{tag}", f"s3://{bucket}/state/"
            self.targets = {"campaign": f"s3://{bucket}/campaign/", "ec": f"s3://{bucket}/ec/"}
        feeds = ""
        for name, deliveries in FEEDS.items():
            source = open_store(f"{root}/{name}", self.opts)
            for delivery_root, splits in deliveries.items():
                put_all(source, delivery_files(delivery_root, splits))
            source.close()
            feeds += (f'[[feeds]]\nname = "{name}"\nsource = "{root}/{name}"\n{keys}'
                      'id_kind = "email"\n')
        self.config = tmp / "c.toml"
        self.config.write_text(f"""
[state]
location = "{self.state}"
[profiles]
snapshot = "{tmp}/profiles"
{feeds}""" + two_destinations(self.targets, {111: 1, 112: 2, 113: 3}))

    def run(self, stage: str = "none") -> subprocess.CompletedProcess:
        return run_crashing(self.config, stage, timeout=180)

    def outputs(self) -> dict[str, bytes]:
        return read_outputs(self.targets)

    def membership(self) -> dict[str, tuple]:
        """Per feed: (delivery, pairs) of every version and the newest version's pairs."""
        store = open_store(self.state)
        out = {}
        for feed in FEEDS:
            fm = FeedMembership(store, feed)
            head = fm.head()
            spill = Spill(self.tmp / f"load-{uuid.uuid4().hex[:6]}")
            fm.load(head.newest, 1, spill)
            part = spill.scan("members")
            rows = sorted(part.collect().rows()) if part is not None else []
            out[feed] = ([(v.delivery, v.pairs) for v in head.versions], rows)
        store.close()
        return out


@pytest.mark.parametrize(("where", "stage"), [
    ("local", "before_membership:2"),  # feed-a's second delivery: published, version not saved
    ("local", "before_ledger:2"),  # its version saved, ledger record not written
    ("local", "between_feeds"),
    ("remote", "before_membership:2"),
])
def test_crash_then_run_gives_same_outputs_and_membership(where, stage, tmp_path, request):
    reference = Setup(tmp_path / "reference", where, request)
    done = reference.run()
    assert done.returncode == 0, done.stderr[-2000:]
    expected, membership = reference.outputs(), reference.membership()
    assert membership["feed-a"] == (
        [("ftp_1_2_full_1486140844000", 4), ("ftp_1_2_full_1486227244000", 4)],
        [("P1", 111), ("P2", 111), ("P3", 113), ("P4", 112)])
    leaver = b"P1,112,remove,,ftp_1_2_full_1486227244000"
    assert leaver in expected["campaign/feed-a/ftp_1_2_full_1486227244000.csv"]

    setup = Setup(tmp_path / "crashed", where, request)
    crashed = setup.run(stage)
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert setup.outputs() != expected  # the crash did leave work undone
    again = setup.run()
    assert again.returncode == 0, again.stderr[-2000:]
    assert setup.outputs() == expected
    assert setup.membership() == membership
