"""Run report: per-delivery and per-run counts, with the accounting invariant of SPEC §6."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import DeliveryFailed

COUNTS = ("records_received", "format_errors", "invalid_ids", "decrypt_failures",
          "matched", "unmatched", "suppressed")


@dataclass
class DeliveryReport:
    feed: str
    delivery: str
    date: str | None = None
    status: str = "pending"  # processed | failed | skipped | incomplete | changed | dry_run
    reason: str | None = None
    records_received: int = 0
    format_errors: int = 0
    invalid_ids: int = 0
    decrypt_failures: int = 0
    matched: int = 0
    unmatched: int = 0
    suppressed: int = 0
    leavers: int = 0  # (profile, segment) pairs a `full` delivery removed: output rows
    rows_written: dict[str, int] = field(default_factory=dict)
    unmapped_segments: dict[str, int] = field(default_factory=dict)  # rows filtered out
    missing_ids: dict[str, int] = field(default_factory=dict)  # rows lacking the DPUUID
    outputs: list[str] = field(default_factory=list)
    tasks: int = 0  # executor tasks run for this delivery (all attempts)

    @property
    def rejected(self) -> int:
        return self.format_errors + self.invalid_ids + self.decrypt_failures

    def balanced(self) -> bool:
        """SPEC §6: every received record is in exactly one count."""
        return self.records_received == self.rejected + self.matched + self.unmatched

    def check_reject_ratio(self, max_ratio: float) -> None:
        """SPEC §6: above the feed's max_reject_ratio the delivery fails, nothing published."""
        ratio = self.rejected / self.records_received if self.records_received else 0.0
        if ratio > max_ratio:
            raise DeliveryFailed(f"reject ratio {ratio:.4f} exceeds max_reject_ratio "
                                 f"{max_ratio} ({self.rejected} of {self.records_received} "
                                 "records rejected; see quarantine)")

    def reset_counts(self) -> None:
        """Back to zero counts and no outputs (a retry, or a delivery that could not be read)."""
        for name in COUNTS:
            setattr(self, name, 0)
        self.leavers = 0
        for collection in (self.rows_written, self.unmapped_segments, self.missing_ids,
                           self.outputs):
            collection.clear()

    def counts(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTS}


@dataclass
class RunReport:
    run_id: str
    command: str
    dry_run: bool = False
    deliveries: list[DeliveryReport] = field(default_factory=list)
    error: str | None = None
    executor: dict[str, Any] = field(default_factory=lambda: {"kind": "local", "tasks": 0})

    def totals(self) -> dict[str, int]:
        totals = dict.fromkeys(COUNTS, 0)
        for d in self.deliveries:
            for name, value in d.counts().items():
                totals[name] += value
        return totals

    def leavers(self) -> int:
        """Output rows, not records: outside the §6 invariant, so not in `totals`."""
        return sum(d.leavers for d in self.deliveries)

    def statuses(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.deliveries:
            out[d.status] = out.get(d.status, 0) + 1
        return out

    def exit_code(self) -> int:
        """0 ok / nothing to do, 1 everything attempted failed, 3 partial."""
        if self.error:
            return 1
        failed = sum(1 for d in self.deliveries if d.status == "failed")
        # a dry run's deliveries that went through are "dry_run": done as much as it does
        done = sum(1 for d in self.deliveries if d.status in ("processed", "dry_run"))
        if failed and not done:
            return 1
        return 3 if failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "command": self.command,
            "dry_run": self.dry_run,
            "status": {0: "ok", 1: "failed", 3: "partial"}[self.exit_code()],
            "totals": self.totals(),
            "leavers": self.leavers(),
            "deliveries_by_status": self.statuses(),
            "executor": self.executor,
            "deliveries": [asdict(d) for d in self.deliveries],
            "error": self.error,
        }
