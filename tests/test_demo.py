"""`demo` end to end in a subprocess: two runs, the second skips what is done and sends the
changed Campaign audience as a diff and the next full ECID delivery with its leavers; the
rerun-by-hand files it points to exist."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_twice_and_publishes_the_export_as_a_diff(tmp_path):
    done = subprocess.run(
        [sys.executable, "run_pipeline.py", "demo", "--output", str(tmp_path / "d"),
         "--lines", "300", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    runs = json.loads(done.stdout)
    first, second = runs["first_run"], runs["second_run"]
    assert first["deliveries_by_status"] == {"processed": 4}
    assert second["deliveries_by_status"] == {"skipped": 4, "processed": 2}
    full = next(d for d in second["deliveries"]
                if d["status"] == "processed" and d["feed"] == "aam-ecids")
    assert "_full_" in full["delivery"] and full["leavers"] > 0  # SPEC §11: leavers removed
    assert second["leavers"] == full["leavers"]
    export = next(d for d in second["deliveries"]
                  if d["status"] == "processed" and d["feed"] == "campaign-audiences")
    assert export["feed"] == "campaign-audiences"
    members = export["matched"] - export["suppressed"]
    changes = export["rows_written"]["experience-cloud"]
    assert 0 < changes < members  # a diff, not the whole membership again
    env_file = tmp_path / "d" / "demo.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert "AWS_ENDPOINT_URL=" in env_file.read_text()
    assert (tmp_path / "d" / "demo.toml").is_file()
    # SPEC §12: the ECID partner's files arrive encrypted and signed with `gpg`, the contacts
    # leave encrypted to the reader's key, who opens them with `gpg --decrypt`
    ecids = [d for d in first["deliveries"] if d["feed"] == "aam-ecids"]
    assert ecids and all(d["status"] == "processed" and d["records_received"] > 0 for d in ecids)
    contacts = [p.split(":", 1)[1] for d in first["deliveries"] for p in d["outputs"]
                if p.startswith("no-profile-contacts:")]
    assert contacts and all(p.endswith(".csv.pgp") for p in contacts)
    sealed = tmp_path / "d" / "sftp" / "contacts" / contacts[0]
    opened = subprocess.run(["gpg", "--homedir", str(tmp_path / "d" / "keys" / "contacts-reader"),
                             "--batch", "--quiet", "--decrypt", str(sealed)],
                            capture_output=True, check=True).stdout
    assert opened.startswith(b"contact,segment_id,action,delivery")
    subprocess.run(["gpgconf", "--homedir", str(tmp_path / "d" / "keys" / "contacts-reader"),
                    "--kill", "all"], check=False)
