"""Spill: parts held in memory up to a row bound, then on disk, same rows either way."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from pipeline.spill import Spill


def _frame(start: int, n: int) -> pl.DataFrame:
    return pl.DataFrame({"v": list(range(start, start + n)), "_b": [i % 2 for i in range(n)]})


def _rows(spill: Spill, name: str, bucket: int) -> list[int]:
    scan = spill.scan(name, bucket)
    return [] if scan is None else scan.collect()["v"].to_list()


def test_small_work_stays_in_memory(tmp_path: Path) -> None:
    spill = Spill(tmp_path, memory_rows=100)
    spill.write("x", _frame(0, 10), bucket="_b")
    spill.write("x", _frame(10, 10), bucket="_b")
    assert list(tmp_path.rglob("*.arrow")) == []
    assert _rows(spill, "x", 0) == list(range(0, 20, 2))
    assert [b.collect().height for b in spill.batches("x", 1, 5)] == [5, 5]
    spill.release("x")
    assert spill.scan("x", 0) is None


def test_past_the_bound_everything_goes_to_files_in_order(tmp_path: Path) -> None:
    spill = Spill(tmp_path, memory_rows=25)
    spill.write("x", _frame(0, 10), bucket="_b")
    spill.write("y", _frame(100, 10))
    spill.write("x", _frame(10, 10), bucket="_b")  # 30 rows held: over the bound
    spill.write("x", _frame(20, 4), bucket="_b")
    assert len(list(tmp_path.rglob("*.arrow"))) == 7
    assert _rows(spill, "x", 0) == list(range(0, 24, 2))
    assert _rows(spill, "x", 1) == list(range(1, 24, 2))
    assert _rows(spill, "y", 0) == list(range(100, 110))
    assert sum(b.collect().height for b in spill.batches("x", 0, 5)) == 12
