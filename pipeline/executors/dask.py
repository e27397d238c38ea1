"""Dask executor: a delivery's tasks on an existing Dask distributed cluster.

The client (this process) submits one task per split file / key bucket / profile bucket and
takes results in task order. Tasks carry no secret and no data: a worker opens the feed's
store, reads the key variable and S3 credentials from its own environment, and reads and
writes parts under the work location. A worker lost mid-run: the scheduler runs its tasks
again elsewhere (they write deterministic part names atomically, so a rerun replaces what it
wrote). The scheduler lost: the run stops with one line and publishes nothing.
"""

from __future__ import annotations

import logging
import os
import posixpath
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, TypeVar

import distributed
from distributed import Client, KilledWorker

from pipeline.config import Location
from pipeline.errors import ConfigError, DeliveryFailed, FatalError
from pipeline.executors.local import Portable, Threads
from pipeline.spill import WorkArea, open_work_area

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = "20s"
T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")
# What the client sees when the scheduler goes away under it (not errors of a task).
_LOST = (distributed.client.FuturesCancelledError, distributed.client.CancelledError,
         distributed.comm.CommClosedError, distributed.client.ClosedClientError, OSError,
         TimeoutError)


class DaskExecutor:
    kind = "dask"
    remote = True

    def __init__(self, scheduler: str, work: Location, run_id: str,
                 performance_report: str | None = None) -> None:
        self.scheduler = scheduler
        self.work = Location(_join(work.url, run_id), work.options)
        self.tasks = 0
        self.workers: dict[str, int] = {}
        self._report_path = performance_report
        self._stack = ExitStack()
        self._client: Client | None = None

    def client(self) -> Client:
        """Connected on first use, so a run with nothing to do needs no cluster."""
        if self._client is None:
            _quiet_dask()
            try:
                self._client = self._stack.enter_context(
                    Client(self.scheduler, timeout=CONNECT_TIMEOUT, set_as_default=False))
            except _LOST as exc:
                raise FatalError(f"cannot reach the Dask scheduler at {self.scheduler} "
                                 f"({type(exc).__name__})") from None
            if self._report_path:
                self._stack.enter_context(self._client.as_current())
                try:
                    self._stack.enter_context(
                        distributed.performance_report(filename=self._report_path))
                except ImportError as exc:  # the report is drawn with bokeh
                    raise FatalError("executor.performance_report: needs the dask-report "
                                     f"extra ({exc.name} is not installed)") from None
            log.info("executor=dask scheduler=%s workers=%d", self.scheduler,
                     len(self._client.scheduler_info().get("workers", {})))
        return self._client

    def work_area(self, name: str, memory_rows: int = 0) -> WorkArea:
        return open_work_area(_join(self.work.url, name), self.work.options)

    def map(self, fn: Callable[[T, R], U], tasks: Sequence[T], local: R,
            portable: Portable[R], threads: Threads = 1) -> Iterator[U]:
        # `threads` is for in-process executors: the cluster spreads tasks over its workers.
        client = self.client()
        batch = uuid.uuid4().hex[:12]
        keys = [f"{fn.__name__}-{batch}-{i}" for i in range(len(tasks))]
        try:
            futures = client.map(_run, list(tasks), fn=fn, portable=portable, key=keys,
                                 pure=False)
        except _LOST as exc:
            raise self._lost(exc) from None
        try:
            for future in futures:
                try:
                    result, worker = future.result()
                except KilledWorker as exc:
                    raise DeliveryFailed(f"a task of {fn.__name__} killed several Dask "
                                         f"workers ({type(exc).__name__})") from None
                except _LOST as exc:
                    raise self._lost(exc) from None
                self.tasks += 1
                self.workers[worker] = self.workers.get(worker, 0) + 1
                future.release()
                yield result
        finally:
            if client.status == "running":
                client.cancel(futures)

    def _lost(self, exc: BaseException) -> FatalError:
        return FatalError(f"lost the Dask scheduler at {self.scheduler} "
                          f"({type(exc).__name__}): run stopped, the delivery in progress "
                          "was not published")

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "scheduler": self.scheduler, "tasks": self.tasks,
                "workers": dict(sorted(self.workers.items()))}

    def close(self) -> None:
        """Disconnect, and remove what tasks of this run left in the work location (a
        failed delivery's parts; tasks still running on a lost scheduler's workers)."""
        try:
            self._stack.close()
        except _LOST:  # the cluster is gone already: nothing left to release
            log.debug("dask client close failed", exc_info=True)
        if "://" in self.work.url:
            area = open_work_area(self.work.url, self.work.options)
            try:
                area.clear()
            finally:
                getattr(area, "close", lambda: None)()
        else:
            shutil.rmtree(self.work.url, ignore_errors=True)


def _quiet_dask() -> None:
    """Dask logs a lost connection with tracebacks at ERROR; the run says it in one line."""
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        return
    names = [n for n in logging.root.manager.loggerDict if n.startswith("distributed")]
    for name in ["distributed", *names]:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def _run(task: Any, fn: Callable[[Any, Any], Any], portable: Portable) -> tuple[Any, str]:
    """On a worker: open the resources from this worker's environment, run, close."""
    worker = distributed.get_worker().address
    try:
        with portable.open(os.environ) as resources:
            result = fn(task, resources)
    except ConfigError as exc:  # e.g. the key variable is not set on this worker
        raise FatalError(f"on Dask worker {worker}: {exc}") from None
    return result, worker


def _join(url: str, name: str) -> str:
    return posixpath.join(url.rstrip("/"), name) if "://" in url else os.path.join(url, name)
