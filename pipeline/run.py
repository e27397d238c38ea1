"""Run: wire stores, stages, ledger and report together for `run` and `backfill`."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from pipeline.config import Config, FeedConfig
from pipeline.delivery import process_delivery
from pipeline.errors import (
    DeliveryFailed,
    FatalError,
    IncompleteDelivery,
    PipelineError,
    TransientError,
)
from pipeline.ledger import Ledger, LedgerEntry
from pipeline.lock import StateLock
from pipeline.report import DeliveryReport, RunReport
from pipeline.snapshot import Snapshots, make_workdir
from pipeline.stages import export
from pipeline.stages.ingest import Delivery, entry_md5s, find_deliveries
from pipeline.stages.join import KEY_KINDS
from pipeline.stores import Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    command: str = "run"
    day: date | None = None  # only deliveries of this date
    date_from: date | None = None  # backfill range (inclusive)
    date_to: date | None = None
    force: bool = False
    full: bool = False
    dry_run: bool = False
    retry_delays: tuple[float, ...] = (2.0, 10.0)  # waits before 2nd and 3rd attempts

    def wants(self, day: date | None) -> bool:
        """Whether a delivery of this date is selected by --date / --from / --to."""
        if self.day and day != self.day:
            return False
        if self.date_from and (day is None or day < self.date_from):
            return False
        return not (self.date_to and (day is None or day > self.date_to))


@dataclass
class Context:
    config: Config
    options: RunOptions
    run_id: str
    state: Store
    ledger: Ledger
    snapshots: Snapshots
    targets: dict[str, Store]
    workdir: Path


def execute(config: Config, options: RunOptions, now: datetime | None = None,
            on_delivery: Callable[[DeliveryReport], None] | None = None) -> RunReport:
    """Process every selected delivery of every feed; never raises for a single delivery."""
    now = now or datetime.now(UTC)
    run_id = now.strftime("%Y%m%dT%H%M%S%fZ")
    report = RunReport(run_id=run_id, command=options.command, dry_run=options.dry_run)
    workdir = make_workdir()
    stores: list[Store] = []
    lock = None
    try:
        state = _keep(stores, open_store(config.state.url, config.state.options))
        if not options.dry_run:
            lock = StateLock(state, run_id, now)
            lock.acquire()
        kinds = tuple(k for k in KEY_KINDS if any(k in f.kinds for f in config.feeds))
        snapshots = Snapshots(config.snapshot, config.default_country, workdir, kinds)
        stores.append(snapshots)  # type: ignore[arg-type]  # has close()
        targets = {d.name: _keep(stores, open_store(d.target.url, d.target.options))
                   for d in config.destinations}
        ctx = Context(config, options, run_id, state, Ledger(state), snapshots, targets,
                      Path(workdir))
        for feed in config.feeds:
            source = _keep(stores, open_store(feed.source.url, feed.source.options))
            if feed.kind == "campaign_export":
                results = export.process_export(ctx, feed, source)
            else:
                results = (process(ctx, feed, source, d) for d in _selected(
                    find_deliveries(source, feed.name, feed.require_info), options))
            for result in results:
                report.deliveries.append(result)
                if on_delivery:
                    on_delivery(result)
        if not options.dry_run:
            ctx.ledger.save_run(run_id, report.to_dict())
    finally:
        if lock is not None:
            lock.release()
        for store in stores:
            _close(store)
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _selected(deliveries: list[Delivery], options: RunOptions) -> list[Delivery]:
    return [d for d in deliveries if options.wants(d.date)]


def process(ctx: Context, feed: FeedConfig, source: Store, delivery: Delivery) -> DeliveryReport:
    rep = DeliveryReport(feed=feed.name, delivery=delivery.root,
                         date=delivery.date.isoformat() if delivery.date else None)
    previous = ctx.ledger.get(feed.name, delivery.root)
    if not delivery.complete:
        rep.status = "failed" if delivery.broken else "incomplete"
        rep.reason = delivery.broken or delivery.problem
        if not ctx.options.dry_run and (previous is None or previous.status != "processed"):
            _record(ctx, rep, delivery)
        return rep
    if previous and previous.status == "processed" and not _reprocess(ctx):
        rep.status = "skipped"
        if previous.files != entry_md5s(delivery):
            rep.reason = "files changed since processed; rerun with --force to reprocess"
            log.warning("feed=%s delivery=%s changed_after_processing", feed.name, delivery.root)
        return rep
    try:
        _with_retries(lambda: _attempt(ctx, feed, source, delivery, rep),
                      ctx.options.retry_delays, delivery.root)
    except (IncompleteDelivery, DeliveryFailed, TransientError) as exc:
        rep.status = "incomplete" if isinstance(exc, IncompleteDelivery) else "failed"
        rep.reason = str(exc)
        if not rep.balanced():  # stopped while counting: its records were not all read
            rep.reset_counts()
        log.error("feed=%s delivery=%s status=%s reason=%s", feed.name, delivery.root,
                  rep.status, exc)
    if not ctx.options.dry_run:
        _record(ctx, rep, delivery)
    return rep


def _with_retries(step: Callable[[], None], delays: tuple[float, ...], what: str) -> None:
    """Retry a delivery on retriable store errors; it is idempotent (deterministic names)."""
    for attempt, delay in enumerate((*delays, None), start=1):
        try:
            step()
            return
        except IncompleteDelivery:
            raise  # waiting for more data is the next run's job, not a retry's
        except TransientError as exc:
            if delay is None:
                raise
            log.warning("delivery=%s attempt=%d retriable_error=%s retry_in=%.1fs",
                        what, attempt, exc, delay)
            time.sleep(delay)


def _attempt(ctx: Context, feed: FeedConfig, source: Store, delivery: Delivery,
             rep: DeliveryReport) -> None:
    rep.reset_counts()  # a retry starts from scratch
    process_delivery(ctx, feed, source, delivery, rep)
    rep.status = "dry_run" if ctx.options.dry_run else "processed"
    log.info("feed=%s delivery=%s status=%s received=%d matched=%d rejected=%d",
             feed.name, delivery.root, rep.status, rep.records_received, rep.matched,
             rep.rejected)


def _reprocess(ctx: Context) -> bool:
    return ctx.options.force or ctx.options.command == "backfill"


def _record(ctx: Context, rep: DeliveryReport, delivery: Delivery) -> None:
    ctx.ledger.put(LedgerEntry(
        feed=rep.feed, delivery=rep.delivery, status=rep.status,
        files=entry_md5s(delivery), counts=rep.counts(), outputs=rep.outputs,
        run_id=ctx.run_id, reason=rep.reason, date=rep.date,
    ))


def _keep(stores: list, store: Store) -> Store:
    stores.append(store)
    return store


def _close(store) -> None:
    try:
        store.close()
    except (PipelineError, OSError):
        log.debug("close failed", exc_info=True)


__all__ = ["RunOptions", "execute", "FatalError"]
