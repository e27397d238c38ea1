"""Crash recovery: SIGKILL at each stage boundary, then `run` -> same outputs as no crash."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from pipeline.stores import StoreOptions, open_store
from tests.factories import (
    delivery_files,
    put_all,
    read_outputs,
    run_crashing,
    two_destinations,
    write_snapshot,
)

ROOTS = ["ftp_1234_5678_iter_1486140844000", "ftp_1234_5678_iter_1486227244000"]
LINES = [["alice@example.com 111,112", "bob@example.com 113"], ["carol@example.com 111 112"]]
PROFILES = [{"profile_id": f"P{i}", "email": f"{n}@example.com"}
            for i, n in enumerate(["alice", "bob", "carol"], start=1)]
STAGES = ["after_ingest", "after_resolve", "mid_publish", "before_ledger"]


class Setup:
    """Source, targets and state either all local or on SFTP (sshd) and S3 (moto)."""

    def __init__(self, tmp: Path, where: str, request) -> None:
        tag = uuid.uuid4().hex[:8]
        write_snapshot(tmp / "profiles" / "snap.parquet", PROFILES)
        self.sftp_opts = StoreOptions()
        sftp_keys = ""
        if where == "local":
            self.source, self.state = str(tmp / "in"), str(tmp / "state")
            self.targets = {"campaign": str(tmp / "out/campaign"), "ec": str(tmp / "out/ec")}
        else:
            server = request.getfixturevalue("sftp_server")
            bucket = request.getfixturevalue("make_bucket")()
            self.sftp_opts = StoreOptions(known_hosts=server.known_hosts,
                                          identity_file=server.identity_file)
            sftp_keys = (f'known_hosts = "{server.known_hosts}"\n'
                         f'identity_file = "{server.identity_file}"\n')
            self.source = f"{server.url}/crash-{tag}/in"
            self.state = f"s3://{bucket}/state/"
            self.targets = {"campaign": f"{server.url}/crash-{tag}/campaign",
                            "ec": f"s3://{bucket}/ec/"}
        src = open_store(self.source, self.sftp_opts)
        for root in ROOTS:
            put_all(src, delivery_files(root, LINES))
        src.close()
        keys = {k: (sftp_keys if v.startswith("sftp") else "") for k, v in self.targets.items()}
        self.config = tmp / "c.toml"
        self.config.write_text(f"""
[state]
location = "{self.state}"
[profiles]
snapshot = "{tmp}/profiles"
[[feeds]]
name = "emails"
source = "{self.source}"
{sftp_keys if self.source.startswith("sftp") else ""}
id_kind = "email"
""" + two_destinations(self.targets, {111: 1, 112: 2, 113: 3}, keys))

    def run(self, stage: str = "none") -> subprocess.CompletedProcess:
        return run_crashing(self.config, stage, timeout=120)

    def outputs(self) -> dict[str, bytes]:
        return read_outputs(self.targets, self.sftp_opts)

    def ledger(self) -> dict[str, str]:
        store = open_store(self.state, StoreOptions())
        out = {r: json.loads(store.read_bytes(f"ledger/emails/{r}.json"))["status"]
               for r in ROOTS}
        store.close()
        return out


@pytest.mark.parametrize("where", ["local", "remote"])
def test_crash_at_each_stage_then_run_equals_uninterrupted(where, tmp_path, request):
    reference = Setup(tmp_path / "reference", where, request)
    done = reference.run()
    assert done.returncode == 0, done.stderr
    expected = reference.outputs()
    assert len(expected) == 8  # per delivery: csv, sync.gz and a manifest for each target

    for stage in STAGES:
        setup = Setup(tmp_path / stage, where, request)
        crashed = setup.run(stage)
        assert crashed.returncode == -9, (stage, crashed.stderr[-500:])
        partial = setup.outputs()
        assert not any(".part" in p for p in partial), stage
        for path, data in partial.items():  # whatever exists under a final name is whole
            assert expected[path] == data, (stage, path)
        again = setup.run()
        assert again.returncode == 0, (stage, again.stderr[-500:])
        assert setup.outputs() == expected, stage
        assert setup.ledger() == dict.fromkeys(ROOTS, "processed"), stage
