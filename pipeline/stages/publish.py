"""Publish: build each destination's files for a delivery and write them atomically.

Names come from the delivery (root, timestamp), never the wall clock, so a rerun writes the
same names with the same bytes. A manifest per (destination, delivery) is written last.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl

from pipeline.config import DestinationConfig
from pipeline.formats import inbound_file_name, inbound_folder, inbound_lines, split_lines
from pipeline.stores import Store

log = logging.getLogger(__name__)
DPUUID_COLUMN = {"email_sha256": "email_key", "profile_id": "profile_id",
                 "crm_id": "crm_id", "ecid": "ecid"}


@dataclass(frozen=True)
class DeliveryKey:
    """What output names are derived from."""

    feed: str
    root: str
    timestamp_s: int  # delivery timestamp (UNIX seconds)


@dataclass
class Output:
    """Files one destination gets for one delivery, as (path, bytes)."""

    files: list[tuple[str, bytes]] = field(default_factory=list)
    rows: int = 0
    unmapped_segments: int = 0
    missing_id: int = 0  # mapped rows of profiles lacking the destination's DPUUID


def campaign_list(audience: pl.DataFrame, dest: DestinationConfig, key: DeliveryKey) -> Output:
    rows = audience
    if dest.segment_filter is not None:
        rows = rows.filter(pl.col("segment_id").is_in(list(dest.segment_filter)))
    table = rows.sort("profile_id", "segment_id").select(
        "profile_id", pl.col("segment_id").cast(pl.Int64), "action", "matched_on",
        delivery=pl.lit(key.root),
    )
    ext = "parquet" if dest.format == "parquet" else "csv"
    return Output([(f"{key.feed}/{key.root}.{ext}", _table_bytes(table, dest.format))],
                  rows=table.height, unmapped_segments=audience.height - rows.height)


def aam_inbound(audience: pl.DataFrame, profiles: pl.DataFrame, dest: DestinationConfig,
                key: DeliveryKey) -> Output:
    traits = pl.DataFrame({"segment_id": list(dest.traits), "trait_id": list(dest.traits.values())},
                          schema={"segment_id": pl.UInt32, "trait_id": pl.Int64})
    mapped = audience.join(traits, on="segment_id", how="inner")
    ids = profiles.select("profile_id", dpuuid=pl.col(DPUUID_COLUMN[dest.id]))
    with_ids = mapped.join(ids, on="profile_id", how="left", validate="m:1")
    rows = with_ids.filter(pl.col("dpuuid").is_not_null()).select("dpuuid", "trait_id", "action")
    return Output(_inbound_files(rows, dest, key.timestamp_s), rows=rows.height,
                  unmapped_segments=audience.height - mapped.height,
                  missing_id=with_ids.height - rows.height)


def inbound_files_for(rows: pl.DataFrame, dest: DestinationConfig, timestamp_s: int) -> Output:
    """AAM inbound files from ready (dpuuid, trait_id, action) rows (export direction)."""
    return Output(_inbound_files(rows, dest, timestamp_s), rows=rows.height)


def _inbound_files(rows: pl.DataFrame, dest: DestinationConfig, ts: int) -> list[tuple[str, bytes]]:
    if rows.is_empty():
        return []
    lines = inbound_lines(rows)["line"]
    ranges = split_lines(len(lines), dest.max_lines_per_file)
    folder = inbound_folder(ts)
    files = []
    for n, (start, stop) in enumerate(ranges, start=1):
        split = n if len(ranges) > 1 else None
        name = inbound_file_name(dest.dpid, ts, split, dest.gzip)
        text = "\n".join(lines[start:stop].to_list()) + "\n"
        files.append((f"{folder}/{name}", _maybe_gzip(text.encode(), dest.gzip)))
    return files


def contacts(unmatched: pl.DataFrame, dest: DestinationConfig, key: DeliveryKey) -> Output:
    table = unmatched.sort("contact", "segment_id").select(
        "contact", pl.col("segment_id").cast(pl.Int64), "action", delivery=pl.lit(key.root))
    return Output([(f"{key.feed}/{key.root}.csv", _table_bytes(table, "csv"))], rows=table.height)


def write_outputs(store: Store, dest: DestinationConfig, key: DeliveryKey,
                  out: Output) -> list[str]:
    """Write files atomically, drop files a previous run wrote that this run did not, then
    the manifest last (a reader who trusts manifests never sees a partial delivery)."""
    manifest = manifest_path(key)
    previous = _previous_files(store, manifest)
    written = []
    for path, data in out.files:
        store.write_bytes(path, data)
        written.append(path)
    for stale in sorted(set(previous) - set(written)):
        store.delete(stale)
    listing = {
        "destination": dest.name, "feed": key.feed, "delivery": key.root, "rows": out.rows,
        "files": {p: hashlib.md5(d).hexdigest() for p, d in out.files},  # noqa: S324
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


def _table_bytes(table: pl.DataFrame, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "parquet":
        table.write_parquet(buf, statistics=False)
    else:
        table.write_csv(buf)
    return buf.getvalue()


def _maybe_gzip(data: bytes, enabled: bool) -> bytes:
    if not enabled:
        return data
    buf = io.BytesIO()
    # mtime=0 and no file name in the header: the same input gives the same bytes.
    with gzip.GzipFile(filename="", fileobj=buf, mode="wb", mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def timestamp_seconds(timestamp_ms: int | None, day: str | None) -> int:
    if timestamp_ms is not None:
        return timestamp_ms // 1000
    if day:
        return int(datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp())
    return 0
