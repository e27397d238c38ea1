"""One AAM delivery, in bounded memory: three passes over spill files, each a set of tasks.

1. per split file: ingest + resolve, chunk by chunk -> resolved rows by key bucket, rejects
   aside;
2. per key bucket: join with that bucket of the profile keys -> segment mentions by profile
   bucket;
3. per profile bucket: merge segments per profile, apply them to that bucket of the feed's
   membership (SPEC §11) -> destination writers (in bucket order) and the next membership
   version.
Tasks run on the run's executor (this process, or a Dask cluster: pipeline/executors); they
share nothing but the work area and return counts. The ledger, the counts, the quarantine,
the writers and the membership versions stay here. Nothing is published before every record
is counted and the reject and removal thresholds are checked; the membership version is
saved after the outputs (the ledger record follows).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from pipeline.config import FeedConfig, Location, with_secrets, without_secrets
from pipeline.context import Context, RunOptions
from pipeline.errors import ConfigError, DeliveryFailed
from pipeline.executors import Executor, Threads
from pipeline.formats import QUARANTINED_LINE_CHARS
from pipeline.ledger import LedgerEntry
from pipeline.membership import (
    FeedHead,
    FeedMembership,
    FeedVersion,
    mirror,
    write_members,
)
from pipeline.pgp import Decryptor
from pipeline.report import DeliveryReport
from pipeline.snapshot import ProfileIndex
from pipeline.spill import Spill, WorkArea, key_bucket, open_work_area, text_bucket
from pipeline.stages import join, publish, resolve
from pipeline.stages.ingest import (
    Delivery,
    DeliveryFile,
    entry_md5s,
    file_chunks,
    find_deliveries,
    read_ahead,
)
from pipeline.stores import Store, StoreOptions, open_store

log = logging.getLogger(__name__)
LINES_PER_BUCKET = 1_000_000  # resolved rows held in memory at once
PROFILES_PER_BUCKET = 1_000_000
# Membership pairs a profile bucket holds before the delivery (SPEC §11): a bucket sorts its
# old pairs with the delivery's, and a `full` delivery's leavers join its output rows.
PAIRS_PER_BUCKET = 1_000_000
MEMORY_ROWS = 3_000_000  # spilled rows (resolved, rejects, mentions) a one-bucket delivery
# keeps in memory instead of files
# Rows handled at once in passes 2 and 3. A bucket holds ~LINES_PER_BUCKET rows whatever the
# input size, but not whatever the key distribution: one key in every line puts them all in
# one bucket, which is then processed in batches. Above any normal bucket's size.
ROWS_PER_BATCH = 2 * LINES_PER_BUCKET
MENTIONS_PER_BATCH = 8_000_000
# Split files read at once by an in-process executor: the AES loop and the rest of a task
# hold the GIL for only part of its time, so two tasks keep two cores busy; each holds
# at most two chunks.
SPLIT_THREADS = min(2, os.cpu_count() or 1)
RESOLVED = ("key", "file_seq", "line_no", "added", "removed", "contact")
PROFILE = "pnum"  # passes 2 and 3 name a profile by its number in its profile bucket
AUDIENCE = {"profile_id": pl.String, "segment_id": pl.UInt32, "action": pl.String,
            "matched_on": pl.String}


@dataclass
class Resources:
    """What a task works with, opened where it runs."""

    feed: FeedConfig  # with its key
    work: WorkArea
    default_country: str | None
    buckets: int
    source: Store | None = None  # pass 1
    decryptor: Decryptor | None = None  # pass 1, PGP files: in this process only
    phones: pl.DataFrame | None = None  # pass 1: (number, region, e164) known from profiles
    profiles: ProfileIndex | None = None  # pass 2
    contacts: bool = False  # a no_profile_contacts destination wants unmatched addresses
    quarantine: bool = True  # keep rejected lines (not on a dry run)
    # pass 3 in this process: merged buckets handed to the writers as they are, by
    # (name, bucket), instead of through the work area (a 10M-line delivery spent ~1.5 s
    # writing and reading them back)
    handed: dict[tuple[str, int], pl.DataFrame] | None = None


@dataclass(frozen=True)
class Setup:
    """Resources as they travel to a Dask worker: locations and names, no key, no frame."""

    feed: FeedConfig  # without key and IV: the worker reads them from its environment
    work: Location
    default_country: str | None
    buckets: int
    source: bool = False
    phones: str | None = None  # name of the known phones in the work area
    keys: str | None = None  # name of the profile keys in the work area
    attrs: str | None = None  # name of the profile attributes in the work area
    contacts: bool = False
    quarantine: bool = True

    @contextmanager
    def open(self, env: Mapping[str, str]) -> Iterator[Resources]:
        with ExitStack() as stack:
            work = open_work_area(self.work.url, self.work.options)
            stack.callback(getattr(work, "close", lambda: None))
            feed = with_secrets(self.feed, env)
            res = Resources(feed, work, self.default_country, self.buckets,
                            contacts=self.contacts, quarantine=self.quarantine)
            if self.source:
                res.source = open_store(feed.source.url, feed.source.options)
                stack.callback(res.source.close)
            if self.phones:
                phones = work.scan(self.phones)
                res.phones = phones.collect() if phones is not None else None
            if self.keys:
                res.profiles = ProfileIndex(work, self.keys, self.attrs or "", self.buckets)
            yield res


@dataclass
class Plan:
    feed: FeedConfig
    delivery: Delivery
    buckets: int
    work: WorkArea
    executor: Executor
    local: Resources
    setup: Setup
    scratch: Path  # this process's own files: writers' spools, the quarantine file


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


def bucket_count(delivery: Delivery, profiles: int, pairs: int = 0) -> int:
    """Buckets from the delivery's size, the snapshot's and the membership's it applies to
    (`pairs`): deterministic for one input and one state before it."""
    if delivery.info and delivery.info.total_line_count is not None:
        lines = delivery.info.total_line_count
    else:
        lines = sum(f.size for f in delivery.files) // 20  # gzip'd lines are ~20 bytes+
    return max(1, math.ceil(lines / LINES_PER_BUCKET), math.ceil(profiles / PROFILES_PER_BUCKET),
               math.ceil(pairs / PAIRS_PER_BUCKET))


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
    # a re-run of the newest (after a crash) starts from its predecessor
    base = head.before(order)
    plan = _plan(ctx, feed, source, delivery, base.pairs if base else 0)
    tasks = ctx.executor.tasks
    plan.work.clear()
    plan.scratch.mkdir(parents=True, exist_ok=True)
    try:
        _process(ctx, plan, rep, membership, base, order)
    finally:
        rep.tasks += ctx.executor.tasks - tasks
        plan.work.clear()
        getattr(plan.work, "close", lambda: None)()
        shutil.rmtree(plan.scratch, ignore_errors=True)


def _plan(ctx: Context, feed: FeedConfig, source: Store, delivery: Delivery, pairs: int
          ) -> Plan:
    buckets = bucket_count(delivery, ctx.snapshots.size(delivery.date), pairs)
    contacts = any(d.kind == "no_profile_contacts" for d in ctx.config.destinations)
    # One bucket: spills stay in memory (up to a bound: the control file may understate),
    # where the tasks run in this process.
    work = ctx.executor.work_area(f"{feed.name}/{delivery.root}",
                                  memory_rows=MEMORY_ROWS if buckets == 1 else 0)
    quarantine = not ctx.options.dry_run
    local = Resources(feed, work, ctx.config.default_country, buckets, source,
                      contacts=contacts, quarantine=quarantine)
    setup = Setup(without_secrets(feed), Location(work.url, _work_options(ctx)),
                  ctx.config.default_country, buckets, contacts=contacts,
                  quarantine=quarantine)
    return Plan(feed, delivery, buckets, work, ctx.executor, local, setup,
                Path(ctx.workdir) / "delivery")


def _work_options(ctx: Context) -> StoreOptions:
    location = ctx.config.executor.work_location
    return location.options if location else StoreOptions()


def _process(ctx: Context, plan: Plan, rep: DeliveryReport, membership: FeedMembership,
             base: FeedVersion | None, order: tuple[int, str]) -> None:
    feed, delivery = plan.feed, plan.delivery
    # The snapshot's first normalization is mostly Python (phone parsing) and reading the
    # delivery mostly polars, which releases the GIL: overlapping them uses both cores.
    # A phone feed waits, as it reuses the snapshot's phone results.
    wanted = (delivery.date, feed.kinds, plan.buckets, feed.match_column)
    # While the index is built it holds a profile bucket in memory and fills a core: split
    # files are then read one at a time (a second one would add memory, not speed), and
    # side by side from the moment it is done.
    with ThreadPoolExecutor(1, thread_name_prefix="snapshot") as pool:
        index = pool.submit(ctx.snapshots.index, *wanted)
        phones = index.result().phones if "phone" in feed.kinds else None
        ingest(ctx, plan, plan.local.source, rep, phones, parallel=index.done)
        profiles = index.result()
    match(plan, profiles, rep)
    rep.check_reject_ratio(feed.max_reject_ratio)
    membership.load(base, plan.buckets, plan.work)
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
        membership.save(delivery.root, order[0], plan.buckets, mirrored.parts, ctx.run_id,
                        feed.membership_retention_days)
    rep.outputs += [f"{name}:{p}" for name, paths in written.items() for p in paths]
    rep.leavers = mirrored.leavers


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


def _add(rep: DeliveryReport, counts: Mapping[str, int]) -> None:
    for name, value in counts.items():
        setattr(rep, name, getattr(rep, name) + value)


# --- pass 1 ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitTask:
    seq: int  # file_seq: the file's place in the delivery, from 1
    file: DeliveryFile


def ingest(ctx: Context, plan: Plan, source: Store | None, rep: DeliveryReport,
           known_phones: pl.DataFrame | None = None,
           parallel: Callable[[], bool] = lambda: True) -> None:
    """Pass 1: parse and resolve every split file; spill resolved rows and rejects.
    `parallel()`: split files may now be read side by side (when the source allows it)."""
    decryptor = ctx.keys.feeds.get(plan.feed.name) if ctx.keys else None
    local = replace(plan.local, source=source, phones=known_phones, decryptor=decryptor)
    setup = replace(plan.setup, source=True)
    if known_phones is not None and plan.executor.remote:
        plan.work.write("phones", known_phones, part="0")
        setup = replace(setup, phones="phones")
    tasks = [SplitTask(seq, f) for seq, f in enumerate(plan.delivery.files, start=1)]
    # PGP files are decrypted where the secret key is: here (the same task, in process).
    # A source that reads one file at a time (SFTP), or one core, keeps the plain serial
    # path: no task thread at all.
    side_by_side = source is not None and source.parallel_reads and SPLIT_THREADS > 1
    threads: Threads = (lambda: SPLIT_THREADS if parallel() else 1) if side_by_side else 1
    results = (plan.executor.map(ingest_split, tasks, local, setup, threads=threads)
               if decryptor is None else (ingest_split(task, local) for task in tasks))
    for counts in results:
        _add(rep, counts)
    if rep.rejected and not ctx.options.dry_run:
        _quarantine(ctx, plan)


def ingest_split(task: SplitTask, res: Resources) -> dict[str, int]:
    """Pass 1 task: one split file, chunk by chunk. Parts are named by (file, chunk), so a
    rerun replaces them and every bucket lists its rows in line order."""
    assert res.source is not None
    counts = {"records_received": 0}
    chunks = read_ahead(file_chunks(res.source, task.file, task.seq, res.decryptor))
    for n, chunk in enumerate(chunks):
        parsed = resolve.parse(chunk.lazy())
        resolved = resolve.resolve(parsed, res.feed, res.default_country, res.phones).collect()
        counts["records_received"] += resolved.height
        for name, value in resolve.count_rejects(resolved).items():
            counts[name] = counts.get(name, 0) + value
        part = f"{task.seq:05d}-{n:06d}"
        ok = pl.col("reject").is_null()
        if res.quarantine:  # raw lines for quarantine only
            res.work.write("rejects", resolved.filter(~ok).select(
                "file_seq", "line_no", "reject", line=_quarantined_line()), part=part)
        # Decrypted addresses reach the disk only for a destination that publishes them.
        columns = RESOLVED if res.contacts else RESOLVED[:-1]
        rows = join.collapse_repeats(resolved.filter(ok).select(columns))
        res.work.write("resolved", rows.with_columns(
            _b=key_bucket(pl.col("key"), res.buckets)), bucket="_b", part=part)
    return counts


def _quarantined_line() -> pl.Expr:
    """The raw line; of an over-long line only its start (bounded quarantine rows)."""
    line = pl.col("line")
    return (pl.when(pl.col("reject") == "line_too_long")
            .then(line.str.slice(0, QUARANTINED_LINE_CHARS)).otherwise(line))


# --- pass 2 ---------------------------------------------------------------------------------


def match(plan: Plan, profiles: ProfileIndex, rep: DeliveryReport) -> None:
    """Pass 2: join each key bucket; spill segment mentions by profile (and contact) bucket."""
    local, setup = _with_profiles(plan, profiles)
    for counts in plan.executor.map(match_bucket, range(plan.buckets), local, setup):
        _add(rep, counts)
    plan.work.release("resolved")


def match_bucket(bucket: int, res: Resources) -> dict[str, int]:
    """Pass 2 task: one key bucket, in batches. Parts are named by (key bucket, batch)."""
    assert res.profiles is not None
    batches = res.work.batches("resolved", bucket, ROWS_PER_BATCH)
    keys = res.profiles.keys(bucket)
    if len(batches) > 1:  # a hot bucket: its profile keys are read once, not per batch
        keys = keys.collect().lazy()
    counts: dict[str, int] = {}
    for n, rows in enumerate(batches):
        joined = join.match(rows, keys).collect()
        for name, value in join.count_matches(joined, PROFILE).items():
            counts[name] = counts.get(name, 0) + value
        part, lazy = f"{bucket:06d}-{n:04d}", joined.lazy()
        # by the profile's bucket, which the index already knows: no hashing of IDs here
        res.work.write("mentions", join.segment_rows(lazy, PROFILE, carry=("pb",)).collect(),
                       bucket="pb", part=part)
        if res.contacts:
            res.work.write("contacts", join.contact_rows(lazy, PROFILE).with_columns(
                _b=text_bucket(pl.col("profile_id"), res.buckets)).collect(), bucket="_b",
                part=part)
    return counts


def _with_profiles(plan: Plan, profiles: ProfileIndex) -> tuple[Resources, Setup]:
    """Resources of passes 2 and 3: the profile index (shared once with remote workers)."""
    local = replace(plan.local, profiles=profiles)
    setup = plan.setup
    if plan.executor.remote:
        if setup.keys != profiles.keys_name:
            _share_index(profiles, plan.work)
        setup = replace(setup, keys=profiles.keys_name, attrs=profiles.attrs_name)
        plan.setup = setup
    return local, setup


def _share_index(profiles: ProfileIndex, work: WorkArea) -> None:
    """Profile keys and attributes of every bucket into the work area, where workers can
    read them."""
    spill = profiles.spill
    assert isinstance(spill, Spill)  # the client's index is on its own disk
    for name in (profiles.keys_name, profiles.attrs_name):
        for bucket in range(profiles.buckets):
            for part in spill.parts(name, bucket):
                work.copy_in(part, name, bucket, part.stem)


# --- pass 3 ---------------------------------------------------------------------------------


MENTIONS = {"audience": "mentions", "contacts": "contacts"}  # pass 2 spills
MERGED = {"audience": "merged", "contacts": "merged_contacts"}  # pass 3 results


AudienceWriter = publish.CampaignListWriter | publish.InboundWriter


@dataclass(frozen=True)
class MergeTask:
    bucket: int
    full: bool  # a `full` delivery: the bucket's membership becomes its content
    audience: bool  # hand the merged audience back (some destination writes it)
    contacts: bool  # merge no-profile contacts


def build(ctx: Context, plan: Plan, profiles: ProfileIndex, key: publish.DeliveryKey
          ) -> tuple[dict[str, publish.Output], Mirroring]:
    """Pass 3: merge per profile bucket, mirror the membership, feed every writer."""
    workdir = plan.scratch / "out"
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
    """Merged buckets reach the writers in bucket order, whatever order the tasks ran in:
    outputs are the same bytes on any executor."""
    mirrored = Mirroring({})
    tasks = [MergeTask(b, plan.delivery.full, bool(audience_writers), bool(contact_writers))
             for b in range(plan.buckets)]
    local, setup = _with_profiles(plan, profiles)
    if not plan.executor.remote:
        local = replace(local, handed={})
    # Each writer on a thread of its own (polars releases the GIL): the writers of one
    # bucket run side by side. They finish before the next bucket is merged: overlapping
    # the two held two buckets at once (a 10M-line delivery peaked at ~1.44 GiB).
    with ThreadPoolExecutor(len(audience_writers) + len(contact_writers) or 1,
                            thread_name_prefix="writer") as pool:
        for task, merged in zip(tasks, plan.executor.map(merge_bucket, tasks, local, setup),
                                strict=True):
            if merged.get("members"):
                mirrored.parts[task.bucket] = plan.work.get_file(_members_file(task.bucket))
            mirrored.leavers += merged.get("leavers", 0)
            mirrored.removed += merged.get("removed", 0)
            _write_bucket(pool, plan.work, local.handed, task.bucket, merged, profiles,
                          audience_writers, contact_writers)
    return mirrored


def _write_bucket(pool: ThreadPoolExecutor, work: WorkArea,
                  handed: dict[tuple[str, int], pl.DataFrame] | None, bucket: int,
                  merged: Mapping[str, int], profiles: ProfileIndex,
                  audience_writers: dict[str, AudienceWriter],
                  contact_writers: dict[str, publish.ContactsWriter]) -> None:
    """One merged bucket through every writer, side by side; returns when all are done
    (the bucket's frames are then let go)."""
    pending: list[Future] = []
    if merged.get("audience"):
        audience = _read(work, handed, MERGED["audience"], bucket)
        attrs = profiles.attributes(bucket)
        pending += [pool.submit(w.add, audience, attrs) for w in audience_writers.values()]
    if merged.get("contacts"):
        contacts = _read(work, handed, MERGED["contacts"], bucket)
        pending += [pool.submit(w.add, contacts) for w in contact_writers.values()]
    _wait_all(pending)


def _wait_all(futures: list[Future]) -> None:
    """Wait for every one (none is left running), then raise the first failure."""
    wait(futures)
    for future in futures:
        future.result()


def merge_bucket(task: MergeTask, res: Resources) -> dict[str, int]:
    """Pass 3 task: one profile bucket. Its merged audience (with leavers), contacts and
    next membership go to the work area under names of this bucket."""
    rows: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="members-") as tmp:
        part = Path(tmp) / "part.parquet"
        assert res.profiles is not None
        attrs = publish.gathered_from(res.profiles.attributes(task.bucket).select("profile_id"))
        audience, rows["leavers"], rows["removed"] = mirror_bucket(res.work, task.bucket,
                                                                   task.full, part, attrs)
        if part.exists():
            res.work.put_file(part, _members_file(task.bucket))
            rows["members"] = 1
    if task.audience and audience is not None and audience.height:
        _hand_over(res, MERGED["audience"], task.bucket, audience)
        rows["audience"] = audience.height
    contacts = _mentions(res.work, MENTIONS["contacts"], task.bucket) if task.contacts else None
    if contacts is not None:
        merged = join.merge_contacts(contacts).collect()
        _hand_over(res, MERGED["contacts"], task.bucket, merged)
        rows["contacts"] = merged.height
    return rows


def _hand_over(res: Resources, name: str, bucket: int, frame: pl.DataFrame) -> None:
    if res.handed is not None:
        res.handed[(name, bucket)] = frame
        return
    res.work.write(name, frame.with_columns(_b=pl.lit(bucket, pl.UInt32)), bucket="_b",
                   part="0")


def _members_file(bucket: int) -> str:
    return f"next_members/{bucket}.parquet"


def mirror_bucket(work: WorkArea, bucket: int, full: bool, part: Path, attrs: pl.DataFrame
                  ) -> tuple[pl.DataFrame | None, int, int]:
    """One profile bucket: the merged audience plus its leavers, and the bucket's membership
    after the delivery written to `part` (when not empty). Returns (audience rows or None
    when the bucket holds nothing, leavers, pairs removed from the membership). Audience
    rows carry the profile's number (`pnum`: row of `attrs`, the bucket's attributes) and
    its profile_id; a leaver no longer in the snapshot has no number."""
    mentions = _mentions(work, "mentions", bucket, PROFILE)
    members = work.scan("members", bucket)
    if mentions is None and members is None:
        return None, 0, 0
    # in (profile_id, segment_id) order: sorted on integers, before any text column exists
    audience = (join.merge_segments(mentions, PROFILE, publish.profile_order()).collect()
                if mentions is not None
                else pl.DataFrame(schema={PROFILE: pl.UInt32, **AUDIENCE}).drop("profile_id"))
    ids = attrs.get_column("profile_id")
    audience = audience.with_columns(profile_id=ids.gather(audience.get_column(PROFILE)))
    if members is None:  # nothing to mirror against: the pairs added (no mirror sort)
        added = audience.filter(pl.col("action") == "add").select("profile_id", "segment_id")
        if added.height:
            write_members(added, part)
        return audience, 0, 0
    result = mirror(audience, members.collect(), full)
    if result.members.height:
        write_members(result.members, part, ordered=True)
    if result.leavers.height:  # only `full` has leavers: `iter` rows stay as they were
        numbers = ids.to_frame().with_row_index(PROFILE).with_columns(
            pl.col(PROFILE).cast(pl.UInt32))
        leavers = result.leavers.join(numbers, on="profile_id", how="left")
        audience = pl.concat([audience, leavers.select(audience.columns)])
    return audience, result.leavers.height, result.removed


def _check_removals(feed: FeedConfig, base: FeedVersion | None, mirrored: Mirroring) -> None:
    """Safety valve: a `full` delivery may not empty the membership by accident."""
    before = base.pairs if base is not None else 0
    ratio = mirrored.removed / before if before else 0.0
    if ratio > feed.max_removal_ratio:
        raise DeliveryFailed(f"full delivery would remove {mirrored.removed} of {before} "
                             f"membership pairs ({ratio:.4f}), more than max_removal_ratio "
                             f"{feed.max_removal_ratio}; nothing published")


def _mentions(work: WorkArea, name: str, bucket: int, profile: str = "profile_id"
              ) -> pl.LazyFrame | None:
    """One bucket's segment mentions; a bucket too big to merge at once (one profile in
    millions of lines) is first reduced batch by batch."""
    batches = work.batches(name, bucket, MENTIONS_PER_BATCH)
    if len(batches) <= 1:
        return batches[0] if batches else None
    return pl.concat([join.reduce_mentions(rows, profile).collect() for rows in batches]
                     ).lazy()


def _read(work: WorkArea, handed: dict[tuple[str, int], pl.DataFrame] | None, name: str,
          bucket: int) -> pl.DataFrame:
    if handed is not None:
        return handed.pop((name, bucket))
    frame = work.scan(name, bucket)
    assert frame is not None  # its task reported rows
    return frame.collect()


def _quarantine(ctx: Context, plan: Plan) -> None:
    """Rejected lines with file, line number and reason (raw lines stay in the state store)."""
    names = pl.LazyFrame({
        "file_seq": pl.Series(range(1, len(plan.delivery.files) + 1), dtype=pl.UInt32),
        "file": [f.name.path for f in plan.delivery.files],
    })
    rejects = plan.work.scan("rejects")
    if rejects is None:
        return
    local = plan.scratch / "quarantine.csv"
    (rejects.join(names, on="file_seq", how="left", maintain_order="left")
     .select("file", "line_no", reason="reject", line="line")
     .sink_csv(local))
    ctx.state.put_file(str(local), f"quarantine/{plan.feed.name}/{plan.delivery.root}.csv")
