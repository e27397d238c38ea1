"""Profile snapshot: pick the as-of partition, fetch it once, scan it lazily, check its schema."""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
from datetime import date

import polars as pl

from pipeline.config import Location
from pipeline.errors import FatalError, SchemaError
from pipeline.stages.join import profile_table
from pipeline.stores import open_store
from pipeline.tables import check_columns, check_rows

log = logging.getLogger(__name__)
_PARTITION = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?:/|$)")


class Snapshots:
    """Loads the snapshot for a delivery date once per run (cached by chosen partition)."""

    def __init__(self, location: Location, default_country: str | None, workdir: str) -> None:
        self.location = location
        self.default_country = default_country
        self.workdir = workdir
        self._cache: dict[str, pl.DataFrame] = {}
        self._store, self._files = _open(location)

    def profiles(self, as_of: date | None) -> tuple[str, pl.DataFrame]:
        """(partition label, normalized profile table) for the latest snapshot <= as_of."""
        label, paths = _choose(self._files, as_of, self.location.url)
        if label not in self._cache:
            local = [self._fetch(p) for p in paths]
            self._cache[label] = _load(local, self.location.url, self.default_country)
            log.info("snapshot=%s profiles=%d", label or "single", self._cache[label].height)
        return label, self._cache[label]

    def _fetch(self, path: str) -> str:
        root = getattr(self._store, "root", None)
        if root is not None:  # local store: read in place
            return os.path.join(root, path)
        target = os.path.join(self.workdir, "snapshot", path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            with open(target, "wb") as out:
                out.write(self._store.read_bytes(path))
        return target

    def close(self) -> None:
        self._store.close()


def _open(location: Location):
    url = location.url
    if url.endswith(".parquet"):
        parent, base = url.rsplit("/", 1) if "/" in url else (".", url)
        store = open_store(parent, location.options)
        if not store.exists(base):
            raise FatalError(f"profile snapshot not found: {url}")
        return store, [base]
    store = open_store(url, location.options)
    files = [e.path for e in store.list("") if e.path.endswith(".parquet")]
    if not files:
        raise FatalError(f"profile snapshot has no Parquet files: {url}")
    return store, files


def _choose(files: list[str], as_of: date | None, url: str) -> tuple[str, list[str]]:
    parts: dict[str, list[str]] = {}
    for f in files:
        m = _PARTITION.search(f)
        parts.setdefault(m.group(1) if m else "", []).append(f)
    dated = sorted(k for k in parts if k)
    if not dated:
        return "", sorted(parts[""])
    eligible = [d for d in dated if as_of is None or d <= as_of.isoformat()]
    if not eligible:
        raise FatalError(f"no profile snapshot on or before {as_of} under {url}")
    return eligible[-1], sorted(parts[eligible[-1]])


def _load(paths: list[str], url: str, default_country: str | None) -> pl.DataFrame:
    try:
        scan = pl.scan_parquet(paths)
        schema = scan.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SchemaError(f"profile snapshot {url} is not readable Parquet: "
                          f"{type(exc).__name__}") from None
    present = check_columns(schema, "profiles", f"profile snapshot {url}")
    scan = scan.select(present)
    check_rows(scan, "profiles", f"profile snapshot {url}")
    return profile_table(scan, default_country).collect()


def partition_of(path: str) -> str | None:
    m = _PARTITION.search(posixpath.dirname(path))
    return m.group(1) if m else None


def make_workdir() -> str:
    return tempfile.mkdtemp(prefix="audience-pipeline-")
