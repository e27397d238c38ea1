"""read_ahead: same items in the same order, errors where they happened, no thread left."""

from __future__ import annotations

import threading
import time

import polars as pl
import pytest

from pipeline.errors import DeliveryFailed
from pipeline.stages.ingest import read_ahead


def frames(n: int, fail_after: int | None = None, produced: list | None = None):
    for i in range(n):
        if fail_after is not None and i == fail_after:
            raise DeliveryFailed("f.sync.gz: md5 does not match the control file")
        if produced is not None:
            produced.append(i)
        yield pl.DataFrame({"i": [i]})


def _threads() -> int:
    return sum(t.name.startswith("read-ahead") for t in threading.enumerate())


def test_items_in_order() -> None:
    got = [f["i"][0] for f in read_ahead(frames(50), depth=2)]
    assert got == list(range(50))
    assert _threads() == 0


def test_error_arrives_after_the_items_before_it() -> None:
    got = []
    with pytest.raises(DeliveryFailed, match="md5"):
        for f in read_ahead(frames(10, fail_after=4)):
            got.append(f["i"][0])
    assert got == [0, 1, 2, 3]
    assert _threads() == 0


def test_closing_early_stops_the_producer() -> None:
    produced: list[int] = []
    reader = read_ahead(frames(1000, produced=produced), depth=1)
    assert next(reader)["i"][0] == 0
    reader.close()
    assert _threads() == 0
    time.sleep(0.05)
    assert len(produced) <= 2  # the one consumed and at most one made ahead
