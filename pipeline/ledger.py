"""Ledger of deliveries under the state location: one JSON record per (feed, delivery)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import FatalError, PipelineError
from pipeline.stores import Store

STATUSES = ("processed", "failed", "skipped", "incomplete")


@dataclass
class LedgerEntry:
    feed: str
    delivery: str
    status: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> md5
    counts: dict[str, int] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)
    run_id: str = ""
    reason: str | None = None
    date: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True, indent=1).encode()


class Ledger:
    """Reads and writes ledger records; every write is atomic on the state store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _path(feed: str, delivery: str) -> str:
        return f"ledger/{feed}/{delivery}.json"

    def get(self, feed: str, delivery: str) -> LedgerEntry | None:
        path = self._path(feed, delivery)
        if not self.store.exists(path):
            return None
        return _entry(self.store.read_bytes(path), path)

    def check_writable(self, run_id: str) -> None:
        """Fail before anything is published when records cannot be kept: a run that
        publishes without recording would republish on every rerun."""
        probe = f"ledger/.probe-{run_id}"
        try:
            self.store.write_bytes(probe, b"")
            self.store.delete(probe)
        except (PipelineError, OSError) as exc:
            raise FatalError(f"state location: the ledger is not writable "
                             f"({type(exc).__name__}: {exc}); nothing processed") from None

    def put(self, entry: LedgerEntry) -> None:
        self.store.write_bytes(self._path(entry.feed, entry.delivery), entry.to_json())

    def entries(self) -> list[LedgerEntry]:
        return [_entry(self.store.read_bytes(e.path), e.path)
                for e in self.store.list("ledger/") if e.path.endswith(".json")]

    def save_run(self, run_id: str, report: dict[str, Any]) -> None:
        data = json.dumps(report, sort_keys=True, indent=1).encode()
        self.store.write_bytes(f"runs/{run_id}.json", data)

    def runs(self, last: int = 5) -> list[dict[str, Any]]:
        paths = sorted(e.path for e in self.store.list("runs/") if e.path.endswith(".json"))
        return [json.loads(self.store.read_bytes(p)) for p in paths[-last:]]


def _entry(data: bytes, path: str) -> LedgerEntry:
    try:
        return LedgerEntry(**json.loads(data))
    except (ValueError, TypeError) as exc:
        raise FatalError(f"ledger record {path} is unreadable: {exc}") from None
