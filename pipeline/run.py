"""Run: one loop over every feed's deliveries for `run` and `backfill`.

Each flow (flows/aam.py, flows/export.py) lists its units and processes one; this module
owns what they share: the lock, selection, skip rules, retries, the ledger and the report.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import Config, FeedConfig
from pipeline.context import Context, RunOptions
from pipeline.errors import (
    DeliveryFailed,
    FatalError,
    IncompleteDelivery,
    PipelineError,
    Terminated,
    TransientError,
)
from pipeline.executors import open_executor
from pipeline.flows.aam import AamFlow, check_backfill
from pipeline.flows.export import ExportFlow
from pipeline.ledger import Ledger, LedgerEntry
from pipeline.lock import StateLock
from pipeline.pgp import RunKeys
from pipeline.report import DeliveryReport, RunReport
from pipeline.snapshot import Snapshots
from pipeline.stages.join import KEY_KINDS
from pipeline.stores import Store, open_store
from pipeline.workdir import run_folder

log = logging.getLogger(__name__)
DONE = ("processed", "skipped")  # ledger statuses a plain `run` does not redo


class Flow(Protocol):
    """What the run loop needs of a flow; a unit is one delivery (or one export file)."""

    feed: FeedConfig

    def units(self) -> list[Any]: ...
    def blocked(self, unit: Any) -> tuple[str, str] | None: ...  # (status, reason)
    def again(self, unit: Any) -> bool: ...  # reprocess although done
    def changed(self, unit: Any, previous: LedgerEntry) -> str | None: ...
    def files(self, unit: Any) -> dict[str, str]: ...  # identity for the ledger
    def process(self, unit: Any, rep: DeliveryReport) -> None: ...


def flow_for(ctx: Context, feed: FeedConfig, source: Store) -> Flow:
    if feed.kind == "campaign_export":
        return ExportFlow(ctx, feed, source)
    return AamFlow(ctx, feed, source)


def execute(config: Config, options: RunOptions, now: datetime | None = None,
            on_delivery: Callable[[DeliveryReport], None] | None = None) -> RunReport:
    """Process every selected delivery of every feed; never raises for a single delivery.

    A run that dies (fatal error, SIGTERM, interrupt) raises, after saving its report with
    `error` set if it held the lock."""
    now = now or datetime.now(UTC)
    run_id = now.strftime("%Y%m%dT%H%M%S%fZ")
    report = RunReport(run_id=run_id, command=options.command, dry_run=options.dry_run)
    with _sigterm_ends_run(), run_folder(config.work_dir, run_id) as workdir:
        _run(config, options, report, workdir, now, on_delivery)
    return report


def _run(config: Config, options: RunOptions, report: RunReport, workdir: Path,
         now: datetime, on_delivery: Callable[[DeliveryReport], None] | None) -> None:
    run_id = report.run_id
    stores: list[Any] = []
    lock: StateLock | None = None
    state: Store | None = None
    keys: RunKeys | None = None
    executor = open_executor(config.executor, workdir / "work", run_id)
    report.executor = executor.describe()
    snapshots: Snapshots | None = None
    try:
        keys = RunKeys.load(config, workdir / "gpg")  # a bad key file: before any IO
        with _step("open the state store"):
            state = _keep(stores, open_store(config.state.url, config.state.options))
        if not options.dry_run:
            with _step("take the state lock"):
                # Its own connection: the heartbeat renews it from a thread.
                lock_store = _keep(stores, open_store(config.state.url, config.state.options))
            lock = StateLock(lock_store, run_id, now)
            lock.acquire()  # LockHeld says it all
        kinds = tuple(k for k in KEY_KINDS if any(k in f.kinds for f in config.feeds))
        cache = state if config.index_cache and not options.dry_run else None
        with _step("open the profile snapshot"):
            # The cache is written from a thread: its own connection (as the lock's).
            writer = lambda: open_store(config.state.url, config.state.options)  # noqa: E731
            snapshots = _keep(stores, Snapshots(config.snapshot, config.default_country,
                                                str(workdir), kinds, config.profile_columns,
                                                config.crm_matches, cache, writer))
        targets = {}
        for d in config.destinations:
            with _step(f"open destination {d.name}"):
                targets[d.name] = _keep(stores, open_store(d.target.url, d.target.options))
        ctx = Context(config, options, run_id, state, Ledger(state), snapshots, targets,
                      workdir, executor, keys)
        if not options.dry_run:
            ctx.ledger.check_writable(run_id)
        check_backfill(ctx)
        for feed in config.feeds:
            for result in guarded_feed(ctx, feed, stores):
                report.deliveries.append(result)
                report.executor = executor.describe()
                if on_delivery:
                    on_delivery(result)
                if lock is not None and lock.lost:  # another run may be publishing now
                    raise FatalError("the state lock was taken over after its lease lapsed "
                                     "(renewals failed); stopped before the next delivery")
        snapshots.finish_cache()  # still under the lock: the cache is in the state store
    except BaseException as exc:
        report.error = ended_by(exc)
        report.executor = executor.describe()
        if lock is not None and lock.held and state is not None:
            _save_report_quietly(state, report)
        exc.run_report = report  # type: ignore[attr-defined]  # for --json
        raise
    else:
        if not options.dry_run and state is not None:
            with _step("save the run report"):
                Ledger(state).save_run(run_id, report.to_dict())
    finally:
        executor.close()
        if snapshots is not None:  # a run that dies stops its cache write (none is kept)
            snapshots.finish_cache(abort=True)
        if lock is not None:
            _release(lock)
        for store in stores:
            _close(store)
        if keys is not None:
            keys.close()


def ended_by(exc: BaseException) -> str:
    """How a run died, in one line for its report (no record content: see errors.py)."""
    if isinstance(exc, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, PipelineError):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if _disk_full(exc):
        return f"work disk full ({os.strerror(errno.ENOSPC)})"
    return f"unexpected {type(exc).__name__}"


# polars reports a full disk as OSError without errno: "No space left on device (os error 28)"
_FULL = tuple(f"(os error {code})" for code in (errno.ENOSPC, errno.EDQUOT))


def _disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and (exc.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or str(exc).endswith(_FULL))


def _save_report_quietly(state: Store, report: RunReport) -> None:
    try:
        Ledger(state).save_run(report.run_id, report.to_dict())
    except (PipelineError, OSError) as exc:
        log.error("run_report=not_saved error=%s", exc)


@contextmanager
def _step(what: str) -> Iterator[None]:
    """Errors raised inside name the step that failed (same class, so same exit code)."""
    try:
        yield
    except PipelineError as exc:
        renamed = copy.copy(exc)
        renamed.args = (f"{what}: {exc}",)
        raise renamed from exc


@contextmanager
def _sigterm_ends_run() -> Iterator[None]:
    """SIGTERM raises Terminated in the main thread, so the run unwinds like an interrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: object) -> None:
        raise Terminated("terminated (SIGTERM)")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def guarded_feed(ctx: Context, feed: FeedConfig, stores: list[Any]
                 ) -> Iterator[DeliveryReport]:
    """One feed's reports. Opening its store and listing its units belong to the feed: when
    either fails, the feed gets one failed entry (delivery `*`) with a one-line reason, and
    the other feeds run."""
    try:
        source = _keep(stores, open_store(feed.source.url, feed.source.options))
        flow = flow_for(ctx, feed, source)
        units = flow.units()
    except Exception as exc:  # noqa: BLE001 - one feed's discovery never stops the run
        yield feed_failed(feed, exc)
        return
    for unit in units:
        with _step(f"feed {feed.name}, delivery {unit.root}"):
            rep = process(ctx, flow, unit)
        yield rep


def feed_failed(feed: FeedConfig, exc: Exception) -> DeliveryReport:
    if isinstance(exc, PipelineError | OSError):
        why = " ".join(str(exc).split()) or type(exc).__name__
    else:  # a defect: its message may quote data, the traceback goes to the debug log
        log.debug("feed=%s discovery_failed", feed.name, exc_info=True)
        why = f"unexpected {type(exc).__name__}"
    log.error("feed=%s status=failed reason=feed not listed: %s", feed.name, why)
    return DeliveryReport(feed=feed.name, delivery="*", status="failed",
                          reason=f"feed not listed: {why}")


def process(ctx: Context, flow: Flow, unit: Any) -> DeliveryReport:
    feed = flow.feed.name
    rep = DeliveryReport(feed=feed, delivery=unit.root,
                         date=unit.date.isoformat() if unit.date else None)
    with _step("read its ledger entry"):
        previous = ctx.ledger.get(feed, unit.root)
    blocked = flow.blocked(unit)
    if blocked:
        rep.status, rep.reason = blocked
        if not ctx.options.dry_run and not _processed(previous):
            _record(ctx, rep, flow.files(unit))
        return rep
    if previous and previous.status in DONE and not flow.again(unit):
        rep.status = "skipped"
        rep.reason = flow.changed(unit, previous)
        if rep.reason:
            log.warning("feed=%s delivery=%s changed_after_processing", feed, unit.root)
        return rep
    try:
        _with_retries(lambda: _attempt(ctx, flow, unit, rep), ctx.options.retry_delays,
                      unit.root)
    except (IncompleteDelivery, DeliveryFailed, TransientError, OSError) as exc:
        if isinstance(exc, OSError) and not _disk_full(exc):
            raise
        rep.status = "incomplete" if isinstance(exc, IncompleteDelivery) else "failed"
        rep.reason = ended_by(exc) if isinstance(exc, OSError) else str(exc)
        if not rep.balanced():  # stopped while counting: its records were not all read
            rep.reset_counts()
        log.error("feed=%s delivery=%s status=%s reason=%s", feed, unit.root, rep.status, exc)
    # A unit skipped while processing (superseded) keeps its earlier processed record.
    kept = rep.status == "skipped" and _processed(previous)
    if not ctx.options.dry_run and not kept:
        with _step("write its ledger entry"):
            _record(ctx, rep, flow.files(unit))
    return rep


def _processed(entry: LedgerEntry | None) -> bool:
    return entry is not None and entry.status == "processed"


def _with_retries(step: Callable[[], None], delays: tuple[float, ...], what: str) -> None:
    """Retry a unit on retriable store errors; it is idempotent (deterministic names)."""
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


def _attempt(ctx: Context, flow: Flow, unit: Any, rep: DeliveryReport) -> None:
    rep.reset_counts()  # a retry starts from scratch
    rep.status, rep.reason = "pending", None
    flow.process(unit, rep)
    if rep.status != "skipped":
        rep.status = "dry_run" if ctx.options.dry_run else "processed"
    log.info("feed=%s delivery=%s status=%s received=%d matched=%d rejected=%d",
             rep.feed, unit.root, rep.status, rep.records_received, rep.matched,
             rep.rejected)


def _record(ctx: Context, rep: DeliveryReport, files: dict[str, str]) -> None:
    ctx.ledger.put(LedgerEntry(
        feed=rep.feed, delivery=rep.delivery, status=rep.status, files=files,
        counts=rep.counts(), outputs=rep.outputs, run_id=ctx.run_id, reason=rep.reason,
        date=rep.date,
    ))


def _release(lock: StateLock) -> None:
    """Release the state lock; failing to must not hide how the run itself ended (the lease
    then lapses, and a run of this host takes the lock over as soon as this process ends)."""
    try:
        lock.release()
    except (PipelineError, OSError) as exc:
        log.error("lock=release_failed error=%s", exc)


def _keep(stores: list[Any], store: Any) -> Any:
    stores.append(store)
    return store


def _close(store: Any) -> None:
    try:
        store.close()
    except (PipelineError, OSError):
        log.debug("close failed", exc_info=True)


__all__ = ["RunOptions", "execute", "FatalError"]
