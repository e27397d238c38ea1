"""Publish: build each destination's files for a delivery and write them atomically.

Writers take the audience bucket by bucket and spool to local files, so output size does not
bound memory. Names come from the delivery (feed, root, timestamp), never the wall clock, so
a rerun writes the same names with the same bytes, and two deliveries never share a name
(`publish_outputs` refuses to replace another delivery's file). A manifest per (destination,
delivery) is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
from isal import igzip

from pipeline.config import DestinationConfig
from pipeline.errors import ConfigError, DeliveryFailed
from pipeline.formats import inbound_file_name, inbound_folder, inbound_pieces
from pipeline.pgp import Encryptor, RunKeys
from pipeline.stores import Store
from pipeline.tables import check_output

log = logging.getLogger(__name__)
DPUUID_COLUMN = {"email_sha256": "email_key", "profile_id": "profile_id",
                 "crm_id": "crm_id", "ecid": "ecid"}
_COPY = 8 << 20
PARTS = 1000  # the split slot of an inbound name is <delivery tag><part, 3 digits>
BLOCK_LINES = 100_000  # inbound lines joined and handed to the gzip thread at a time
# Inbound files are filed by date: an earlier TIMESTAMP (0, a stray 10-digit number) is no
# usable date, and would file them under date=1970-01-01. AAM itself is younger than this.
MIN_TIMESTAMP = 946_684_800  # 2000-01-01T00:00:00Z


@dataclass(frozen=True)
class DeliveryKey:
    """What output names are derived from."""

    feed: str
    root: str
    timestamp_s: int | None  # delivery timestamp (UNIX seconds); None: the delivery has no date

    @property
    def tag(self) -> int:
        """Six digits (100000-999999) from the feed and root: the delivery's part of the split
        slot of its AAM inbound names, so deliveries of one second (or undated ones of one
        `date=` folder) get distinct names. A clash of tags is caught by `publish_outputs`."""
        digest = hashlib.sha256(f"{self.feed}/{self.root}".encode()).digest()
        return 100_000 + int.from_bytes(digest[:8], "big") % 900_000


@dataclass
class Output:
    """Files one destination gets for one delivery: (path, bytes or a local file)."""

    files: list[tuple[str, bytes | Path]] = field(default_factory=list)
    md5s: dict[str, str] = field(default_factory=dict)  # path -> md5, kept while written
    rows: int = 0
    unmapped_segments: int = 0  # rows left out by the destination's segment mapping/filter
    missing_id: int = 0  # mapped rows of profiles lacking the destination's DPUUID


class CampaignListWriter:
    """Campaign audience import: CSV (header once) or Parquet, one file per delivery."""

    def __init__(self, dest: DestinationConfig, key: DeliveryKey, workdir: Path) -> None:
        self.dest, self.key = dest, key
        ext = "parquet" if dest.format == "parquet" else "csv"
        self.path = f"{key.feed}/{key.root}.{ext}"
        self.local = workdir / f"{dest.name}.{ext}"
        self.out = Output()
        self._parquet: Any = None  # a pyarrow.parquet.ParquetWriter, once started
        self._started = False
        self._md5 = hashlib.md5()  # noqa: S324 - the manifest's checksum, not security

    def add(self, audience: pl.DataFrame, attrs: pl.LazyFrame | None = None) -> None:
        rows = audience
        if self.dest.segment_filter is not None:
            rows = rows.filter(pl.col("segment_id").is_in(list(self.dest.segment_filter)))
        self.out.unmapped_segments += audience.height - rows.height
        table = _by_profile(rows).select(
            "profile_id", pl.col("segment_id").cast(pl.Int64), "action", "matched_on",
            delivery=pl.lit(self.key.root),
        )
        self.out.rows += table.height
        self._append(table)

    def _append(self, table: pl.DataFrame) -> None:
        if not self._started:  # the columns Campaign imports (schemas/campaign_list.json)
            check_output(table.schema, "campaign_list", f"campaign list {self.path}")
        if self.dest.format == "parquet":
            import pyarrow.parquet as pq  # only here: pyarrow takes ~0.3 s to import

            arrow = table.to_arrow()
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(self.local, arrow.schema)
            self._parquet.write_table(arrow)
        else:
            with open(self.local, "ab" if self._started else "wb") as fh:
                hashed: Any = _Hashed(fh, self._md5)
                table.write_csv(hashed, include_header=not self._started)
        self._started = True

    def finish(self) -> Output:
        if not self._started:  # empty audience: still a (header-only) file per delivery
            self._append(pl.DataFrame(schema={
                "profile_id": pl.String, "segment_id": pl.Int64, "action": pl.String,
                "matched_on": pl.String, "delivery": pl.String}))
        self.close()
        self.out.files.append((self.path, self.local))
        if self.dest.format != "parquet":
            self.out.md5s[self.path] = self._md5.hexdigest()
        return self.out

    def close(self) -> None:
        if self._parquet is not None:
            self._parquet.close()
            self._parquet = None


def profile_order() -> pl.Expr:
    """(pnum, segment_id) packed in one integer: sorting on it sorts a bucket's rows by
    (profile_id, segment_id), since number order is profile_id order within a bucket."""
    return pl.col("pnum").cast(pl.UInt64) * (1 << 32) + pl.col("segment_id").cast(pl.UInt64)


def _by_profile(rows: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by (profile_id, segment_id): on the profile numbers when every row has
    one (integers sort much faster than strings)."""
    if "pnum" in rows.columns and not rows.get_column("pnum").has_nulls():
        order = rows.select(profile_order()).to_series()
        # pass 3 hands rows over in this order (leavers aside): moving strings costs more
        return rows if order.is_sorted() else rows.sort(profile_order())
    return rows.sort("profile_id", "segment_id")


def gathered_from(attrs: pl.LazyFrame) -> pl.DataFrame:
    """Attributes read to be gathered from by profile number: in one chunk (a scan gives
    several, and a gather from a many-chunk string column took ~5 x as long)."""
    return attrs.collect().rechunk()


def _attribute(rows: pl.DataFrame, attrs: pl.LazyFrame, column: str) -> pl.Series:
    """Each row's profile attribute `column` (null when the profile or its value is
    missing): a gather by profile number, or a join on profile_id for rows without."""
    if "pnum" in rows.columns:
        values = gathered_from(attrs.select(column)).to_series()
        return values.gather(rows.get_column("pnum"))
    ids = attrs.select("profile_id", pl.col(column).alias("_value")).collect()
    # profile_id is unique in the snapshot (checked on read): no m:1 validation pass.
    return rows.select("profile_id").join(ids, on="profile_id", how="left",
                                          maintain_order="left").get_column("_value")


class InboundWriter:
    """AAM inbound files, compressed on a thread while the next bucket is merged.

    Lines go to numbered local parts of at most max_lines_per_file lines; only `finish` knows
    whether there is one file or several, so only then are the AAM names given.
    """

    def __init__(self, dest: DestinationConfig, key: DeliveryKey, workdir: Path) -> None:
        if key.timestamp_s is None or key.timestamp_s < MIN_TIMESTAMP:
            raise DeliveryFailed("no usable date: neither a TIMESTAMP in the name nor a date= "
                                 "folder, or one before 2000-01-01 (destinations."
                                 f"{dest.name} files AAM inbound files by date)")
        if dest.dpid is None:  # config requires it for aam_inbound
            raise ConfigError(f"destination {dest.name!r}: dpid is required for aam_inbound")
        self.dest, self.key, self.ts, self.dpid = dest, key, key.timestamp_s, dest.dpid
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{dest.name}-", dir=workdir))
        self.lines = 0
        self.out = Output()
        self._traits = pl.DataFrame(
            {"segment_id": list(dest.traits), "trait_id": list(dest.traits.values())},
            schema={"segment_id": pl.UInt32, "trait_id": pl.Int64})
        self._parts = _PartWriter(self.workdir, dest.gzip)

    def add(self, audience: pl.DataFrame, attrs: pl.LazyFrame) -> None:
        """Audience rows of one profile bucket, with that bucket's profile attributes."""
        # a lookup, not a join: the mapping has a few dozen segments (a join took ~0.2 s
        # per million rows)
        mapped = audience.with_columns(trait_id=pl.col("segment_id").replace_strict(
            self._traits.get_column("segment_id"), self._traits.get_column("trait_id"),
            default=None, return_dtype=pl.Int64)).filter(pl.col("trait_id").is_not_null())
        self.out.unmapped_segments += audience.height - mapped.height
        column = DPUUID_COLUMN[self.dest.id]
        if column == "email_key" and "pnum" in mapped.columns:
            self._add_ranked(mapped, gathered_from(attrs.select(column, "email_order")))
            return
        with_ids = mapped.with_columns(dpuuid=_attribute(mapped, attrs, column))
        rows = with_ids.filter(pl.col("dpuuid").is_not_null())
        self.out.missing_id += with_ids.height - rows.height
        self.add_rows(rows.select("dpuuid", "trait_id", "action"))

    def _add_ranked(self, mapped: pl.DataFrame, ids: pl.DataFrame) -> None:
        """SHA-256 DPUUIDs of numbered profiles: rows keep the profile number, and only the
        first row of each line takes its DPUUID string (`inbound_pieces`)."""
        digests, ranks = ids.get_column("email_key"), ids.get_column("email_order")
        pnum = mapped.get_column("pnum")
        rows = mapped.filter(digests.is_not_null().gather(pnum))
        self.out.missing_id += mapped.height - rows.height
        rows = rows.select("pnum", "trait_id", "action",
                           order=ranks.gather(rows.get_column("pnum")))
        if rows.get_column("order").has_nulls():  # ranks could not be used: by the strings
            self.add_rows(rows.select(dpuuid=digests.gather(rows.get_column("pnum")),
                                      trait_id=pl.col("trait_id"), action=pl.col("action")))
            return
        self.add_rows(rows, digests)

    def add_rows(self, rows: pl.DataFrame, dpuuids: pl.Series | None = None) -> None:
        """Ready (dpuuid, trait_id, action[, order]) rows (`inbound_pieces`), or (pnum,
        trait_id, action, order) rows naming their DPUUID by position in `dpuuids`; one
        DPUUID must not span two calls."""
        self.out.rows += rows.height
        if rows.is_empty():
            return
        pieces = inbound_pieces(rows, dpuuids)
        line = pieces.get_column("line")
        count = line[-1] + 1
        per_file = self.dest.max_lines_per_file
        start = 0
        while start < count:
            used = self.lines % per_file
            # in blocks: the gzip thread starts on the first while the next is joined, and
            # a bucket's text (~80 MB per million lines) is never held whole, twice
            take = min(per_file - used, count - start, BLOCK_LINES)
            lo, hi = line.search_sorted(pl.Series([start, start + take]), side="left")
            text = pieces.get_column("text").slice(lo, hi - lo).str.join("")
            self._parts.write(text.cast(pl.Binary).item(), new_part=used == 0)
            self.lines += take
            start += take

    def finish(self) -> Output:
        parts, digests = self._parts.close()
        if len(parts) >= PARTS:
            raise DeliveryFailed(f"destinations.{self.dest.name}: {len(parts)} files for one "
                                 f"delivery, at most {PARTS - 1}; raise max_lines_per_file")
        folder = inbound_folder(self.ts)
        for n, (local, digest) in enumerate(zip(parts, digests, strict=True), start=1):
            name = inbound_file_name(self.dpid, self.ts, self.key.tag * PARTS + n,
                                     self.dest.gzip)
            self.out.files.append((f"{folder}/{name}", local))
            self.out.md5s[f"{folder}/{name}"] = digest
        return self.out

    def close(self) -> None:
        """Stop the compressing thread (after a failure; `finish` does it otherwise)."""
        self._parts.close()


class _PartWriter:
    """Numbered local files written (and gzip'd) by one thread, in submission order.

    zlib releases the GIL, so compression overlaps the caller's next bucket. At most one
    block waits, which bounds memory.
    """

    def __init__(self, folder: Path, gz: bool) -> None:
        self.folder, self.gz = folder, gz
        self.parts: list[Path] = []
        self.digests: list[str] = []  # md5 of each closed part
        self._stack: ExitStack | None = None
        self._md5: Any = None
        self._out: BinaryIO | None = None
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(1, "compress")
        self._pending: Future | None = None

    def write(self, data: bytes, new_part: bool) -> None:
        self._wait()
        assert self._pool is not None, "write after close"
        self._pending = self._pool.submit(self._write, data, new_part)

    def close(self) -> tuple[list[Path], list[str]]:
        """Wait for every block, close the last part; the parts in order, and their md5s."""
        try:
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None
            self._end_part()
        return self.parts, self.digests

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _write(self, data: bytes, new_part: bool) -> None:
        if new_part or self._out is None:
            self._end_part()
            local = self.folder / f"part-{len(self.parts) + 1:05d}"
            self._stack = ExitStack()
            self._md5 = hashlib.md5()  # noqa: S324 - the manifest's checksum, not security
            self._out = self._stack.enter_context(_open_out(local, self.gz, self._md5))
            self.parts.append(local)
        self._out.write(data)

    def _end_part(self) -> None:
        stack, self._stack, self._out = self._stack, None, None
        if stack is not None:
            stack.close()
            self.digests.append(self._md5.hexdigest())


class ContactsWriter:
    """No-profile contacts (PII): contact, segment_id, action, delivery."""

    def __init__(self, dest: DestinationConfig, key: DeliveryKey, workdir: Path) -> None:
        self.key = key
        self.local = workdir / f"{dest.name}.csv"
        self.out = Output()
        self._started = False

    def add(self, contacts: pl.DataFrame) -> None:
        table = contacts.sort("contact", "segment_id").select(
            "contact", pl.col("segment_id").cast(pl.Int64), "action",
            delivery=pl.lit(self.key.root))
        self.out.rows += table.height
        with open(self.local, "ab" if self._started else "wb") as fh:
            table.write_csv(fh, include_header=not self._started)
        self._started = True

    def finish(self) -> Output:
        if not self._started:
            self.add(pl.DataFrame(schema={"contact": pl.String, "segment_id": pl.UInt32,
                                          "action": pl.String}))
        self.out.files.append((f"{self.key.feed}/{self.key.root}.csv", self.local))
        return self.out

    def close(self) -> None:
        """Nothing stays open between `add` calls."""


def inbound_files_for(rows: pl.DataFrame, dest: DestinationConfig, key: DeliveryKey,
                      workdir: Path) -> Output:
    """AAM inbound files, as bytes, from ready (dpuuid, trait_id, action) rows (export)."""
    writer = InboundWriter(dest, key, workdir)
    writer.add_rows(rows)
    out = writer.finish()
    out.files = [(p, _read(d)) for p, d in out.files]
    return out


def publish_outputs(targets: Mapping[str, Store], dests: list[DestinationConfig],
                    key: DeliveryKey, outputs: Mapping[str, Output],
                    keys: RunKeys | None = None) -> dict[str, list[str]]:
    """Every destination's files of one delivery (both flows): all names are checked before
    the first file is written, so a clash publishes nothing anywhere. A destination with a
    pgp_recipient_key_file gets its files encrypted first, named `.pgp`."""
    sealing = {d.name: keys.destinations[d.name] for d in dests
               if keys and d.name in keys.destinations}
    with ExitStack() as stack:
        ready = dict(outputs)
        if sealing:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(
                prefix="sealed-", dir=next(iter(sealing.values())).scratch)))
            for name, seal in sealing.items():
                ready[name] = _sealed(outputs[name], seal, folder / name)
        for dest in dests:
            check_names(targets[dest.name], dest, key, ready[dest.name],
                        exact=dest.name not in sealing)
        # Each destination has a store (connection) of its own: written side by side.
        with ThreadPoolExecutor(max(1, len(dests)), thread_name_prefix="publish") as pool:
            written = {dest.name: pool.submit(write_outputs, targets[dest.name], dest, key,
                                              ready[dest.name]) for dest in dests}
            wait(written.values())
            return {name: future.result() for name, future in written.items()}


def _sealed(out: Output, seal: Encryptor, folder: Path) -> Output:
    """The same output with each file encrypted to a local `.pgp` copy (streamed by gpg)."""
    folder.mkdir(parents=True)
    files: list[tuple[str, bytes | Path]] = []
    for n, (path, data) in enumerate(out.files):
        local = folder / f"{n:05d}.pgp"
        seal.seal(data, local)
        files.append((f"{path}.pgp", local))
    return replace(out, files=files, md5s={})


def check_names(store: Store, dest: DestinationConfig, key: DeliveryKey, out: Output,
                exact: bool = True) -> None:
    """Names are unique per (destination, delivery): refuse to replace another delivery's
    file. Our own files (in our manifest, or left whole by a crash before the manifest and
    so byte-identical) may be rewritten. Encrypted files differ on every run (a new session
    key each time), so for them (`exact=False`) a file left by a crash cannot be told from
    another's: names alone keep them apart there (the feed/root tag in AAM inbound names)."""
    if not exact:
        return
    own = set(_previous_files(store, manifest_path(key)))
    for path, data in out.files:
        if (path not in own and store.exists(path)
                and _stored_md5(store, path) != _checksum(out, path, data)):
            raise DeliveryFailed(f"destinations.{dest.name}: {path} already holds another "
                                 "delivery's output; nothing published")


def write_outputs(store: Store, dest: DestinationConfig, key: DeliveryKey,
                  out: Output) -> list[str]:
    """Write files atomically, drop files a previous run wrote that this run did not, then
    the manifest last (a reader who trusts manifests never sees a partial delivery)."""
    manifest = manifest_path(key)
    previous = _previous_files(store, manifest)
    sums = {p: _checksum(out, p, d) for p, d in out.files}  # before a spool is moved away
    written = []
    for path, data in out.files:
        if isinstance(data, Path):  # a spool of this delivery's own: nothing reads it again
            store.put_file(str(data), path, consume=True)
        else:
            store.write_bytes(path, data)
        written.append(path)
    for stale in sorted(set(previous) - set(written)):
        store.delete(stale)
    listing = {
        "destination": dest.name, "feed": key.feed, "delivery": key.root, "rows": out.rows,
        "files": sums,
    }
    store.write_bytes(manifest, json.dumps(listing, sort_keys=True, indent=1).encode())
    log.info("destination=%s delivery_files=%d rows=%d", dest.name, len(written), out.rows)
    return written


def manifest_path(key: DeliveryKey) -> str:
    """Where the manifest of one delivery's files for a destination lives (written last)."""
    return f"_manifests/{key.feed}/{key.root}.json"


def _previous_files(store: Store, path: str) -> list[str]:
    if not store.exists(path):
        return []
    try:
        return list(json.loads(store.read_bytes(path)).get("files", {}))
    except ValueError:
        return []


class _Hashed:
    """A binary file that keeps the md5 of what is written through it: the manifest's
    checksum without reading the file again (md5 releases the GIL on large blocks)."""

    def __init__(self, raw: BinaryIO, md5: Any) -> None:
        self.raw, self.md5 = raw, md5

    def write(self, data: bytes) -> int:
        self.md5.update(data)
        return self.raw.write(data)

    def flush(self) -> None:
        self.raw.flush()


@contextmanager
def _open_out(path: Path, gz: bool, md5: Any) -> Iterator[BinaryIO]:
    with open(path, "wb") as file:
        raw: Any = _Hashed(file, md5)
        if not gz:
            yield raw
            return
        # mtime=0 and no file name in the header: the same input gives the same bytes.
        # ISA-L (standard gzip format) level 1: inbound lines are mostly hex digests; on a
        # 64 MB file it took 0.44 s and wrote 29 MB where zlib level 1 took 1.6 s for 31 MB.
        with igzip.IGzipFile(filename="", fileobj=raw, mode="wb", mtime=0,
                             compresslevel=1) as packed:
            yield packed  # type: ignore[misc]  # GzipFile is a binary file


def _checksum(out: Output, path: str, data: bytes | Path) -> str:
    """md5 of one of out's files: kept by its writer, else read."""
    return out.md5s.get(path) or _md5(data)


def _md5(data: bytes | Path) -> str:
    digest = hashlib.md5()  # noqa: S324 - a checksum in the manifest, not security
    if isinstance(data, Path):
        with open(data, "rb") as fh:
            while block := fh.read(_COPY):
                digest.update(block)
    else:
        digest.update(data)
    return digest.hexdigest()


def _stored_md5(store: Store, path: str) -> str:
    digest = hashlib.md5()  # noqa: S324 - compares two copies, not security
    with store.open_read(path) as stream:
        while block := stream.read(_COPY):
            digest.update(block)
    return digest.hexdigest()


def _read(data: bytes | Path) -> bytes:
    return data.read_bytes() if isinstance(data, Path) else data


def timestamp_seconds(timestamp_ms: int | None, day: str | None) -> int | None:
    """TIMESTAMP of a delivery's outputs: its own, else midnight of its date; None without
    either (never 0: outputs would be filed under date=1970-01-01)."""
    if timestamp_ms is not None:
        return timestamp_ms // 1000
    if day:
        return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())
    return None

