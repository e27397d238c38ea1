"""Runs the CLI and waits mid-run (before a delivery's match pass) so a test can signal it.

usage: python tests/signal_runner.py READY_FILE run --config FILE ...
Once the first delivery's lines are read and the profile index is built (its files are in
the work folder; it is built on a thread beside pass 1, so only pass 2 is sure to find
them), READY_FILE is created and the run sleeps up to 60 s: time for the test to send
SIGTERM or SIGKILL.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402
from pipeline.flows import aam  # noqa: E402


def pause_before(func, ready: Path):
    def wrapper(*args, **kwargs):
        ready.write_text("spilled")
        time.sleep(60)
        return func(*args, **kwargs)

    return wrapper


if __name__ == "__main__":
    ready, *argv = sys.argv[1:]
    aam.match = pause_before(aam.match, Path(ready))
    sys.exit(main(argv))
