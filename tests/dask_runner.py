"""Runs the CLI in a subprocess with smaller key/profile buckets (more tasks per delivery).

usage: python tests/dask_runner.py LINES_PER_BUCKET run --config FILE ...
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402
from pipeline.flows import aam  # noqa: E402

if __name__ == "__main__":
    aam.LINES_PER_BUCKET = int(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
