"""Export diff at scale: time and peak memory of the membership diff of one audience.

Old and new membership of N members (SHA-256 hex DPUUIDs, default 5M) differ by `--churn`
(leavers and as many joiners). Each method runs in its own subprocess, so peak memory is
its own: RSS sampled every 2 ms above the RSS after loading the inputs.

Methods:
  polars        membership.diff (two eager anti-joins on dpuuid): what export.py runs
  polars+state  the whole per-audience state path: read the old Parquet version from a
                state store, diff, write the new version and HEAD (MembershipState)
  duckdb        reference: the same two anti-joins in DuckDB over Arrow tables
  pyarrow       reference: Table.join(join_type="left anti") both ways

Run: .venv/bin/python benchmarks/bench_export_diff.py [--members 5000000] [--churn 0.02]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.identity import sha256_hex  # noqa: E402
from pipeline.membership import MembershipState, diff  # noqa: E402
from pipeline.stores.local import LocalStore  # noqa: E402

METHODS = ("polars", "polars+state", "duckdb", "pyarrow")


def make_inputs(folder: Path, members: int, churn: float) -> tuple[int, int]:
    """old = ids [0, N), new = ids [k, N + k): k leavers and k joiners, shuffled."""
    k = int(members * churn)

    def dpuuids(start: int) -> pl.DataFrame:
        ids = pl.int_range(start, start + members, eager=True).shuffle(seed=start)
        return pl.DataFrame({"dpuuid": ids.cast(pl.String)}).select(
            sha256_hex(pl.lit("user") + pl.col("dpuuid")).alias("dpuuid"))

    dpuuids(0).write_parquet(folder / "old.parquet")
    dpuuids(k).write_parquet(folder / "new.parquet")
    return k, k


def run_polars(folder: Path) -> Callable[[], int]:
    old, new = (pl.read_parquet(folder / f"{n}.parquet") for n in ("old", "new"))
    return lambda: diff(old, new, 5001, 5001).height


def run_polars_state(folder: Path) -> Callable[[], int]:
    store = LocalStore(str(folder / "state"))
    state = MembershipState(store, "ec")
    seed = pl.read_parquet(folder / "old.parquet")
    state.save("VIP", "day1", 1, 5001, seed)
    del seed
    new = pl.read_parquet(folder / "new.parquet")

    def step() -> int:
        base = state.base("VIP", "day2")
        changes = diff(state.read("VIP", base), new, 5001, 5001)
        state.save("VIP", "day2", 2, 5001, new)
        return changes.height

    return step


def run_duckdb(folder: Path) -> Callable[[], int]:
    import duckdb
    import pyarrow.parquet as pq

    con = duckdb.connect()
    for name in ("old", "new"):
        con.register(name, pq.read_table(folder / f"{name}.parquet"))
    sql = """
        SELECT dpuuid, 'add' AS action FROM new ANTI JOIN old USING (dpuuid)
        UNION ALL
        SELECT dpuuid, 'remove' AS action FROM old ANTI JOIN new USING (dpuuid)
    """
    return lambda: con.sql(sql).to_arrow_table().num_rows


def run_pyarrow(folder: Path) -> Callable[[], int]:
    import pyarrow.parquet as pq

    old, new = (pq.read_table(folder / f"{n}.parquet") for n in ("old", "new"))

    def step() -> int:
        joiners = new.join(old, keys="dpuuid", join_type="left anti")
        leavers = old.join(new, keys="dpuuid", join_type="left anti")
        return joiners.num_rows + leavers.num_rows

    return step


RUNNERS = {"polars": run_polars, "polars+state": run_polars_state, "duckdb": run_duckdb,
           "pyarrow": run_pyarrow}


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(method: str, folder: Path) -> dict:
    """In the child process: prepare inputs, then time one run while sampling RSS."""
    step = RUNNERS[method](folder)
    baseline, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    changes = step()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss())
    return {"method": method, "seconds": seconds, "peak_mb": (peak[0] - baseline) / 2**20,
            "changes": changes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, default=5_000_000)
    parser.add_argument("--churn", type=float, default=0.02)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.folder))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        leavers, joiners = make_inputs(folder, args.members, args.churn)
        print(f"members={args.members:,} leavers={leavers:,} joiners={joiners:,} "
              f"inputs_seconds={time.perf_counter() - start:.1f}")
        results = {}
        for method in METHODS:
            if method == "duckdb" and not _has("duckdb"):
                print("duckdb: not installed, skipped")
                continue
            child = subprocess.run(
                [sys.executable, __file__, "--child", method, "--folder", tmp],
                capture_output=True, text=True, check=True)
            results[method] = json.loads(child.stdout.strip().splitlines()[-1])
        ref = results.get("duckdb") or results["pyarrow"]
        for r in results.values():
            assert r["changes"] == leavers + joiners, r
            print(f"{r['method']:<13} seconds={r['seconds']:6.2f} peak_mb={r['peak_mb']:8.0f} "
                  f"time_vs_{ref['method']}={r['seconds'] / ref['seconds']:5.2f}x "
                  f"memory_vs_{ref['method']}={r['peak_mb'] / max(ref['peak_mb'], 1):5.2f}x")


def _has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
