"""Spill space: frames written as Arrow IPC parts per bucket, scanned back one bucket at a
time, so a delivery of any size is processed in bounded memory.

IPC rather than Parquet: parts are read once, soon after, so encoding and compression would
be pure cost (they took ~10% of a 10M-line run). A spill lives in a local folder (`Spill`)
or, for a Dask cluster whose workers share no disk, in a store such as S3 (`StoreSpill`).
Every part is written atomically under a name its writer chose, so a task that runs again
(a lost worker) replaces its own parts and nothing else.
"""

from __future__ import annotations

import io
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import polars_hash as plh

from pipeline.stores import Store, StoreOptions, open_store


def key_bucket(key: pl.Expr, buckets: int) -> pl.Expr:
    """Bucket of a lowercase-hex SHA-256 key: stable across runs and machines."""
    return (key.str.slice(0, 6).str.to_integer(base=16) % buckets).cast(pl.UInt32)


def text_bucket(value: pl.Expr, buckets: int) -> pl.Expr:
    """Bucket of any string (profile IDs) by xxh3, a fixed published hash (unlike
    pl.Expr.hash, whose values may change between polars versions)."""
    digest = plh.NonCryptographicHashingNameSpace(value.cast(pl.String)).xxh3_64()
    return (digest % buckets).cast(pl.UInt32)


class WorkArea(Protocol):
    """What the passes of a delivery need from a spill, wherever it lives."""

    url: str

    def write(self, name: str, frame: pl.DataFrame, bucket: str | None = None,
              part: str | None = None) -> None: ...

    def scan(self, name: str, bucket: int = 0) -> pl.LazyFrame | None: ...

    def batches(self, name: str, bucket: int, max_rows: int) -> list[pl.LazyFrame]: ...

    def release(self, name: str) -> None: ...

    def copy_in(self, local: Path, name: str, bucket: int, part: str) -> None: ...

    def put_file(self, local: Path, path: str) -> None:
        """Any file (not a part) into the work area under `path`."""

    def get_file(self, path: str) -> Path:
        """A file put there, as a local path (downloaded if need be)."""

    def clear(self) -> None: ...


class Spill:
    """IPC parts under one local folder: `<name>/b=<bucket>/<part>.arrow`.

    With `memory_rows`, parts stay in memory as frames until more than that many rows are
    held, then everything held goes to files and later parts too: work that fits in memory
    (a small delivery, one bucket) skips writing, reading back and removing files, which was
    pure cost (~0.1 s of a small delivery's fixed cost in file system calls alone), while a
    delivery larger than announced still runs in bounded memory. Only for a spill that one
    process writes and reads (the local executor's); a Dask work area has none.
    Tasks running on threads of that process may write at once.
    """

    def __init__(self, folder: str | Path, memory_rows: int = 0) -> None:
        self.folder = Path(folder)
        self.url = str(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory_rows = memory_rows
        self._parts: dict[str, int] = {}
        self._frames: dict[tuple[str, int], dict[str, pl.DataFrame]] = {}  # by part name
        self._held = 0  # rows in _frames
        self._written = False  # a part went to a file
        self._lock = threading.Lock()  # writes from tasks on threads

    @property
    def in_memory(self) -> bool:
        return self._held > 0 or (self.memory_rows > 0 and not self._written)

    def write(self, name: str, frame: pl.DataFrame, bucket: str | None = None,
              part: str | None = None) -> None:
        """Write frame as one part; with `bucket`, rows go to the part of their bucket column.

        Without `part`, parts are numbered in write order (one writer per spill only).
        """
        if frame.is_empty():
            return
        groups = _groups(frame, bucket)
        with self._lock:
            if part is None:
                number = self._parts.get(name, 0)
                self._parts[name] = number + 1
                part = f"{number:06d}"
            keep = self.in_memory and self._held + frame.height <= self.memory_rows
            if keep:
                for b, rows in groups:
                    held = self._frames.setdefault((name, b), {})
                    self._held += rows.height - (held[part].height if part in held else 0)
                    held[part] = rows
                return
            self._flush()  # from now on every part goes to a file
            self._written = True
        for b, rows in groups:  # files of their own: no lock needed
            self._write_part(name, b, part, rows)

    def _write_part(self, name: str, bucket: int, part: str, rows: pl.DataFrame) -> None:
        target = self.folder / name / f"b={bucket}" / f"{part}.arrow"
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
        rows.write_ipc(temp, compression="uncompressed")
        os.replace(temp, target)
        self._written = True

    def _flush(self) -> None:
        """Everything held in memory to files."""
        for (name, bucket), frames in self._frames.items():
            for part, rows in frames.items():
                self._write_part(name, bucket, part, rows)
        self._frames.clear()
        self._held = 0
        self.memory_rows = 0

    def replace(self, name: str, bucket: int, frame: pl.DataFrame) -> None:
        """One bucket's parts replaced by `frame` (e.g. once deduplicated)."""
        for part in self.parts(name, bucket):
            part.unlink()
        self._write_part(name, bucket, "000000", frame)

    def parts(self, name: str, bucket: int = 0) -> list[Path]:
        """Part files of one bucket in part-name order."""
        folder = self.folder / name / f"b={bucket}"
        return sorted(folder.glob("*.arrow")) if folder.exists() else []

    def _held_frames(self, name: str, bucket: int) -> list[pl.DataFrame]:
        held = self._frames.get((name, bucket), {})
        return [held[part] for part in sorted(held)]

    def scan(self, name: str, bucket: int = 0) -> pl.LazyFrame | None:
        """All parts of one bucket in part order, or None when nothing was written."""
        if self._held:
            frames = self._held_frames(name, bucket)
            return pl.concat(frames, rechunk=False).lazy() if frames else None
        parts = self.parts(name, bucket)
        return pl.scan_ipc(parts) if parts else None

    def batches(self, name: str, bucket: int, max_rows: int) -> list[pl.LazyFrame]:
        """The parts of one bucket in part order, grouped into scans of about `max_rows`
        rows (one part may exceed it): a bucket of any size is processed in bounded memory.
        Row counts of files come from their IPC footers, so any process may ask."""
        if self._held:
            return _batches([(f.height, f) for f in self._held_frames(name, bucket)],
                            max_rows)
        return _batches([(rows_in(p), p) for p in self.parts(name, bucket)], max_rows)

    def release(self, name: str) -> None:
        """Forget every part of `name` (read for the last time)."""
        for key in [k for k in self._frames if k[0] == name]:
            self._held -= sum(f.height for f in self._frames.pop(key).values())
        shutil.rmtree(self.folder / name, ignore_errors=True)

    def copy_in(self, local: Path, name: str, bucket: int, part: str) -> None:
        """Add a part written elsewhere on this machine (a hard link when possible)."""
        target = self.folder / name / f"b={bucket}" / f"{part}.arrow"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        try:
            os.link(local, target)
        except OSError:
            shutil.copyfile(local, target)

    def put_file(self, local: Path, path: str) -> None:
        target = self.folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        temp = target.with_name(f"{target.name}.{secrets.token_hex(4)}.tmp")
        shutil.copyfile(local, temp)
        os.replace(temp, target)

    def get_file(self, path: str) -> Path:
        return self.folder / path

    def path(self, name: str) -> Path:
        return self.folder / name

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts.clear()
        self._frames.clear()
        self._held = 0
        self._written = False


class StoreSpill:
    """The same layout in a store (S3): parts are objects, downloaded when a bucket is read."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.url = store.url
        self._local: Path | None = None
        self._parts: dict[str, int] = {}

    def write(self, name: str, frame: pl.DataFrame, bucket: str | None = None,
              part: str | None = None) -> None:
        if frame.is_empty():
            return
        if part is None:  # numbered in write order: one writer only (the client)
            number = self._parts.get(name, 0)
            self._parts[name] = number + 1
            part = f"{number:06d}"
        for b, rows in _groups(frame, bucket):
            buffer = io.BytesIO()
            rows.write_ipc(buffer, compression="uncompressed")
            self.store.write_bytes(f"{name}/b={b}/{part}.arrow", buffer.getvalue())

    def scan(self, name: str, bucket: int = 0) -> pl.LazyFrame | None:
        parts = self._fetch(name, bucket)
        return pl.scan_ipc(parts) if parts else None

    def batches(self, name: str, bucket: int, max_rows: int) -> list[pl.LazyFrame]:
        return _batches([(rows_in(p), p) for p in self._fetch(name, bucket)], max_rows)

    def release(self, name: str) -> None:
        for entry in self.store.list(f"{name}/"):
            self.store.delete(entry.path)

    def _fetch(self, name: str, bucket: int) -> list[Path]:
        """The bucket's parts, downloaded to a local folder (removed by `close`) so they are
        scanned lazily like local ones."""
        return [self.get_file(entry.path) for entry in self.store.list(f"{name}/b={bucket}/")
                if entry.path.endswith(".arrow")]

    def _folder(self) -> Path:
        if self._local is None:
            self._local = Path(tempfile.mkdtemp(prefix="work-"))
        return self._local

    def copy_in(self, local: Path, name: str, bucket: int, part: str) -> None:
        self.store.put_file(str(local), f"{name}/b={bucket}/{part}.arrow")

    def put_file(self, local: Path, path: str) -> None:
        self.store.put_file(str(local), path)

    def get_file(self, path: str) -> Path:
        target = self._folder() / path
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out, self.store.open_read(path) as src:
                shutil.copyfileobj(src, out, 1 << 20)
        return target

    def clear(self) -> None:
        for entry in self.store.list(""):
            self.store.delete(entry.path)
        self._parts.clear()
        if self._local is not None:  # downloads of an earlier attempt are stale now
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None

    def close(self) -> None:
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
        self.store.close()


def open_work_area(url: str, options: StoreOptions | None = None) -> Spill | StoreSpill:
    """A spill at a local path (read in place) or in a store (`s3://…`)."""
    if "://" not in url:
        return Spill(url)
    return StoreSpill(open_store(url, options))


def _batches(parts: list[tuple[int, Any]], max_rows: int) -> list[pl.LazyFrame]:
    """(rows, file or frame) in order -> scans of about max_rows rows each."""
    out: list[pl.LazyFrame] = []
    batch: list[Any] = []
    rows = 0
    for height, part in parts:
        if batch and rows + height > max_rows:
            out.append(_scan(batch))
            batch, rows = [], 0
        batch.append(part)
        rows += height
    if batch:
        out.append(_scan(batch))
    return out


def _scan(parts: list[Any]) -> pl.LazyFrame:
    if isinstance(parts[0], pl.DataFrame):
        frame: pl.DataFrame = pl.concat(parts, rechunk=False)
        return frame.lazy()
    return pl.scan_ipc(parts)


def rows_in(path: Path) -> int:
    """Rows of an IPC file, from its footer."""
    return int(pl.scan_ipc(path).select(pl.len()).collect().item())


def _groups(frame: pl.DataFrame, bucket: str | None) -> list[tuple[int, pl.DataFrame]]:
    if not bucket:
        return [(0, frame)]
    groups = frame.partition_by(bucket, as_dict=True, include_key=False)
    return [(int(b), rows) for (b,), rows in groups.items()]
