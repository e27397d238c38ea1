"""Nightly reuse of the normalized snapshot index from the state location."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from localdev.generate import KEY_ENV, GenerateSpec, demo_key, generate
from pipeline import snapshot
from pipeline.cli import main


def _config(tmp: Path, data: dict, tag: str, extra: str = "") -> Path:
    path = tmp / f"{tag}.toml"
    path.write_text(f"""
[state]
location = "{tmp}/{tag}/state"
[profiles]
snapshot = "{data['profiles']}"
default_country = "FR"
{extra}
[[feeds]]
name = "email"
source = "{data['feeds']['email']}"
id_kind = "email"
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "{KEY_ENV}"
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
""")
    return path


@pytest.fixture()
def data(tmp_path: Path) -> dict:
    return generate(tmp_path / "data", GenerateSpec(lines=2000, profiles=1500, files=2))


@pytest.fixture()
def builds(monkeypatch) -> list[int]:
    """Counts snapshot normalizations (the costly part the cache spares)."""
    calls: list[int] = []
    real = snapshot.profile_table

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(snapshot, "profile_table", counted)
    return calls


def _run(cfg: Path, *args: str) -> None:
    code = main(["run", "--config", str(cfg), "--json", *args],
                env={KEY_ENV: demo_key(1).hex()})
    assert code == 0


def _outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for sub in ("campaign", "ec") for p in sorted((folder / sub).rglob("*"))
            if p.is_file()}


def _cached(state: Path) -> list[Path]:
    return sorted((state / snapshot.CACHE_FOLDER).glob("*/index.json"))


def test_unchanged_snapshot_reuses_the_index(tmp_path, data, builds, capsys):
    cfg = _config(tmp_path, data, "night")
    _run(cfg)
    assert builds  # night 1 normalizes the snapshot
    first = _outputs(tmp_path / "night")
    markers = _cached(tmp_path / "night/state")
    assert len(markers) == 1
    builds.clear()
    _run(cfg, "--force")
    assert builds == []  # night 2: read from the state location, not rebuilt
    assert _outputs(tmp_path / "night") == first
    assert _cached(tmp_path / "night/state") == markers


def test_cache_holds_no_plain_phone_numbers_or_emails(tmp_path, data, capsys):
    _run(_config(tmp_path, data, "night"))
    folder = _cached(tmp_path / "night/state")[0].parent
    profiles = pl.read_parquet(data["profiles"])
    plain = set(profiles["phone"].drop_nulls()) | set(profiles["email"].drop_nulls())
    parts = sorted(folder.glob("part-*.arrow"))
    assert parts
    for part in parts:
        table = pl.read_ipc(part)
        assert set(table.columns) == {"profile_id", "suppressed", "ecid", "crm_id",
                                      "email_key", "phone_key", "ecid_key", "crm_key"}
        for column in table.columns:
            values = table[column].cast(pl.String).drop_nulls()
            assert not values.str.contains("@", literal=True).any(), column
            assert not values.is_in(list(plain)).any(), column
            assert not values.str.starts_with("+33").any(), column  # no E.164 number
        assert table["phone_key"].drop_nulls().len() == profiles.height  # the keys are there


def test_changed_snapshot_is_never_reused(tmp_path, data, builds, capsys):
    cfg = _config(tmp_path, data, "night")
    _run(cfg)
    old = _cached(tmp_path / "night/state")
    # The same file name and profiles; every profile now opted out: outputs must change.
    profiles = pl.read_parquet(data["profiles"])
    profiles.with_columns(opt_out=pl.lit(True)).write_parquet(data["profiles"])
    builds.clear()
    _run(cfg, "--force")
    assert builds  # rebuilt
    new = _cached(tmp_path / "night/state")
    assert len(new) == 1 and new != old  # the stale cache is gone
    # Same outputs as a run that never had a cache.
    _run(_config(tmp_path, data, "fresh"))
    assert _outputs(tmp_path / "night") == _outputs(tmp_path / "fresh")


def test_index_cache_can_be_turned_off(tmp_path, data, builds, capsys):
    cfg = _config(tmp_path, data, "night", extra="index_cache = false")
    _run(cfg)
    _run(cfg, "--force")
    assert builds == [1, 1]  # one slice, normalized on both nights
    assert _cached(tmp_path / "night/state") == []
