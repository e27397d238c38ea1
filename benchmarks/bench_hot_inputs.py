"""Peak RSS for hostile inputs: one key on every line, one line without end.

usage: python benchmarks/bench_hot_inputs.py [--lines 22000000] [--line-mb 256] [--work DIR]

Writes a local feed with (a) a delivery of N identical lines (gzip'd, valid control file;
22M lines are ~0.5 MB), (b) a delivery of one line of the given size without a line end,
and (c) a healthy two-line delivery beside them; then runs the pipeline on each hostile
delivery (with the healthy one) in a fresh process and prints its wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.formats import InfoEntry, render_info  # noqa: E402

MEASURE = """
import resource, sys
from pipeline.cli import main
code = main(sys.argv[1:])
print(max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF,
      resource.RUSAGE_CHILDREN)) // 1024, file=sys.stderr)
sys.exit(code)
"""


def _gzip_repeated(piece: bytes, count: int) -> bytes:
    """gzip of `piece * count` without holding the whole text."""
    z = zlib.compressobj(1, zlib.DEFLATED, 31)
    out = bytearray()
    block = piece * max(1, (1 << 20) // len(piece))
    per_block = len(block) // len(piece)
    done = 0
    while done + per_block <= count:
        out += z.compress(block)
        done += per_block
    out += z.compress(piece * (count - done))
    out += z.flush()
    return bytes(out)


def _delivery(folder: Path, root: str, data: bytes, lines: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{root}-1.sync.gz"
    (folder / name).write_bytes(data)
    entry = InfoEntry(name, len(data), lines, 1, hashlib.md5(data).hexdigest())
    (folder / f"{root}.info").write_text(render_info([entry], root))


def _case(work: Path, tag: str, data: bytes, lines: int) -> dict:
    case = work / tag
    feed = case / "feed"
    _delivery(feed, "ftp_1_2_iter_1700000000000", data, lines)
    healthy = b"ok@example.com 111\nnobody@example.com 112\n"
    _delivery(feed, "ftp_1_2_iter_1700000100000", gzip.compress(healthy, mtime=0), 2)
    import polars as pl
    (case / "profiles").mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"profile_id": ["P1", "P2"], "email": ["hot@example.com", "ok@example.com"]}
                 ).write_parquet(case / "profiles" / "p.parquet")
    cfg = case / "c.toml"
    cfg.write_text(f"""
[state]
location = "{case}/state"
[profiles]
snapshot = "{case}/profiles"
[[feeds]]
name = "emails"
source = "{feed}"
id_kind = "email"
id_encoding = "plain"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{case}/out"
""")
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", MEASURE, "run", "--config", str(cfg), "--json"],
                          capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - start
    report = json.loads(proc.stdout)
    return {"case": tag, "input_bytes": len(data), "exit": proc.returncode,
            "wall_s": round(wall, 1), "peak_rss_mb": int(proc.stderr.strip().splitlines()[-1]),
            "deliveries": {d["delivery"]: (d["status"], d["records_received"], d["matched"],
                                           d["format_errors"]) for d in report["deliveries"]}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=22_000_000)
    parser.add_argument("--line-mb", type=int, default=256)
    parser.add_argument("--work", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        hot = _gzip_repeated(b"hot@example.com 111,112 113\n", args.lines)
        print(json.dumps(_case(work, f"{args.lines} identical lines", hot, args.lines)))
        del hot
        if not args.line_mb:  # --line-mb 0: the identical-lines case only
            return
        size = args.line_mb << 20
        long_line = _gzip_repeated(b"111,", size // 4)
        print(json.dumps(_case(work, f"one {args.line_mb} MB line", long_line, 1)))


if __name__ == "__main__":
    main()
