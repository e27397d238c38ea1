"""One AAM delivery, in bounded memory: three passes over local spill files.

1. ingest + resolve, chunk by chunk -> resolved rows by key bucket, rejects aside;
2. per key bucket: join with that bucket of the profile keys -> segment mentions by profile
   bucket;
3. per profile bucket: merge segments per profile, apply them to that bucket of the feed's
   membership (SPEC §11) -> destination writers and the next membership version.
Nothing is published before every record is counted and the reject and removal thresholds
are checked; the membership version is saved after the outputs (the ledger record follows).
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.config import FeedConfig
from pipeline.context import Context, RunOptions
from pipeline.errors import ConfigError, DeliveryFailed
from pipeline.formats import QUARANTINED_LINE_CHARS
from pipeline.ledger import LedgerEntry
from pipeline.membership import (
    FeedHead,
    FeedMembership,
    FeedVersion,
    empty_members,
    mirror,
    write_members,
)
from pipeline.report import DeliveryReport
from pipeline.snapshot import ProfileIndex
from pipeline.spill import Spill, key_bucket, text_bucket
from pipeline.stages import join, publish, resolve
from pipeline.stages.ingest import (
    Delivery,
    entry_md5s,
    find_deliveries,
    read_ahead,
    read_chunks,
)
from pipeline.stores import Store

log = logging.getLogger(__name__)
LINES_PER_BUCKET = 1_000_000  # resolved rows held in memory at once
PROFILES_PER_BUCKET = 1_000_000
MEMORY_ROWS = 3_000_000  # spilled rows (resolved, rejects, mentions) a one-bucket delivery
# keeps in memory instead of files
# Rows handled at once in passes 2 and 3. A bucket holds ~LINES_PER_BUCKET rows whatever the
# input size, but not whatever the key distribution: one key in every line puts them all in
# one bucket, which is then processed in batches. Above any normal bucket's size.
ROWS_PER_BATCH = 2 * LINES_PER_BUCKET
MENTIONS_PER_BATCH = 8_000_000
RESOLVED = ("key", "file_seq", "line_no", "added", "removed", "contact")
AUDIENCE = {"profile_id": pl.String, "segment_id": pl.UInt32, "action": pl.String,
            "matched_on": pl.String}


@dataclass
class Plan:
    feed: FeedConfig
    delivery: Delivery
    buckets: int
    spill: Spill
    contacts: bool = False  # a no_profile_contacts destination wants unmatched addresses


@dataclass
class Mirroring:
    """What pass 3 did to the feed's membership: new parts by bucket, and the counts."""

    parts: dict[int, Path]
    leavers: int = 0
    removed: int = 0


class AamFlow:
    """The AAM deliveries of one feed, for the run loop (run.py)."""

    def __init__(self, ctx: Context, feed: FeedConfig, source: Store) -> None:
        self.ctx, self.feed, self.source = ctx, feed, source

    def units(self) -> list[Delivery]:
        found = find_deliveries(self.source, self.feed.name, self.feed.require_info)
        options = self.ctx.options
        newest = (FeedMembership(self.ctx.state, self.feed.name).head().newest
                  if options.command == "backfill" else None)
        return [d for d in found if options.wants(d.date) or replayed(d, options, newest)]

    @staticmethod
    def blocked(delivery: Delivery) -> tuple[str, str] | None:
        """AAM may write the .info before the data: missing files wait for a later run."""
        if delivery.broken:
            return "failed", delivery.broken
        if delivery.problem:
            return "incomplete", delivery.problem
        return None

    def again(self, delivery: Delivery) -> bool:
        return self.ctx.options.reprocess

    @staticmethod
    def changed(delivery: Delivery, previous: LedgerEntry) -> str | None:
        if previous.files != entry_md5s(delivery):
            return "files changed since processed; rerun with --force to reprocess"
        return None

    @staticmethod
    def files(delivery: Delivery) -> dict[str, str]:
        return entry_md5s(delivery)

    def process(self, delivery: Delivery, rep: DeliveryReport) -> None:
        process_delivery(self.ctx, self.feed, self.source, delivery, rep)


def bucket_count(delivery: Delivery, profiles: int) -> int:
    """Buckets from the delivery's size and the snapshot's: deterministic for one input."""
    if delivery.info and delivery.info.total_line_count is not None:
        lines = delivery.info.total_line_count
    else:
        lines = sum(f.size for f in delivery.files) // 20  # gzip'd lines are ~20 bytes+
    return max(1, math.ceil(lines / LINES_PER_BUCKET), math.ceil(profiles / PROFILES_PER_BUCKET))


def process_delivery(ctx: Context, feed: FeedConfig, source: Store, delivery: Delivery,
                     rep: DeliveryReport) -> None:
    """Count, quarantine and publish one complete delivery (raises DeliveryFailed)."""
    membership = FeedMembership(ctx.state, feed.name)
    head = membership.head()
    order = delivery_order(delivery)
    late = late_reason(head, order, ctx.options.reprocess)
    if late:
        rep.status, rep.reason = "skipped", late
        log.warning("feed=%s delivery=%s status=skipped reason=%s", feed.name, delivery.root,
                    late)
        return
    base = head.before(order)  # a re-run of the newest (after a crash): its predecessor
    buckets = bucket_count(delivery, ctx.snapshots.size(delivery.date))
    # One bucket: spills stay in memory (up to a bound: the control file may understate).
    spill = Spill(Path(ctx.workdir) / "delivery",
                  memory_rows=MEMORY_ROWS if buckets == 1 else 0)
    spill.clear()
    contacts = any(d.kind == "no_profile_contacts" for d in ctx.config.destinations)
    plan = Plan(feed, delivery, buckets, spill, contacts)
    # The snapshot's first normalization is mostly Python (phone parsing) and reading the
    # delivery mostly polars, which releases the GIL: overlapping them uses both cores.
    # A phone feed waits, as it reuses the snapshot's phone results.
    with ThreadPoolExecutor(1, thread_name_prefix="snapshot") as pool:
        index = pool.submit(ctx.snapshots.index, delivery.date, feed.kinds, buckets,
                            feed.match_column)
        ingest(ctx, plan, source, rep,
               index.result().phones if "phone" in feed.kinds else None)
        profiles = index.result()
    match(plan, profiles, rep)
    rep.check_reject_ratio(feed.max_reject_ratio)
    membership.load(base, buckets, spill)
    key = publish.DeliveryKey(feed.name, delivery.root,
                              publish.timestamp_seconds(delivery.timestamp_ms, rep.date))
    outputs, mirrored = build(ctx, plan, profiles, key)
    if delivery.full:
        _check_removals(feed, base, mirrored)
    dests = [d for d in ctx.config.destinations if d.name in outputs]
    for dest in dests:
        out = outputs[dest.name]
        rep.rows_written[dest.name] = out.rows
        if out.unmapped_segments:
            rep.unmapped_segments[dest.name] = out.unmapped_segments
        if out.missing_id:
            rep.missing_ids[dest.name] = out.missing_id
    if ctx.options.dry_run:
        sealed = ctx.keys.destinations if ctx.keys else {}
        written = {d.name: [p + (".pgp" if d.name in sealed else "")
                            for p, _ in outputs[d.name].files] for d in dests}
    else:
        written = publish.publish_outputs(ctx.targets, dests, key, outputs, ctx.keys)
        membership.save(delivery.root, order[0], buckets, mirrored.parts, ctx.run_id,
                        feed.membership_retention_days)
    rep.outputs += [f"{name}:{p}" for name, paths in written.items() for p in paths]
    rep.leavers = mirrored.leavers
    spill.clear()


def delivery_order(delivery: Delivery) -> tuple[int, str]:
    """(timestamp in ms, root): the order a feed's deliveries are applied in."""
    ms = delivery.timestamp_ms
    if ms is None:  # midnight of its date; undated deliveries fail before they are applied
        day = delivery.date.isoformat() if delivery.date else None
        ms = (publish.timestamp_seconds(None, day) or 0) * 1000
    return (ms, delivery.root)


def late_reason(head: FeedHead, order: tuple[int, str], replay: bool) -> str | None:
    """Why a delivery is skipped: older than the newest applied one, applied on top of newer
    state it would undo newer changes. Replays (backfill, --force) apply each delivery to the
    membership before it instead."""
    newest = head.newest
    if newest is not None and order < newest.order and not replay:
        return f"older than the newest applied delivery {newest.delivery}; replay it with backfill"
    return None


def replayed(delivery: Delivery, options: RunOptions, newest: FeedVersion | None) -> bool:
    """A backfill from D also replays every later delivery through the newest applied one,
    whatever --to says, so the membership stays consistent (SPEC §11)."""
    return (options.command == "backfill" and options.date_from is not None
            and newest is not None and delivery.date is not None
            and delivery.date >= options.date_from and delivery_order(delivery) <= newest.order)


def check_backfill(ctx: Context) -> None:
    """Refuse, before anything runs, a backfill whose starting membership retention deleted."""
    start = ctx.options.date_from
    if ctx.options.command != "backfill" or start is None:
        return
    start_ms = int(datetime(start.year, start.month, start.day, tzinfo=UTC).timestamp()) * 1000
    for feed in ctx.config.feeds:
        if feed.kind != "aam_segments":
            continue
        head = FeedMembership(ctx.state, feed.name).head()
        if not head.has_state_before(start_ms):
            oldest = datetime.fromtimestamp(head.versions[0].timestamp_ms / 1000, UTC).date()
            raise ConfigError(
                f"backfill --from {start}: feed {feed.name} needs its membership before that "
                f"day, but versions before {oldest} were deleted (membership_retention_days = "
                f"{feed.membership_retention_days}); backfill from a later date")


def ingest(ctx: Context, plan: Plan, source: Store, rep: DeliveryReport,
           known_phones: pl.DataFrame | None = None) -> None:
    """Pass 1: parse and resolve chunk by chunk; spill resolved rows and rejects."""
    decryptor = ctx.keys.feeds.get(plan.feed.name) if ctx.keys else None
    for chunk in read_ahead(read_chunks(source, plan.delivery, decryptor=decryptor)):
        parsed = resolve.parse(chunk.lazy())
        resolved = resolve.resolve(parsed, plan.feed, ctx.config.default_country,
                                   known_phones).collect()
        rep.records_received += resolved.height
        for name, value in resolve.count_rejects(resolved).items():
            setattr(rep, name, getattr(rep, name) + value)
        ok = pl.col("reject").is_null()
        if not ctx.options.dry_run:  # raw lines for quarantine only
            plan.spill.write("rejects", resolved.filter(~ok).select(
                "file_seq", "line_no", "reject", line=_quarantined_line()))
        # Decrypted addresses reach the disk only for a destination that publishes them.
        columns = RESOLVED if plan.contacts else RESOLVED[:-1]
        rows = join.collapse_repeats(resolved.filter(ok).select(columns))
        plan.spill.write("resolved", rows.with_columns(
            _b=key_bucket(pl.col("key"), plan.buckets)), bucket="_b")
    if rep.rejected and not ctx.options.dry_run:
        _quarantine(ctx, plan)


AudienceWriter = publish.CampaignListWriter | publish.InboundWriter


def _quarantined_line() -> pl.Expr:
    """The raw line; of an over-long line only its start (bounded quarantine rows)."""
    line = pl.col("line")
    return (pl.when(pl.col("reject") == "line_too_long")
            .then(line.str.slice(0, QUARANTINED_LINE_CHARS)).otherwise(line))


def match(plan: Plan, profiles: ProfileIndex, rep: DeliveryReport) -> None:
    """Pass 2: join each key bucket; spill segment mentions by profile (and contact) bucket."""
    for b in range(plan.buckets):
        batches = plan.spill.batches("resolved", b, ROWS_PER_BATCH)
        keys = profiles.keys(b)
        if len(batches) > 1:  # a hot bucket: its profile keys are read once, not per batch
            keys = keys.collect().lazy()
        for rows in batches:
            _match_batch(plan, join.match(rows, keys).collect(), rep)
    plan.spill.release("resolved")


def _match_batch(plan: Plan, joined: pl.DataFrame, rep: DeliveryReport) -> None:
    for name, value in join.count_matches(joined).items():
        setattr(rep, name, getattr(rep, name) + value)
    lazy = joined.lazy()
    plan.spill.write("mentions", join.segment_rows(lazy).with_columns(
        _b=text_bucket(pl.col("profile_id"), plan.buckets)).collect(), bucket="_b")
    if plan.contacts:
        plan.spill.write("contacts", join.contact_rows(lazy).with_columns(
            _b=text_bucket(pl.col("profile_id"), plan.buckets)).collect(), bucket="_b")


def build(ctx: Context, plan: Plan, profiles: ProfileIndex, key: publish.DeliveryKey
          ) -> tuple[dict[str, publish.Output], Mirroring]:
    """Pass 3: merge per profile bucket, mirror the membership, feed every writer."""
    workdir = plan.spill.folder / "out"
    workdir.mkdir(parents=True, exist_ok=True)
    audience_writers: dict[str, AudienceWriter] = {}
    contact_writers: dict[str, publish.ContactsWriter] = {}
    for dest in ctx.config.destinations:
        if dest.kind == "campaign_list":
            audience_writers[dest.name] = publish.CampaignListWriter(dest, key, workdir)
        elif dest.kind == "aam_inbound" and dest.traits:  # audiences-only: export feeds
            audience_writers[dest.name] = publish.InboundWriter(dest, key, workdir)
        elif dest.kind == "no_profile_contacts":
            contact_writers[dest.name] = publish.ContactsWriter(dest, key, workdir)
    writers: dict[str, AudienceWriter | publish.ContactsWriter] = {
        **audience_writers, **contact_writers}
    try:
        mirrored = _fill(plan, profiles, audience_writers, contact_writers)
    except BaseException:
        for writer in writers.values():
            writer.close()  # no thread or open file outlives a failed delivery
        raise
    return {name: w.finish() for name, w in writers.items()}, mirrored


def _fill(plan: Plan, profiles: ProfileIndex, audience_writers: dict[str, AudienceWriter],
          contact_writers: dict[str, publish.ContactsWriter]) -> Mirroring:
    mirrored = Mirroring({})
    for b in range(plan.buckets):
        part = plan.spill.folder / "membership" / f"{b}.parquet"
        audience, leavers, removed = mirror_bucket(plan.spill, b, plan.delivery.full, part)
        if part.exists():
            mirrored.parts[b] = part
        mirrored.leavers += leavers
        mirrored.removed += removed
        if audience is not None and audience.height and audience_writers:
            attrs = profiles.attributes(b)
            for writer in audience_writers.values():
                writer.add(audience, attrs)
        contacts = _mentions(plan.spill, "contacts", b)
        if contacts is not None and contact_writers:
            merged = join.merge_contacts(contacts).collect()
            for contact_writer in contact_writers.values():
                contact_writer.add(merged)
    return mirrored


def _mentions(spill: Spill, name: str, bucket: int) -> pl.LazyFrame | None:
    """One bucket's segment mentions; a bucket too big to merge at once (one profile in
    millions of lines) is first reduced batch by batch."""
    batches = spill.batches(name, bucket, MENTIONS_PER_BATCH)
    if len(batches) <= 1:
        return batches[0] if batches else None
    return pl.concat([join.reduce_mentions(rows).collect() for rows in batches]).lazy()


def mirror_bucket(spill: Spill, bucket: int, full: bool, part: Path
                  ) -> tuple[pl.DataFrame | None, int, int]:
    """One profile bucket: the merged audience plus its leavers, and the bucket's membership
    after the delivery written to `part` (when not empty). Returns (audience rows or None
    when the bucket holds nothing, leavers, pairs removed from the membership)."""
    mentions = _mentions(spill, "mentions", bucket)
    members = spill.scan("members", bucket)
    if mentions is None and members is None:
        return None, 0, 0
    audience = (join.merge_segments(mentions).collect() if mentions is not None
                else pl.DataFrame(schema=AUDIENCE))
    result = mirror(audience, members.collect() if members is not None else empty_members(),
                    full)
    if result.members.height:
        write_members(result.members, part)
    if result.leavers.height:  # only `full` has leavers: `iter` rows stay as they were
        audience = pl.concat([audience, result.leavers])
    return audience, result.leavers.height, result.removed


def _check_removals(feed: FeedConfig, base: FeedVersion | None, mirrored: Mirroring) -> None:
    """Safety valve: a `full` delivery may not empty the membership by accident."""
    before = base.pairs if base is not None else 0
    ratio = mirrored.removed / before if before else 0.0
    if ratio > feed.max_removal_ratio:
        raise DeliveryFailed(f"full delivery would remove {mirrored.removed} of {before} "
                             f"membership pairs ({ratio:.4f}), more than max_removal_ratio "
                             f"{feed.max_removal_ratio}; nothing published")


def _quarantine(ctx: Context, plan: Plan) -> None:
    """Rejected lines with file, line number and reason (raw lines stay in the state store)."""
    names = pl.LazyFrame({
        "file_seq": pl.Series(range(1, len(plan.delivery.files) + 1), dtype=pl.UInt32),
        "file": [f.name.path for f in plan.delivery.files],
    })
    rejects = plan.spill.scan("rejects")
    if rejects is None:
        return
    local = plan.spill.folder / "quarantine.csv"
    (rejects.join(names, on="file_seq", how="left", maintain_order="left")
     .select("file", "line_no", reason="reject", line="line")
     .sink_csv(local))
    ctx.state.put_file(str(local), f"quarantine/{plan.feed.name}/{plan.delivery.root}.csv")
