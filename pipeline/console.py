"""Human-facing output: report tables (stdout) and progress (stderr). Counts only, no IDs."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.status import Status
from rich.table import Table

from pipeline.report import COUNTS, DeliveryReport, RunReport


class Progress:
    """One line per finished delivery on stderr; a live spinner only on a terminal."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.done = 0
        self._status: Status | None = None

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self._status = self.console.status("processing deliveries…")
            self._status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(None, None, None)

    def delivery_done(self, rep: DeliveryReport) -> None:
        self.done += 1
        if self.enabled:
            self.console.print(
                f"[{self.done}] {escape(rep.feed)}/{escape(rep.delivery)}: {rep.status} "
                f"received={rep.records_received} matched={rep.matched}",
                highlight=False,
            )


def print_report(report: RunReport, console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout, width=160)
    table = Table(title=f"Run {report.run_id} ({report.command}"
                        f"{', dry run' if report.dry_run else ''})")
    table.add_column("feed / delivery")
    table.add_column("status")
    for name in COUNTS:
        table.add_column(name.replace("_", " "), justify="right")
    for d in report.deliveries:
        table.add_row(escape(f"{d.feed}/{d.delivery}"), d.status,
                      *(str(v) for v in d.counts().values()))
    totals = report.totals()
    table.add_row("[b]total[/b]", "", *(str(totals[n]) for n in COUNTS))
    console.print(table)
    for d in report.deliveries:
        if d.reason:
            # Names come from file names and keys: printed as they are, never as markup.
            console.print(escape(f"  {d.delivery}: {d.status}: {d.reason}"), highlight=False)
    if report.leavers():
        console.print(f"leavers (pairs removed by full deliveries): {report.leavers()}",
                      highlight=False)
    balanced = all(d.balanced() for d in report.deliveries)
    console.print(f"accounting invariant: {'holds' if balanced else 'VIOLATED'}; "
                  f"status: {report.to_dict()['status']}", highlight=False)
    executor = report.executor
    where = f" on {executor['scheduler']}" if executor.get("scheduler") else ""
    console.print(f"executor: {executor['kind']}{where}, {executor['tasks']} tasks",
                  highlight=False)


def print_status(data: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console(file=sys.stdout, width=160)
    runs = Table(title="Last runs")
    for col in ("run id", "command", "status", "deliveries", "received", "matched"):
        runs.add_column(col)
    for r in data["runs"]:
        runs.add_row(r["run_id"], r["command"], r["status"], str(r["deliveries"]),
                     str(r["received"]), str(r["matched"]))
    console.print(runs)
    for title in ("failed", "pending"):
        table = Table(title=f"{title.capitalize()} deliveries")
        for col in ("feed", "delivery", "status", "reason"):
            table.add_column(col)
        for d in data[title]:
            table.add_row(*(escape(v) for v in (d["feed"], d["delivery"], d["status"],
                                                 d.get("reason") or "")))
        console.print(table)
    console.print(f"processed deliveries: {data['processed']}", highlight=False)
