"""What an executor is, and the local one: tasks in this process, one after another (or a
few at once on threads, where the caller asks)."""

from __future__ import annotations

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
            portable: Portable[R], threads: int = 1) -> Iterator[U]:
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
            portable: Portable[R], threads: int = 1) -> Iterator[U]:
        if threads <= 1 or len(tasks) <= 1:
            for task in tasks:
                self.tasks += 1
                yield fn(task, local)
            return
        yield from self._threaded(fn, tasks, local, threads)

    def _threaded(self, fn: Callable[[T, R], U], tasks: Sequence[T], local: R,
                  threads: int) -> Iterator[U]:
        """At most `threads` tasks started and not yet consumed: a task starts when the
        result before the window is taken, so memory holds `threads` tasks' work. A failed
        task raises in task order; leaving early waits for the running ones (no thread
        outlives the call) and starts no more."""
        pending: deque[Future[U]] = deque()
        queued = iter(tasks)
        with ThreadPoolExecutor(threads, thread_name_prefix="task") as pool:
            try:
                for task in queued:
                    pending.append(pool.submit(fn, task, local))
                    if len(pending) == threads:
                        break
                while pending:
                    result = pending.popleft().result()
                    self.tasks += 1
                    for task in queued:  # the next one, if any
                        pending.append(pool.submit(fn, task, local))
                        break
                    yield result
            finally:
                for future in pending:
                    future.cancel()

    def describe(self) -> dict[str, object]:
        return {"kind": self.kind, "tasks": self.tasks}

    def close(self) -> None:
        pass
