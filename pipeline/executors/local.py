"""What an executor is, and the local one: tasks in this process, one after another (or a
few at once on threads, where the caller asks)."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol, TypeVar

from pipeline.spill import Spill, WorkArea

T = TypeVar("T")
R = TypeVar("R")
U = TypeVar("U")
R_co = TypeVar("R_co", covariant=True)
# Tasks an in-process executor may run at once: a number, or a function asked before each
# task starts (e.g. one while the profile index is built beside them, two after).
Threads = int | Callable[[], int]
MAX_THREADS = os.cpu_count() or 1


class Portable(Protocol[R_co]):
    """What tasks need, in a form that travels to a worker: locations, names, settings.
    Never a secret nor a frame: `open` builds the resources there, from that worker's
    environment (key variables, S3 credentials)."""

    def open(self, env: Mapping[str, str]) -> AbstractContextManager[R_co]: ...


class Executor(Protocol):
    kind: str
    remote: bool  # tasks run in other processes: they reach inputs through the work area
    tasks: int  # tasks run so far in this run
    workers: dict[str, int]  # tasks per worker address

    def work_area(self, name: str, memory_rows: int = 0) -> WorkArea:
        """The spill of one delivery; `memory_rows` a hint for in-process ones."""

    def map(self, fn: Callable[[T, R], U], tasks: Sequence[T], local: R,
            portable: Portable[R], threads: Threads = 1) -> Iterator[U]:
        """fn(task, resources) for every task; results in task order. `local` are the
        resources for tasks run in this process, `portable` how a worker opens its own.
        `threads`: tasks an in-process executor may run at once (fn must be thread-safe)."""

    def describe(self) -> dict[str, object]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Tasks in this process as they are consumed (bounded memory): one after another, or
    up to `threads` at once."""

    kind = "local"
    remote = False

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.tasks = 0
        self.workers: dict[str, int] = {}

    def work_area(self, name: str, memory_rows: int = 0) -> WorkArea:
        return Spill(self.workdir / name, memory_rows)

    def map(self, fn: Callable[[T, R], U], tasks: Sequence[T], local: R,
            portable: Portable[R], threads: Threads = 1) -> Iterator[U]:
        width = threads if callable(threads) else (lambda: threads)
        if (not callable(threads) and threads <= 1) or len(tasks) <= 1:
            for task in tasks:
                self.tasks += 1
                yield fn(task, local)
            return
        yield from self._threaded(fn, tasks, local, width)

    def _threaded(self, fn: Callable[[T, R], U], tasks: Sequence[T], local: R,
                  width: Callable[[], int]) -> Iterator[U]:
        """At most `width()` tasks started and not yet consumed: a task starts when the
        result before the window is taken, so memory holds that many tasks' work. A failed
        task raises in task order; leaving early waits for the running ones (no thread
        outlives the call) and starts no more."""
        pending: deque[Future[U]] = deque()
        queued = iter(tasks)
        with ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="task") as pool:
            try:
                for task in queued:
                    pending.append(pool.submit(fn, task, local))
                    if len(pending) >= width():
                        break
                while pending:
                    result = pending.popleft().result()
                    self.tasks += 1
                    for task in queued:  # refill the window (it may have grown)
                        pending.append(pool.submit(fn, task, local))
                        if len(pending) >= width():
                            break
                    yield result
            finally:
                for future in pending:
                    future.cancel()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "tasks": self.tasks}

    def close(self) -> None:
        pass
