"""Membership state: the last published members of each (destination, audience), as Parquet.

Layout under the state store, one folder per (destination, audience):
    membership/<destination>/<audience-key>/HEAD.json         which version is current
    membership/<destination>/<audience-key>/<version>.parquet  one column `dpuuid`

A version is named after the export file that produced it. HEAD keeps the current and the
previous version, so an export re-run after a crash (published, state partly saved, ledger
not written) diffs against the state *before* that export and republishes the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass

import polars as pl

from pipeline.errors import FatalError
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
