"""Runs the CLI and SIGKILLs itself when the export stage saves membership state.

usage: python tests/export_crash_runner.py N run --config FILE ...
N: die on the N-th call of export.save_membership (before it saves); 0 never dies.
Outputs are published before any state is saved, so N=1 crashes between publishing and
saving, and N>1 after part of the state was saved.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402
from pipeline.flows import export  # noqa: E402


def install(crash_at: int) -> None:
    save = export.save_membership
    calls = 0

    def crashing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return save(*args, **kwargs)

    export.save_membership = crashing


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
