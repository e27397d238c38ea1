"""Test data builders: AAM deliveries, profile snapshots and config files."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
import sys
from pathlib import Path

import polars as pl

from pipeline.formats import InfoEntry, render_info
from pipeline.stores import Store, StoreOptions, open_store

REPO = Path(__file__).resolve().parents[1]
CRASH_RUNNER = REPO / "tests" / "crash_runner.py"


def delivery_files(root: str, splits: list[list[str]], gz: bool = True) -> dict[str, bytes]:
    """Split files named like AAM's (`<root>-N.sync.gz`) plus `<root>.info`, as bytes."""
    files: dict[str, bytes] = {}
    entries = []
    for n, lines in enumerate(splits, start=1):
        text = "".join(line + "\n" for line in lines).encode()
        data = gzip.compress(text, mtime=0) if gz else text
        name = f"{root}-{n}.sync" + (".gz" if gz else "")
        files[name] = data
        entries.append(InfoEntry(name, len(data), len(lines), n, hashlib.md5(data).hexdigest()))
    files[f"{root}.info"] = render_info(entries, root).encode()
    return files


def put_all(store: Store, files: dict[str, bytes], folder: str = "") -> None:
    for name, data in files.items():
        store.write_bytes(f"{folder}/{name}" if folder else name, data)


def write_snapshot(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = {"profile_id": pl.String, "email": pl.String, "phone": pl.String,
              "country": pl.String, "ecid": pl.String, "crm_id": pl.String,
              "opt_out": pl.Boolean, "blacklisted": pl.Boolean}
    pl.DataFrame(rows, schema=schema).write_parquet(path)
    return path


def two_destinations(targets: dict[str, str], traits: dict[int, int],
                     keys: dict[str, str] | None = None) -> str:
    """TOML of a `campaign` Campaign list and an `ec` AAM inbound destination (dpid 7, gzip)
    at `targets`; `keys` adds a destination's SFTP lines."""
    keys = keys or {}
    segments = ", ".join(f'"{segment}" = {trait}' for segment, trait in traits.items())
    return f"""
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{targets['campaign']}"
{keys.get('campaign', '')}
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "{targets['ec']}"
{keys.get('ec', '')}
dpid = 7
segments = {{ {segments} }}
gzip = true
"""


def read_outputs(targets: dict[str, str], sftp: StoreOptions | None = None) -> dict[str, bytes]:
    """Every file of every target, as `<destination>/<path>`: bytes (`sftp`: the options of
    targets on SFTP)."""
    files = {}
    for name, url in targets.items():
        opts = sftp if sftp is not None and url.startswith("sftp") else StoreOptions()
        store = open_store(url, opts)
        files.update({f"{name}/{e.path}": store.read_bytes(e.path) for e in store.list()})
        store.close()
    return files


def run_crashing(config: Path, stage: str, timeout: float) -> subprocess.CompletedProcess:
    """`run --json` in a child that SIGKILLs itself at `stage` (tests/crash_runner.py)."""
    return subprocess.run(
        [sys.executable, str(CRASH_RUNNER), stage, "run", "--config", str(config), "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False)


def toml_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def generated_config(tmp: Path, data: dict, tag: str, key_env: str, profiles_extra: str = "",
                     inbound_extra: str = "") -> Path:
    """Config over `localdev.generate` output: its email and phone feeds, a Campaign list and
    an AAM inbound destination, with state and outputs under `<tmp>/<tag>/`."""
    path = tmp / f"{tag}.toml"
    path.write_text(f"""
[state]
location = "{tmp}/{tag}/state"
[profiles]
snapshot = "{data['profiles']}"
default_country = "FR"
{profiles_extra}
[[feeds]]
name = "email"
source = "{data['feeds']['email']}"
id_kind = "email"
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "{key_env}"
[[feeds]]
name = "phone"
source = "{data['feeds']['phone']}"
id_kind = "phone"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp}/{tag}/campaign"
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "{tmp}/{tag}/ec"
dpid = 5
segments = {{ "111" = 1, "112" = 2, "113" = 3 }}
{inbound_extra}
""")
    return path
