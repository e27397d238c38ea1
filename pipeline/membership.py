"""Membership state, as Parquet under the state store: what has been published, so the next
publication can say who left.

Export direction (SPEC §10), one folder per (destination, audience):
    membership/<destination>/<audience-key>/HEAD.json         which version is current
    membership/<destination>/<audience-key>/<version>.parquet  one column `dpuuid`

A version is named after the export file that produced it. HEAD keeps the current and the
previous version, so an export re-run after a crash (published, state partly saved, ledger
not written) diffs against the state *before* that export and republishes the same bytes.

AAM feeds (SPEC §11): see `FeedMembership` below.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import polars_hash as plh

from pipeline.errors import FatalError
from pipeline.spill import WorkArea, text_bucket
from pipeline.stores import Store

log = logging.getLogger(__name__)
ROOT = "membership"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
# Kept as they are; every other name becomes "<slug>-<hash>", which holds a dash and so never
# equals a kept name.
_SAFE = re.compile(r"[A-Za-z0-9_]{1,64}")


@dataclass(frozen=True)
class Version:
    """One saved membership: which export produced it and under which trait it was sent."""

    export: str  # export file root
    timestamp: int  # export timestamp (UNIX seconds), orders versions
    trait_id: int
    members: int
    file: str  # parquet file name inside the audience folder

    @property
    def order(self) -> tuple[int, str]:
        return (self.timestamp, self.export)


@dataclass(frozen=True)
class Head:
    audience: str
    current: Version | None = None
    previous: Version | None = None


class MembershipState:
    """Membership versions of one destination on the state store."""

    def __init__(self, store: Store, destination: str) -> None:
        self.store = store
        self.destination = destination

    def folder(self, audience: str) -> str:
        return f"{ROOT}/{folder_name(self.destination)}/{folder_name(audience)}"

    def head(self, audience: str) -> Head:
        path = f"{self.folder(audience)}/HEAD.json"
        if not self.store.exists(path):
            return Head(audience)
        return self._read_head(path)

    def _read_head(self, path: str) -> Head:
        try:
            raw = json.loads(self.store.read_bytes(path))
            return Head(raw["audience"], *(Version(**raw[k]) if raw.get(k) else None
                                           for k in ("current", "previous")))
        except (ValueError, KeyError, TypeError) as exc:
            raise FatalError(f"membership state {path} is unreadable: {exc}") from None

    def base(self, audience: str, export: str) -> Version | None:
        return base_version(self.head(audience), export)

    def read(self, audience: str, version: Version | None) -> pl.DataFrame:
        """The members (`dpuuid`) of a version; empty for None."""
        if version is None:
            return pl.DataFrame(schema={"dpuuid": pl.String})
        path = f"{self.folder(audience)}/{version.file}"
        try:
            return pl.read_parquet(io.BytesIO(self.store.read_bytes(path)), columns=["dpuuid"])
        except FileNotFoundError:
            raise FatalError(f"membership state {path} listed in HEAD is missing") from None

    def save(self, audience: str, export: str, timestamp: int, trait_id: int,
             members: pl.DataFrame) -> Version:
        """Write the new version, then point HEAD at it (atomic per audience), then drop
        versions HEAD no longer names."""
        file = f"{timestamp}-{hashlib.sha256(export.encode()).hexdigest()[:12]}.parquet"
        version = Version(export, timestamp, trait_id, members.height, file)
        folder = self.folder(audience)
        buf = io.BytesIO()
        # zstd halves hex DPUUIDs; no sort: nothing depends on the state's row order.
        members.select("dpuuid").write_parquet(buf, compression="zstd")
        self.store.write_bytes(f"{folder}/{file}", buf.getvalue())
        head = self.head(audience)
        # Re-saving the current export keeps its predecessor, so a later re-run still
        # finds the state before it.
        previous = head.previous if head.current and head.current.export == export \
            else head.current
        doc = {"audience": audience, "destination": self.destination,
               "current": asdict(version), "previous": asdict(previous) if previous else None}
        self.store.write_bytes(f"{folder}/HEAD.json",
                               json.dumps(doc, sort_keys=True, indent=1).encode())
        keep = {"HEAD.json", file, previous.file if previous else ""}
        for entry in self.store.list(folder + "/"):
            if entry.path.rpartition("/")[2] not in keep:
                self.store.delete(entry.path)
        log.info("destination=%s membership_saved members=%d", self.destination, members.height)
        return version

    def current_exports(self) -> set[str]:
        """Roots of the exports that currently define some audience of this destination."""
        prefix = f"{ROOT}/{folder_name(self.destination)}/"
        heads = [self._read_head(e.path) for e in self.store.list(prefix)
                 if e.path.endswith("/HEAD.json")]
        return {h.current.export for h in heads if h.current is not None}


def base_version(head: Head, export: str) -> Version | None:
    """The version an export diffs against: the current one, unless the current one *is*
    this export (a re-run, e.g. after a crash that saved part of the state), then the one
    before it, so the re-run publishes what the first run published."""
    if head.current is not None and head.current.export == export:
        return head.previous
    return head.current


def diff(old: pl.DataFrame, new: pl.DataFrame, old_trait: int | None, new_trait: int,
         full: bool = False) -> pl.DataFrame:
    """(dpuuid, trait_id, action) for one audience: `add` for joiners (every member when
    `full`), `remove` for leavers. A changed trait ID makes every old member a leaver (of
    the old trait) and every new member a joiner.

    Anti-joins on the one `dpuuid` key, eagerly: measured faster than lazy or multi-key
    joins at millions of members (benchmarks/bench_export_diff.py).
    """
    moved = old_trait is not None and old_trait != new_trait
    joiners = new if full or moved else new.join(old, on="dpuuid", how="anti")
    leavers = old if moved else old.join(new, on="dpuuid", how="anti")
    return pl.concat([
        joiners.select("dpuuid", trait_id=pl.lit(new_trait, pl.Int64), action=pl.lit("add")),
        leavers.select("dpuuid", trait_id=pl.lit(old_trait, pl.Int64),
                       action=pl.lit("remove")),
    ])


def folder_name(name: str) -> str:
    """A name as one path segment: kept when already safe, else a readable slug plus a hash
    (audience names may hold any character; two names must never share a folder)."""
    if _SAFE.fullmatch(name):
        return name
    slug = _UNSAFE.sub("-", name)[:40].strip("-")
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{slug or 'x'}-{digest}"


# --------------------------------------------------------------------------------------------
# AAM feeds: the (profile_id, segment_id) pairs currently added, one version per delivery
# --------------------------------------------------------------------------------------------

FEEDS_ROOT = "feed_membership"
MEMBERS = {"profile_id": pl.String, "segment_id": pl.UInt32}
DAY_MS = 86_400_000


@dataclass(frozen=True)
class FeedVersion:
    """The membership after one applied delivery: parts by profile bucket, never rewritten."""

    delivery: str  # delivery root
    timestamp_ms: int
    pairs: int
    buckets: int  # profile buckets the parts were written with (text_bucket)
    folder: str  # version folder inside the feed folder
    parts: tuple[int, ...] = ()  # buckets that hold pairs

    @property
    def order(self) -> tuple[int, str]:
        return (self.timestamp_ms, self.delivery)


@dataclass(frozen=True)
class FeedHead:
    """Every kept version of a feed, oldest first; `pruned` once retention deleted one."""

    versions: tuple[FeedVersion, ...] = ()
    pruned: bool = False

    @property
    def newest(self) -> FeedVersion | None:
        return self.versions[-1] if self.versions else None

    def before(self, order: tuple[int, str]) -> FeedVersion | None:
        """The state a delivery of this order applies to: the newest version older than it."""
        older = [v for v in self.versions if v.order < order]
        return older[-1] if older else None

    def has_state_before(self, timestamp_ms: int) -> bool:
        """Whether the membership before this time is known (kept, or nothing was applied)."""
        return not self.pruned or any(v.timestamp_ms < timestamp_ms for v in self.versions)


@dataclass
class Mirrored:
    """One profile bucket after a delivery."""

    members: pl.DataFrame  # (profile_id, segment_id) after the delivery, in `in_order` order
    leavers: pl.DataFrame  # audience-shaped `remove` rows, `matched_on` null (full only)
    removed: int = 0  # pairs of the old membership absent from the new one


def empty_members() -> pl.DataFrame:
    return pl.DataFrame(schema=MEMBERS)


def pair_hash(profile_id: pl.Expr, segment_id: pl.Expr) -> pl.Expr:
    """A fixed 64-bit hash of a (profile, segment) pair: xxh3 of the ID plus the segment
    (wrapping). Equal pairs hash equal; distinct pairs may too, very rarely, and the callers
    notice it."""
    digest = plh.NonCryptographicHashingNameSpace(profile_id).xxh3_64()
    return digest + segment_id.cast(pl.UInt64)


def mirror(audience: pl.DataFrame, members: pl.DataFrame, full: bool) -> Mirrored:
    """Apply one profile bucket of a delivery's merged audience to the membership before it.

    `iter`: added pairs enter, removed pairs leave, the rest stays. `full`: the membership
    becomes the added pairs; old pairs the delivery does not mention at all are leavers
    (a pair it explicitly removes is already a `remove` row of the audience).

    One stable sort of the old pairs then the mentioned ones by `pair_hash`, instead of
    anti-joins and sorts on (string, integer) pairs: each side holds a pair at most once, so
    an old pair's mention (if any) is the row right after it, and every output is a filter of
    the sorted rows, already in order (~3x faster per bucket than sorting the pairs:
    benchmarks/README.md, "Full deliveries: membership cost"). Should two distinct pairs
    share a hash, the rows are sorted by the pairs themselves instead.
    """
    pairs = ["profile_id", "segment_id"]
    src = pl.col("src")  # 0 old pair, 1 added, 2 removed by the delivery
    old_rows = _hashed(members.lazy().select(*_pair_columns(), src=pl.lit(0, pl.UInt8)))
    mentioned = _hashed(audience.lazy().select(
        *_pair_columns(),
        src=pl.when(pl.col("action") == "add").then(pl.lit(1, pl.UInt8))
        .otherwise(pl.lit(2, pl.UInt8))))
    # Two sorted runs: the stable sort merges them, old rows first.
    rows = pl.concat([old_rows, mentioned]).sort("_h", maintain_order=True)
    h = pl.col("_h")
    twin = h == h.shift(-1)
    same_pair = pl.all_horizontal(pl.col(c) == pl.col(c).shift(-1) for c in pairs)
    by_hash = not rows.filter(twin | twin.shift(1)).select(twin & ~same_pair).to_series().any()
    if not by_hash:
        rows = rows.sort(*pairs, "src")
    # For an old pair: what the delivery says about it (0: nothing).
    rows = rows.with_columns(mention=pl.when(twin if by_hash else same_pair)
                             .then(src.shift(-1)).otherwise(pl.lit(0, pl.UInt8)))
    old, mention = src == 0, pl.col("mention")
    stays = (src == 1) if full else (src == 1) | (old & (mention == 0))
    leaves = old & (mention != 1) if full else old & (mention == 2)
    new = rows.filter(stays).select(*pairs, "_h")
    leavers = rows.filter(old & (mention == 0)) if full else rows.clear()
    return Mirrored(
        members=(new if by_hash else _in_order(new)).select(pairs),
        leavers=leavers.select(*pairs, action=pl.lit("remove"),
                               matched_on=pl.lit(None, pl.String)),
        removed=int(rows.select(leaves.sum()).item()),
    )


def _hashed(rows: pl.LazyFrame) -> pl.DataFrame:
    """Rows with their `pair_hash` as `_h`, sorted by it (old pairs mostly already are)."""
    frame = rows.with_columns(_h=pair_hash(pl.col("profile_id"), pl.col("segment_id"))).collect()
    return frame if frame.get_column("_h").is_sorted() else frame.sort("_h", maintain_order=True)


def _pair_columns() -> list[pl.Expr]:
    return [pl.col("profile_id").cast(pl.String), pl.col("segment_id").cast(pl.UInt32)]


def _in_order(members: pl.DataFrame) -> pl.DataFrame:
    """A membership's pairs (with `_h`) in their one order: by `pair_hash`, or by the pairs
    themselves when two of them share a hash. So equal memberships give equal parts, however
    they were computed."""
    rows = members.sort("_h")
    h = rows.get_column("_h")
    # sorted, a shared hash is two neighbours (a hash table over the column took ~10x longer)
    if rows.height > 1 and (h.slice(1) == h.slice(0, rows.height - 1)).any():
        return members.sort("profile_id", "segment_id")
    return rows


def write_members(members: pl.DataFrame, path: Path, ordered: bool = False) -> None:
    """One bucket of a version as Parquet, its pairs in `_in_order` order (`ordered`: they
    already are, as `mirror` returns them), so equal memberships give equal bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    members = members.select(list(MEMBERS))
    if not ordered:
        members = _in_order(members.with_columns(
            _h=pair_hash(pl.col("profile_id"), pl.col("segment_id")))).drop("_h")
    # zstd level 1: as small as the default level on these parts (hash order), faster
    members.write_parquet(path, compression="zstd", compression_level=1)


class FeedMembership:
    """Membership versions of one AAM feed on the state store.

    Layout:  feed_membership/<feed>/HEAD.json                 kept versions, oldest first
             feed_membership/<feed>/<version>/part-<b>.parquet  pairs of profile bucket b
    A version folder is written whole before HEAD names it and is never rewritten (a replay
    writes a new folder), so a crash leaves at most an unnamed folder, removed later.
    """

    def __init__(self, store: Store, feed: str) -> None:
        self.store = store
        self.feed = feed
        self.folder = f"{FEEDS_ROOT}/{folder_name(feed)}"

    def head(self) -> FeedHead:
        path = f"{self.folder}/HEAD.json"
        if not self.store.exists(path):
            return FeedHead()
        try:
            raw = json.loads(self.store.read_bytes(path))
            versions = tuple(FeedVersion(**{**v, "parts": tuple(v["parts"])})
                             for v in raw["versions"])
            return FeedHead(versions, bool(raw["pruned"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise FatalError(f"membership state {path} is unreadable: {exc}") from None

    def load(self, version: FeedVersion | None, buckets: int, spill: WorkArea,
             name: str = "members") -> None:
        """Spill a version's pairs by profile bucket (`buckets` of them), part by part."""
        if version is None:
            return
        for b in version.parts:
            path = f"{self.folder}/{version.folder}/{_part(b)}"
            try:
                part = pl.read_parquet(io.BytesIO(self.store.read_bytes(path)))
            except FileNotFoundError:
                raise FatalError(f"membership state {path} listed in HEAD is missing") from None
            bucket = (pl.lit(b, pl.UInt32) if version.buckets == buckets
                      else text_bucket(pl.col("profile_id"), buckets))
            spill.write(name, part.with_columns(_b=bucket), bucket="_b")

    def save(self, delivery: str, timestamp_ms: int, buckets: int, parts: dict[int, Path],
             tag: str, retention_days: int) -> FeedVersion:
        """Upload a version's parts, then name it in HEAD (replacing an earlier version of
        the same delivery), drop versions past retention and every unnamed file."""
        digest = hashlib.sha256(delivery.encode()).hexdigest()[:12]
        folder = f"{timestamp_ms}-{digest}-{folder_name(tag)}"
        pairs = 0
        for b, local in sorted(parts.items()):
            pairs += pl.scan_parquet(local).select(pl.len()).collect().item()
            self.store.put_file(str(local), f"{self.folder}/{folder}/{_part(b)}")
        version = FeedVersion(delivery, timestamp_ms, pairs, buckets, folder,
                              tuple(sorted(parts)))
        head = self.head()
        versions = sorted([v for v in head.versions if v.delivery != delivery] + [version],
                          key=lambda v: v.order)
        cutoff = versions[-1].timestamp_ms - retention_days * DAY_MS
        kept = [v for v in versions if v.timestamp_ms >= cutoff]
        doc = {"feed": self.feed, "pruned": head.pruned or len(kept) < len(versions),
               "versions": [asdict(v) for v in kept]}
        self.store.write_bytes(f"{self.folder}/HEAD.json",
                               json.dumps(doc, sort_keys=True, indent=1).encode())
        named = {v.folder for v in kept}
        for entry in self.store.list(self.folder + "/"):
            rest = entry.path[len(self.folder) + 1:]
            if rest != "HEAD.json" and rest.partition("/")[0] not in named:
                self.store.delete(entry.path)
        log.info("feed=%s membership_saved pairs=%d versions=%d", self.feed, pairs, len(kept))
        return version


def _part(bucket: int) -> str:
    return f"part-{bucket:05d}.parquet"
