"""LocalExecutor.map with threads: results in task order, a bounded window of running
tasks, errors in task order, no thread left behind."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import polars as pl
import pytest

from pipeline.executors.local import LocalExecutor
from pipeline.spill import Spill


def _task_threads() -> int:
    return sum(t.name.startswith("task") for t in threading.enumerate())


class Probe:
    """Counts the tasks running at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = self.most = 0
        self.started: list[int] = []

    def __call__(self, task: int, res: object) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.started.append(task)
        time.sleep(0.01 if task % 3 else 0.03)  # uneven: later tasks finish first
        with self.lock:
            self.running -= 1
        if task == 7:
            raise ValueError("task 7")
        return task * 10


def test_results_in_task_order_with_at_most_threads_running(tmp_path: Path) -> None:
    probe, ex = Probe(), LocalExecutor(tmp_path)
    assert list(ex.map(probe, range(7), None, None, threads=2)) == [i * 10 for i in range(7)]
    assert probe.most == 2
    assert ex.tasks == 7
    assert _task_threads() == 0


def test_a_window_asked_before_each_task_grows_when_it_says_so(tmp_path: Path) -> None:
    """threads as a function (one while the profile index is built, two after): one task
    at a time until it says two, then two; results still in task order."""
    probe, opened = Probe(), threading.Event()
    widths: list[int] = []

    def width() -> int:
        widths.append(2 if opened.is_set() else 1)
        return widths[-1]

    results = LocalExecutor(tmp_path).map(probe, range(7), None, None, threads=width)
    got = [next(results) for _ in range(3)]
    assert probe.most == 1
    opened.set()
    got += list(results)
    assert got == [i * 10 for i in range(7)]
    assert probe.most == 2 and widths[0] == 1 and widths[-1] == 2
    assert _task_threads() == 0


def test_an_error_arrives_in_task_order_and_stops_new_tasks(tmp_path: Path) -> None:
    probe, got = Probe(), []
    with pytest.raises(ValueError, match="task 7"):
        for result in LocalExecutor(tmp_path).map(probe, range(20), None, None, threads=2):
            got.append(result)
    assert got == [i * 10 for i in range(7)]
    assert max(probe.started) <= 8  # the failed task's window, nothing after it
    assert _task_threads() == 0


def test_leaving_early_waits_for_running_tasks(tmp_path: Path) -> None:
    probe = Probe()
    results = LocalExecutor(tmp_path).map(probe, range(20), None, None, threads=2)
    assert next(results) == 0
    results.close()
    assert probe.running == 0 and _task_threads() == 0
    assert len(probe.started) <= 3


@pytest.mark.parametrize("memory_rows", [0, 50, 10_000])
def test_spill_writes_from_threads_equal_sequential_ones(tmp_path: Path,
                                                         memory_rows: int) -> None:
    """Parts written by tasks on threads (in memory, past the bound, in files) read back
    as written one after another."""
    def write(spill: Spill, threads: int) -> None:
        def task(n: int, _: object) -> None:
            frame = pl.DataFrame({"v": range(n * 10, n * 10 + 10), "_b": [n % 3] * 10})
            spill.write("rows", frame, bucket="_b", part=f"{n:04d}")
        list(LocalExecutor(tmp_path).map(task, range(12), None, None, threads=threads))

    one, two = Spill(tmp_path / "one", memory_rows), Spill(tmp_path / "two", memory_rows)
    write(one, 1)
    write(two, 2)
    for bucket in range(3):
        a, b = one.scan("rows", bucket), two.scan("rows", bucket)
        assert a is not None and b is not None
        assert a.collect().equals(b.collect())
    assert one.in_memory == two.in_memory
