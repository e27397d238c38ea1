"""Local spill space: frames written as Arrow IPC parts per bucket, scanned back one bucket at
a time, so a delivery of any size is processed in bounded memory.

IPC rather than Parquet: parts are read once, soon after, on the same machine, so encoding
and compression would be pure cost (they took ~10% of a 10M-line run)."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import polars_hash as plh


def key_bucket(key: pl.Expr, buckets: int) -> pl.Expr:
    """Bucket of a lowercase-hex SHA-256 key: stable across runs and machines."""
    return (key.str.slice(0, 6).str.to_integer(base=16) % buckets).cast(pl.UInt32)


def text_bucket(value: pl.Expr, buckets: int) -> pl.Expr:
    """Bucket of any string (profile IDs) by xxh3, a fixed published hash (unlike
    pl.Expr.hash, whose values may change between polars versions)."""
    digest = plh.NonCryptographicHashingNameSpace(value.cast(pl.String)).xxh3_64()
    return (digest % buckets).cast(pl.UInt32)


class Spill:
    """IPC parts under one folder: `<name>/b=<bucket>/<part>.arrow`.

    With `memory_rows`, parts stay in memory as frames until more than that many rows are
    held, then everything held goes to files and later parts too: work that fits in memory
    (a small delivery, one bucket) skips writing, reading back and removing files, which was
    pure cost (~0.1 s of a small delivery's fixed cost in file system calls alone), while a
    delivery larger than announced still runs in bounded memory.
    """

    def __init__(self, folder: str | Path, memory_rows: int = 0) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.memory_rows = memory_rows
        self._parts: dict[str, int] = {}
        self._rows: dict[tuple[str, int], list[tuple[Path, int]]] = {}  # (name, bucket)
        self._frames: dict[tuple[str, int], list[tuple[int, pl.DataFrame]]] = {}
        self._held = 0  # rows in _frames

    @property
    def in_memory(self) -> bool:
        return self._held > 0 or (self.memory_rows > 0 and not self._rows)

    def write(self, name: str, frame: pl.DataFrame, bucket: str | None = None) -> None:
        """Append frame; with `bucket`, rows go to the part of their bucket column."""
        if frame.is_empty():
            return
        part = self._parts.get(name, 0)
        self._parts[name] = part + 1
        groups = (frame.partition_by(bucket, as_dict=True, include_key=False)
                  if bucket else {(0,): frame})
        keep = self.in_memory and self._held + frame.height <= self.memory_rows
        if not keep:
            self._flush()
        for (b,), rows in groups.items():
            if keep:
                self._frames.setdefault((name, int(b)), []).append((part, rows))
                self._held += rows.height
            else:
                self._write_part(name, int(b), part, rows)

    def _write_part(self, name: str, bucket: int, part: int, rows: pl.DataFrame) -> None:
        target = self.folder / name / f"b={bucket}" / f"{part:06d}.arrow"
        target.parent.mkdir(parents=True, exist_ok=True)
        rows.write_ipc(target, compression="uncompressed")
        self._rows.setdefault((name, bucket), []).append((target, rows.height))

    def _flush(self) -> None:
        """Everything held in memory to files, in write order."""
        for (name, bucket), frames in self._frames.items():
            for part, rows in frames:
                self._write_part(name, bucket, part, rows)
        self._frames.clear()
        self._held = 0
        self.memory_rows = 0

    def replace(self, name: str, bucket: int, frame: pl.DataFrame) -> None:
        """One bucket's parts replaced by `frame` (e.g. once deduplicated)."""
        for part in self.parts(name, bucket):
            part.unlink()
        target = self.folder / name / f"b={bucket}" / "000000.arrow"
        target.parent.mkdir(parents=True, exist_ok=True)
        frame.write_ipc(target, compression="uncompressed")
        self._rows[(name, bucket)] = [(target, frame.height)]

    def parts(self, name: str, bucket: int = 0) -> list[Path]:
        """Part files of one bucket in write order."""
        folder = self.folder / name / f"b={bucket}"
        return sorted(folder.glob("*.arrow")) if folder.exists() else []

    def scan(self, name: str, bucket: int = 0) -> pl.LazyFrame | None:
        """All parts of one bucket in write order, or None when nothing was written."""
        if self._held:
            frames = [f for _, f in self._frames.get((name, bucket), [])]
            return pl.concat(frames, rechunk=False).lazy() if frames else None
        parts = self.parts(name, bucket)
        return pl.scan_ipc(parts) if parts else None

    def batches(self, name: str, bucket: int, max_rows: int) -> list[pl.LazyFrame]:
        """The parts of one bucket in write order, grouped into scans of about `max_rows`
        rows (one part may exceed it): a bucket of any size is processed in bounded memory.
        Only parts written by this Spill object are known."""
        if self._held:
            return self._frame_batches(name, bucket, max_rows)
        out: list[pl.LazyFrame] = []
        batch: list[Path] = []
        rows = 0
        for path, height in self._rows.get((name, bucket), []):
            if batch and rows + height > max_rows:
                out.append(pl.scan_ipc(batch))
                batch, rows = [], 0
            batch.append(path)
            rows += height
        if batch:
            out.append(pl.scan_ipc(batch))
        return out

    def _frame_batches(self, name: str, bucket: int, max_rows: int) -> list[pl.LazyFrame]:
        out: list[pl.LazyFrame] = []
        batch: list[pl.DataFrame] = []
        rows = 0
        for _, frame in self._frames.get((name, bucket), []):
            if batch and rows + frame.height > max_rows:
                out.append(pl.concat(batch, rechunk=False).lazy())
                batch, rows = [], 0
            batch.append(frame)
            rows += frame.height
        if batch:
            out.append(pl.concat(batch, rechunk=False).lazy())
        return out

    def release(self, name: str) -> None:
        """Forget every part of `name` (read for the last time)."""
        for key in [k for k in self._frames if k[0] == name]:
            self._held -= sum(f.height for _, f in self._frames.pop(key))
        for key in [k for k in self._rows if k[0] == name]:
            del self._rows[key]
        shutil.rmtree(self.folder / name, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.folder / name

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._parts.clear()
        self._rows.clear()
        self._frames.clear()
        self._held = 0
