"""RunReport.exit_code (SPEC §8): 0 ok or nothing to do, 1 failed, 3 partial; a dry run
answers as the run would."""

from __future__ import annotations

import pytest

from pipeline.report import DeliveryReport, RunReport


def _report(*statuses: str, dry_run: bool = False, error: str | None = None) -> RunReport:
    return RunReport(run_id="r", command="run", dry_run=dry_run, error=error, deliveries=[
        DeliveryReport(feed="f", delivery=f"d{n}", status=status)
        for n, status in enumerate(statuses)])


@pytest.mark.parametrize("statuses,dry_run,code", [
    ((), False, 0),
    (("processed", "skipped"), False, 0),
    (("processed", "failed"), False, 3),
    (("failed", "incomplete"), False, 1),
    (("dry_run",), True, 0),
    (("dry_run", "failed"), True, 3),  # as the real run would end
    (("failed",), True, 1),
])
def test_exit_code(statuses, dry_run, code):
    report = _report(*statuses, dry_run=dry_run)
    assert report.exit_code() == code
    assert report.to_dict()["status"] == {0: "ok", 1: "failed", 3: "partial"}[code]


def test_a_run_that_died_failed():
    assert _report("processed", error="terminated (SIGTERM)").exit_code() == 1
