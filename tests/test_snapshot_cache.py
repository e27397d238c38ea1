"""Nightly reuse of the normalized snapshot index from the state location."""

from __future__ import annotations

import threading
from pathlib import Path

import polars as pl
import pytest

from localdev.generate import KEY_ENV, GenerateSpec, demo_key, generate
from pipeline import snapshot
from pipeline.cli import main
from pipeline.config import Location
from pipeline.lock import LOCK_PATH
from pipeline.stages import publish
from pipeline.stores.local import LocalStore
from tests.factories import generated_config


def _config(tmp: Path, data: dict, tag: str, extra: str = "") -> Path:
    return generated_config(tmp, data, tag, KEY_ENV, profiles_extra=extra)


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


def _cache_files(state: Path) -> list[Path]:
    return sorted(p for p in (state / snapshot.CACHE_FOLDER).rglob("*") if p.is_file())


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("unexpected")])
def test_failing_cache_write_leaves_no_cache_and_the_run_succeeds(
        tmp_path, data, builds, monkeypatch, capsys, error):
    monkeypatch.setattr(snapshot, "SLICE_ROWS", 600)  # 1500 profiles: three cache parts
    real = LocalStore.put_file
    puts: list[str] = []

    def second_part_fails(self, local_path: str, path: str, consume: bool = False) -> None:
        if path.startswith(snapshot.CACHE_FOLDER):
            puts.append(path)
            if len(puts) == 2:  # the first part is in the store already
                raise error
        real(self, local_path, path, consume)

    monkeypatch.setattr(LocalStore, "put_file", second_part_fails)
    cfg = _config(tmp_path, data, "night")
    _run(cfg)  # exit 0: the cache is an optimization
    assert len(puts) == 2
    state = tmp_path / "night/state"
    assert _cached(state) == [] and _cache_files(state) == []  # the written part was removed
    first = _outputs(tmp_path / "night")
    monkeypatch.setattr(LocalStore, "put_file", real)
    builds.clear()
    _run(cfg, "--force")
    assert builds  # night 2 rebuilt the index, and wrote the cache this time
    assert _outputs(tmp_path / "night") == first
    assert len(_cached(state)) == 1


def test_the_cache_is_written_while_the_delivery_goes_on(tmp_path, data, monkeypatch, capsys):
    """Night 1: the first delivery is published while the cache write waits; the write is
    finished before the run ends, under the lock."""
    published = threading.Event()
    real_publish = publish.publish_outputs

    def publish_outputs(*args, **kwargs):
        result = real_publish(*args, **kwargs)
        published.set()
        return result

    real_put = LocalStore.put_file
    waited: list[bool] = []

    def put_file(self, local_path: str, path: str, consume: bool = False) -> None:
        if path.startswith(snapshot.CACHE_FOLDER) and not waited:
            waited.append(published.wait(timeout=15))  # False: the delivery waited for us
        real_put(self, local_path, path, consume)

    real_write = LocalStore.write_bytes
    locked: list[bool] = []

    def write_bytes(self, path: str, payload: bytes) -> None:
        if path.endswith("/index.json"):
            locked.append((Path(self.root) / LOCK_PATH).exists())
        real_write(self, path, payload)

    monkeypatch.setattr(publish, "publish_outputs", publish_outputs)
    monkeypatch.setattr(LocalStore, "put_file", put_file)
    monkeypatch.setattr(LocalStore, "write_bytes", write_bytes)
    _run(_config(tmp_path, data, "night"))
    assert waited == [True]
    assert locked == [True]
    assert len(_cached(tmp_path / "night/state")) == 1


def test_a_table_split_by_bucket_is_cached_in_slices(tmp_path, monkeypatch):
    """A first index of 4 buckets splits the normalized table into 4 x 4 parts; the cache
    keeps about SLICE_ROWS rows per file (4 files, not 16), and a later run restores from it
    the same index."""
    monkeypatch.setattr(snapshot, "SLICE_ROWS", 50)
    path = tmp_path / "snapshot.parquet"
    pl.DataFrame({"profile_id": [f"P{n}" for n in range(200)],
                  "email": [f"u{n}@example.com" for n in range(200)],
                  "opt_out": [False] * 200}).write_parquet(path)
    state = LocalStore(str(tmp_path / "state"))

    def key_to_profile(work: str) -> tuple[dict[str, str], set[str]]:
        snaps = snapshot.Snapshots(Location(str(path)), None, str(tmp_path / work),
                                   ("email",), cache=state)
        index = snaps.index(None, ("email",), 4)
        snaps.finish_cache()
        attrs = {b: index.attributes(b).collect()["profile_id"] for b in range(4)}
        keys = pl.concat([index.keys(b).collect() for b in range(4)])
        return ({k: attrs[b][n] for k, b, n in keys.select("key", "pb", "pnum").iter_rows()},
                snaps.reused)

    first, reused = key_to_profile("night1")
    assert not reused and len(first) == 200
    assert len([f for f in _cache_files(tmp_path / "state") if f.suffix == ".arrow"]) == 4
    again, reused = key_to_profile("night2")
    assert reused == {""} and again == first
