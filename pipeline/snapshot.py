"""Profile snapshot: pick the as-of partition, fetch it once, scan it lazily, check its schema."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import phonenumbers
import polars as pl

from pipeline.config import Location
from pipeline.errors import FatalError, SchemaError
from pipeline.formats import hex_order
from pipeline.spill import Spill, WorkArea, key_bucket, rows_in, text_bucket
from pipeline.stages.join import (
    MATCH_PREFIX,
    known_phones,
    profile_keys,
    profile_table,
    unique_keys,
)
from pipeline.stores import Store, open_store
from pipeline.stores.local import LocalStore
from pipeline.tables import check_columns, check_rows, check_type, load_schema, rows_error

log = logging.getLogger(__name__)
_PARTITION = re.compile(r"(?:^|/)date=(\d{4}-\d{2}-\d{2})(?:/|$)")


class Snapshots:
    """Loads the snapshot for a delivery date once per run (cached by chosen partition)."""

    def __init__(self, location: Location, default_country: str | None, workdir: str,
                 kinds: tuple[str, ...] = ("ecid", "email", "phone", "crm"),
                 columns: Mapping[str, str] | None = None,
                 matches: Mapping[str, str] | None = None,
                 cache: Store | None = None,
                 cache_writer: Callable[[], Store] | None = None) -> None:
        self.location = location
        # `cache_writer`: a connection of its own for the background cache write (None: the
        # `cache` store itself, e.g. local files)
        self.cache = IndexCache(cache, cache_writer) if cache is not None else None
        # product name -> snapshot name, and crm feeds' own match columns -> their config key
        self.names = SnapshotNames(dict(columns or {}), dict(matches or {}))
        self.kinds = kinds  # every key kind the run's feeds need: normalized in one pass
        self.default_country = default_country
        self.workdir = workdir
        self._cache: dict[str, pl.DataFrame] = {}
        self._store, self._files = _open(location)
        self._spill = Spill(os.path.join(workdir, "profiles"))
        self._normalized: dict[str, int] = {}  # partition label -> profile count
        # partition label -> profile buckets its normalized table is split into (1: one part
        # per slice; a first index of several buckets splits it as it is written)
        self._layout: dict[str, int] = {}
        self._indexes: dict[tuple, ProfileIndex] = {}
        self._attrs: set[str] = set()  # attribute spills written (per partition and buckets)
        self.reused: set[str] = set()  # partitions whose normalized index came from the cache
        self._unsaved: dict[str, tuple[str, int]] = {}  # label -> (fingerprint, profiles)

    def profiles(self, as_of: date | None) -> tuple[str, pl.DataFrame]:
        """(partition label, normalized profile table) for the latest snapshot <= as_of."""
        label, paths = _choose(self._files, as_of, self.location.url)
        if label not in self._cache:
            local = [self._fetch(p) for p in paths]
            self._cache[label] = _load(local, self.location.url, self.default_country,
                                       self.names)
            log.info("snapshot=%s profiles=%d", label or "single", self._cache[label].height)
        return label, self._cache[label]

    def size(self, as_of: date | None) -> int:
        """Profile count of the as-of snapshot (Parquet metadata only)."""
        label, paths = _choose(self._files, as_of, self.location.url)
        local = [self._fetch(p) for p in paths]
        return int(_scan(local, self.location.url).select(pl.len()).collect().item())

    def index(self, as_of: date | None, kinds: tuple[str, ...], buckets: int,
              match_column: str | None = None) -> ProfileIndex:
        """Profile keys (by key bucket) and DPUUID attributes (by profile bucket), on disk.

        The snapshot is normalized once per (partition, kinds) in slices, so memory stays
        bounded by the slice size, and re-bucketed cheaply for another bucket count.
        `match_column`: a crm feed's own snapshot column for CRM keys (None: crm_id's).
        """
        label, paths = _choose(self._files, as_of, self.location.url)
        if label not in self._normalized:
            self._normalized[label] = self._normalize(label, paths, buckets)
        ikey = (label, kinds, buckets, match_column)
        if ikey not in self._indexes:
            self._indexes[ikey] = self._bucketize(label, kinds, buckets, match_column)
        if label in self._unsaved and self.cache is not None:
            # Only now that the delivery can be matched: written while it is.
            fingerprint, total = self._unsaved.pop(label)
            self.cache.save_later(fingerprint, self._cache_parts(label), total)
        return self._indexes[ikey]

    def _normalize(self, label: str, paths: list[str], buckets: int) -> int:
        """The normalized table in slices, each split by profile bucket as it is written
        (so a first index of that many buckets reads it as it is: no second shuffle of the
        whole table). Restored from the cache: one part per cached part."""
        local = [self._fetch(p) for p in paths]
        name = _name("normalized", label)
        self._layout[label] = 1
        fingerprint = None
        if self.cache is not None:
            fingerprint = self._fingerprint(paths, local)
            cached = self.cache.restore(fingerprint, self._spill.path(name))
            if cached is not None:
                self.reused.add(label)
                log.info("snapshot=%s profiles=%d index=reused", label or "single", cached)
                return cached
        # profile_id's uniqueness is checked bucket by bucket, in `_number`
        scan = _checked_scan(local, self.location.url, self.names, unique=False)
        total: int = scan.select(pl.len()).collect().item()
        kinds = self.kinds
        for offset in range(0, max(total, 1), SLICE_ROWS):
            table = profile_table(scan.slice(offset, SLICE_ROWS), self.default_country,
                                  kinds)
            if buckets > 1:
                table = table.with_columns(_b=text_bucket(pl.col("profile_id"), buckets))
            self._spill.write(name, table.collect(), bucket="_b" if buckets > 1 else None)
        self._layout[label] = buckets
        log.info("snapshot=%s profiles=%d kinds=%s", label or "single", total, ",".join(kinds))
        if fingerprint is not None:
            self._unsaved[label] = (fingerprint, total)
        return total

    def finish_cache(self, abort: bool = False) -> None:
        """Wait for the background cache writes (before the state lock is released).
        `abort`: the run is ending on an error: stop at the next part, write no cache."""
        if self.cache is not None:
            self.cache.finish(abort)

    def _fingerprint(self, paths: list[str], local: list[str]) -> str:
        """What the normalized index depends on: the snapshot's bytes (md5 of each file), the
        key kinds, the default country and the rules' versions."""
        files = []
        for path, copy in zip(paths, local, strict=True):
            md5 = hashlib.md5()  # noqa: S324 - identity of a file, not security
            with open(copy, "rb") as fh:
                while block := fh.read(8 << 20):
                    md5.update(block)
            files.append([path, os.path.getsize(copy), md5.hexdigest()])
        doc = {"format": CACHE_FORMAT, "kinds": list(self.kinds), "files": files,
               "default_country": self.default_country, "polars": pl.__version__,
               "phonenumbers": phonenumbers.__version__,
               "columns": self.names.columns, "matches": sorted(self.names.matches)}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32]

    def _bucketize(self, label: str, kinds: tuple[str, ...], buckets: int,
                   match_column: str | None) -> ProfileIndex:
        keys_name = _name("keys", label, kinds, buckets, _tag(match_column))
        rows_name = _name("numbered", label, buckets)
        # the same for every kind; with several buckets read from the numbered rows
        attrs_name = _name("attrs", label, buckets) if buckets == 1 else rows_name
        numbered = None
        if attrs_name not in self._attrs:
            numbered = self._number(label, buckets, rows_name, attrs_name)
            self._attrs.add(attrs_name)
        if buckets == 1:  # one bucket of each: no shuffle between them, no numbered spill
            if numbered is None:
                rows = self._normalized_rows(label)
                numbered = _numbered(rows, 0) if rows is not None else None
            if numbered is not None:
                keys = profile_keys(numbered.lazy(), kinds, match_column, carry=NUMBER)
                self._spill.replace(keys_name, 0, keys.select(KEY_COLUMNS).collect())
        else:
            self._shuffle_keys(rows_name, keys_name, kinds, buckets, match_column)
        phones = None
        if "phone" in kinds and label not in self.reused:  # the cache holds no numbers
            normalized = self._normalized_scan(label)
            phones = known_phones(normalized).collect() if normalized is not None else None
        return ProfileIndex(self._spill, keys_name, attrs_name, buckets, phones)

    def _shuffle_keys(self, rows_name: str, keys_name: str, kinds: tuple[str, ...],
                      buckets: int, match_column: str | None) -> None:
        """Keys of every profile bucket to their key buckets, then one row per key."""
        for b in range(buckets):
            rows = self._spill.scan(rows_name, b)
            if rows is None:
                continue
            keys = profile_keys(rows, kinds, match_column, unique=False, carry=NUMBER)
            self._spill.write(keys_name, keys.with_columns(
                _b=key_bucket(pl.col("key"), buckets)).collect(), bucket="_b")
        for b in range(buckets):  # a key may repeat across profile buckets: settled here
            bucket_keys = self._spill.scan(keys_name, b)
            if bucket_keys is not None:
                self._spill.replace(keys_name, b, unique_keys(bucket_keys).select(
                    KEY_COLUMNS).collect())

    def _number(self, label: str, buckets: int, rows_name: str, attrs_name: str
                ) -> pl.DataFrame | None:
        """Profiles by profile bucket, sorted by profile_id and numbered (`pnum`, from 0):
        later passes name a profile by (bucket, number) and sort and join on those integers
        instead of profile_id strings; number order is profile_id order. Writes each
        bucket's attributes; with several buckets also its numbered rows (the keys' source),
        with one returns them (rebuilt from the normalized table when needed again)."""
        split = buckets > 1 and self._layout[label] == buckets  # split as it was normalized
        if buckets > 1 and not split:
            for part in self._normalized_parts(label):
                self._spill.write(rows_name, pl.scan_ipc(part).drop(UNCACHED, strict=False)
                                  .with_columns(_b=text_bucket(pl.col("profile_id"), buckets))
                                  .collect(), bucket="_b")
        numbered = None
        repeats = 0  # profile IDs seen twice: all copies of one ID share its bucket
        for b in range(buckets):
            rows = (self._normalized_rows(label) if buckets == 1
                    else self._normalized_rows(label, b) if split
                    else self._spill.scan(rows_name, b))
            if rows is None:
                continue
            numbered, found = _with_attributes(rows, b)
            repeats += found
            if buckets > 1:  # one spill for keys and attributes (disk: 50M profiles)
                self._spill.replace(rows_name, b, numbered)
                # not held while the next bucket is sorted: two buckets at once set the
                # peak of large runs (beside the first delivery's pass 1)
                numbered = None
            else:
                self._spill.replace(attrs_name, b, numbered.select(ATTR_COLUMNS))
        if repeats:
            raise rows_error("profiles", "profile_id", repeats, "duplicates",
                             f"profile snapshot {self.location.url}", self.names.columns)
        return numbered if buckets == 1 else None

    def _normalized_parts(self, label: str, bucket: int | None = None) -> list[Path]:
        """Parts of the normalized table: of one profile bucket, or (None) all of them."""
        name = _name("normalized", label)
        wanted = range(self._layout[label]) if bucket is None else [bucket]
        return [part for b in wanted for part in self._spill.parts(name, b)]

    def _cache_parts(self, label: str) -> list[list[Path]]:
        """The normalized parts in groups of about SLICE_ROWS rows, one cache file each: a
        table split into many profile buckets must not become thousands of small files."""
        groups: list[list[Path]] = [[]]
        rows = 0
        for part in self._normalized_parts(label):
            if rows >= SLICE_ROWS:
                groups.append([])
                rows = 0
            groups[-1].append(part)
            rows += rows_in(part)
        return [g for g in groups if g]

    def _normalized_scan(self, label: str, bucket: int | None = None) -> pl.LazyFrame | None:
        parts = self._normalized_parts(label, bucket)
        return pl.scan_ipc(parts) if parts else None

    def _normalized_rows(self, label: str, bucket: int | None = None) -> pl.LazyFrame | None:
        rows = self._normalized_scan(label, bucket)
        return rows.drop(UNCACHED, strict=False) if rows is not None else None

    def _fetch(self, path: str) -> str:
        if isinstance(self._store, LocalStore):  # read in place (an SFTP root is remote)
            return os.path.join(self._store.root, path)
        # The local name is ours (a digest of the key): a key such as `../../x.parquet` never
        # becomes a path on this host. Downloaded under a temporary name, renamed when whole:
        # a failed download leaves nothing that a retry would take for the file.
        name = hashlib.sha256(path.encode()).hexdigest()[:32] + ".parquet"
        target = os.path.join(self.workdir, "snapshot", name)
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            part = target + ".part"
            try:
                with self._store.open_read(path) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 8 << 20)
                os.replace(part, target)
            finally:
                if os.path.exists(part):
                    os.unlink(part)
        return target

    def close(self) -> None:
        self._store.close()


def _open(location: Location) -> tuple[Store, list[str]]:
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


SLICE_ROWS = 500_000  # each slice is one batch of phone parsing
CACHE_FORMAT = 1  # bump when the normalized table or a normalization rule changes
CACHE_FOLDER = "cache/snapshot-index"
# Columns of the normalized table the cache leaves out: plain phone numbers and the country
# used to parse them. What it keeps is hashed keys, profile IDs, the suppression flag and the
# DPUUID attributes (ECID, CRM ID) that destinations write anyway.
UNCACHED = ("phone", "phone_e164", "country")


class IndexCache:
    """Normalized snapshot tables kept in the state store between runs, one folder per
    fingerprint: `<fingerprint>/part-NNNNNN.arrow` (Arrow IPC, zstd), then `index.json`
    written last, so a half-written cache is never read.

    Writing it (zstd of every part, fsync'd copies: ~1-2 s per 1M profiles) happens on a
    thread of its own once the index is built, so the first delivery is matched meanwhile;
    `finish` joins it. One writer: saves run in order and never clean up each other's parts.
    """

    def __init__(self, store: Store, writer: Callable[[], Store] | None = None) -> None:
        self.store = store
        self.writer = writer
        self.used: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._stop = threading.Event()

    def restore(self, fingerprint: str, folder: Path) -> int | None:
        """Copy a complete cached table into `folder`; its row count, or None on a miss."""
        marker = f"{CACHE_FOLDER}/{fingerprint}/index.json"
        try:
            if not self.store.exists(marker):
                return None
            doc = json.loads(self.store.read_bytes(marker))
            folder = folder / "b=0"
            folder.mkdir(parents=True, exist_ok=True)
            for n, part in enumerate(doc["parts"]):
                with (self.store.open_read(f"{CACHE_FOLDER}/{fingerprint}/{part}") as src,
                      open(folder / f"{n:06d}.arrow", "wb") as out):
                    shutil.copyfileobj(src, out, 8 << 20)
        except (OSError, ValueError, KeyError) as exc:  # a broken cache is rebuilt, not fatal
            log.warning("snapshot index cache unreadable (%s): rebuilding", type(exc).__name__)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        self.used.add(fingerprint)
        return int(doc["profiles"])

    def save_later(self, fingerprint: str, parts: list[list[Path]], total: int) -> None:
        """Queue `save` on the writer thread (the spill parts stay until the run ends)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="index-cache")
        self._pool.submit(self._save_quietly, fingerprint, parts, total)

    def finish(self, abort: bool = False) -> None:
        if abort:
            self._stop.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _save_quietly(self, fingerprint: str, parts: list[list[Path]], total: int) -> None:
        # The cache is an optimization: whatever goes wrong, the run goes on (the next one
        # rebuilds), and without index.json nothing written here is ever read.
        try:
            store = self.writer() if self.writer is not None else self.store
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("snapshot index cache not written (%s)", type(exc).__name__)
            return
        try:
            if not self.save(fingerprint, parts, total, store):
                log.warning("snapshot index cache not written (the run ended first)")
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("snapshot index cache not written (%s)", type(exc).__name__)
            _remove_quietly(store, f"{CACHE_FOLDER}/{fingerprint}/")
        finally:
            if store is not self.store:
                store.close()

    def save(self, fingerprint: str, parts: list[list[Path]], total: int,
             store: Store | None = None) -> bool:
        """Store the normalized parts (without plain phone numbers), each group of parts as
        one file, then drop caches of snapshots this run did not use. False when stopped
        (`finish(abort=True)`) first."""
        store = store or self.store
        names = []
        for n, group in enumerate(parts):
            if self._stop.is_set():
                _remove_quietly(store, f"{CACHE_FOLDER}/{fingerprint}/")
                return False
            local = group[0].with_suffix(".cache")
            (pl.scan_ipc(group).drop(UNCACHED, strict=False)
             .sink_ipc(local, compression="zstd"))
            names.append(f"part-{n:06d}.arrow")
            try:
                store.put_file(str(local), f"{CACHE_FOLDER}/{fingerprint}/{names[-1]}")
            finally:
                local.unlink()
        doc = {"profiles": total, "parts": names, "format": CACHE_FORMAT}
        store.write_bytes(f"{CACHE_FOLDER}/{fingerprint}/index.json", json.dumps(doc).encode())
        self.used.add(fingerprint)
        for entry in store.list(CACHE_FOLDER + "/"):
            if entry.path.split("/")[2] not in self.used:
                store.delete(entry.path)
        return True


def _remove_quietly(store: Store, folder: str) -> None:
    """Best effort: drop a cache folder left without its index.json (never read anyway)."""
    try:
        for entry in store.list(folder):
            store.delete(entry.path)
    except Exception:  # noqa: BLE001, S110 - an unreadable leftover is harmless
        pass


ATTRS = ("profile_id", "email_key", "crm_id", "ecid")
ATTR_COLUMNS = (*ATTRS, "email_order")  # email_order: `formats.hex_order` of email_key
NUMBER = ("pb", "pnum")  # a profile's bucket and its number (row) in that bucket's attributes
KEY_COLUMNS = ("key", "matched_on", "suppressed", *NUMBER)


class ProfileIndex:
    """One snapshot's profile keys and attributes, split into buckets on local disk."""

    def __init__(self, spill: WorkArea, keys: str, attrs: str, buckets: int,
                 phones: pl.DataFrame | None = None) -> None:
        self.spill, self.keys_name, self.attrs_name, self.buckets = spill, keys, attrs, buckets
        self.phones = phones  # (number, region, e164) for the feed side to reuse

    def keys(self, bucket: int) -> pl.LazyFrame:
        """(key, matched_on, suppressed, pb, pnum) of one key bucket, one row per key: the
        profile as its bucket and number, a row of `attributes(pb)`."""
        part = self.spill.scan(self.keys_name, bucket)
        return _empty_keys() if part is None else part

    def attributes(self, bucket: int) -> pl.LazyFrame:
        """DPUUID attributes of one profile bucket, sorted by profile_id: row n is the
        profile numbered n."""
        part = self.spill.scan(self.attrs_name, bucket)
        return part.select(ATTR_COLUMNS) if part is not None else pl.LazyFrame(
            schema={**{c: pl.String for c in ATTRS}, "email_order": pl.UInt32})


def _numbered(rows: pl.LazyFrame, bucket: int) -> pl.DataFrame:
    return (rows.sort("profile_id").with_row_index("pnum")
            .with_columns(pl.col("pnum").cast(pl.UInt32), pb=pl.lit(bucket, pl.UInt32))
            .collect())


def _with_attributes(rows: pl.LazyFrame, bucket: int) -> tuple[pl.DataFrame, int]:
    """One profile bucket numbered, with its digests' `email_order`; and how many profile
    IDs in it repeat the one before (duplicates: neighbours once sorted)."""
    numbered = _numbered(rows, bucket)
    ids = numbered.get_column("profile_id")
    repeats = int((ids == ids.shift(1)).sum())
    return numbered.with_columns(email_order=hex_order(numbered.get_column("email_key"))), repeats


def _empty_keys() -> pl.LazyFrame:
    return pl.LazyFrame(schema={"key": pl.String, "matched_on": pl.String,
                                "suppressed": pl.Boolean, "pb": pl.UInt32, "pnum": pl.UInt32})


def _tag(match_column: str | None) -> str:
    """A file-name-safe tag for a crm feed's match column (any snapshot column name)."""
    return "" if match_column is None else f"m{zlib.crc32(match_column.encode()):08x}"


def _name(*parts: object) -> str:
    return "-".join(str(p).replace(",", "_").replace("'", "").replace(" ", "")
                    .replace("(", "").replace(")", "") for p in parts if p != "")


def _scan(paths: list[str], url: str) -> pl.LazyFrame:
    try:
        scan = pl.scan_parquet(paths)
        scan.collect_schema()
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise SchemaError(f"profile snapshot {url} is not readable Parquet: "
                          f"{type(exc).__name__}") from None
    return scan


@dataclass(frozen=True)
class SnapshotNames:
    """The snapshot's own column names: `[profiles] columns` and crm feeds' `match_column`."""

    columns: dict[str, str]  # product name -> snapshot name
    matches: dict[str, str]  # snapshot column a crm feed reconciles on -> its config key


def _checked_scan(paths: list[str], url: str, names: SnapshotNames,
                  unique: bool = True) -> pl.LazyFrame:
    """The snapshot's needed columns, checked; `unique=False`: profile_id's uniqueness is
    left to the caller."""
    where = f"profile snapshot {url}"
    scan = _renamed(_scan(paths, url), where, names)
    shown = names.columns
    schema = scan.collect_schema()
    present = check_columns(schema, "profiles", where, shown)
    crm_types = load_schema("profiles")["columns"]["crm_id"]["types"]
    for match, key in names.matches.items():
        check_type(schema[MATCH_PREFIX + match], crm_types, where, f"{match!r} ({key})")
    scan = scan.select(*present, *(MATCH_PREFIX + m for m in names.matches))
    check_rows(scan, "profiles", where, shown, unique=unique)
    return scan


def _renamed(scan: pl.LazyFrame, where: str, names: SnapshotNames) -> pl.LazyFrame:
    """Snapshot names -> product names, once at the scan: the rest of the pipeline (and its
    lazy plan, which reads only the columns it needs) sees product names only."""
    schema = scan.collect_schema()
    for product, name in names.columns.items():
        if name not in schema:
            raise SchemaError(f"{where}: column {name!r} (profiles.columns.{product}) is missing")
    for name, key in names.matches.items():
        if name not in schema:
            raise SchemaError(f"{where}: column {name!r} ({key}) is missing")
    products = [(p, names.columns.get(p, p)) for p in load_schema("profiles")["columns"]]
    return scan.select(
        *(pl.col(name).alias(product) for product, name in products if name in schema),
        *(pl.col(name).alias(MATCH_PREFIX + name) for name in names.matches),
    )


def _load(paths: list[str], url: str, default_country: str | None,
          names: SnapshotNames) -> pl.DataFrame:
    return profile_table(_checked_scan(paths, url, names), default_country).collect()
