"""What one run shares with its flows: the options it was started with and its open stores."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pipeline.config import Config
from pipeline.executors import Executor
from pipeline.ledger import Ledger
from pipeline.pgp import RunKeys
from pipeline.snapshot import Snapshots
from pipeline.stores import Store


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

    @property
    def reprocess(self) -> bool:
        """Deliveries already processed are done again (--force, backfill)."""
        return self.force or self.command == "backfill"


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
    executor: Executor  # where the heavy passes of a delivery run (pipeline/executors)
    keys: RunKeys | None = None  # PGP keys of feeds and destinations (SPEC §12)
