"""A store that goes away mid-run: clear error, no partial output, the next run completes."""

from __future__ import annotations

import uuid
from pathlib import Path

from pipeline.config import load_config
from pipeline.context import RunOptions
from pipeline.run import execute
from pipeline.stores import StoreOptions, open_store
from tests.factories import delivery_files, put_all, write_snapshot

ROOTS = ["ftp_1234_5678_iter_1486140844000", "ftp_1234_5678_iter_1486227244000"]
LINES = [["alice@example.com 111", "bob@example.com 112"], ["carol@example.com 111"]]
PROFILES = [{"profile_id": f"P{i}", "email": f"{n}@example.com"}
            for i, n in enumerate(["alice", "bob", "carol"], start=1)]


def test_sftp_stopped_mid_run_then_next_run_completes(sftp_server, tmp_path: Path):
    opts = StoreOptions(known_hosts=sftp_server.known_hosts,
                        identity_file=sftp_server.identity_file)
    source = f"{sftp_server.url}/outage-{uuid.uuid4().hex[:8]}"
    store = open_store(source, opts)
    for root in ROOTS:
        put_all(store, delivery_files(root, LINES))
    store.close()
    write_snapshot(tmp_path / "profiles" / "p.parquet", PROFILES)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[state]
location = "state"
[profiles]
snapshot = "profiles"
[[feeds]]
name = "emails"
source = "{source}"
known_hosts = "{sftp_server.known_hosts}"
identity_file = "{sftp_server.identity_file}"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out"
""")
    config = load_config(cfg, {})
    options = RunOptions(retry_delays=(0.1, 0.1))
    try:
        report = execute(config, options, on_delivery=lambda rep: sftp_server.stop())
    finally:
        sftp_server.start()
    first, second = report.deliveries
    assert first.status == "processed"
    assert second.status == "failed"
    assert "unreachable" in second.reason
    assert "\n" not in second.reason
    assert report.exit_code() == 3
    written = sorted(p.name for p in (tmp_path / "out/emails").iterdir())
    assert written == [f"{ROOTS[0]}.csv"]  # nothing of the failed delivery

    again = execute(config, options)
    assert [d.status for d in again.deliveries] == ["skipped", "processed"]
    assert again.exit_code() == 0
    assert sorted(p.name for p in (tmp_path / "out/emails").iterdir()) == [
        f"{r}.csv" for r in ROOTS]
