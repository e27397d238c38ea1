"""Runs the CLI in this process and writes its peak RSS (MB, children included) to a file.

usage: python tests/rss_runner.py OUT_FILE CHUNK_BYTES run --config FILE ...
CHUNK_BYTES: the reader's chunk size, small so that a test input spans many chunks.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.cli import main  # noqa: E402
from pipeline.stages import ingest  # noqa: E402

if __name__ == "__main__":
    out, chunk_bytes, *argv = sys.argv[1:]
    ingest.CHUNK_BYTES = int(chunk_bytes)
    code = main(argv)
    peak_kb = max(resource.getrusage(who).ru_maxrss
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    Path(out).write_text(str(peak_kb // 1024))
    sys.exit(code)
