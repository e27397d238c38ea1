"""Scale-out benchmark: the same generated data through the local executor and through a
Dask cluster on this machine (a `dask scheduler` and N `dask worker` processes), one after
the other in the same invocation. Outputs must be byte-identical; the wall-time ratio is
the cost (or gain) of the cluster path. Dask's performance report of the cluster run is
saved next to the results.

usage: python benchmarks/bench_dask.py [--lines 10000000] [--workers 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pipeline import dataset, input_lines, write_config  # noqa: E402

from localdev.generate import GenerateSpec  # noqa: E402
from tests.cluster import local_cluster  # noqa: E402

COUNTS = ("records_received", "format_errors", "invalid_ids", "decrypt_failures", "matched",
          "unmatched", "suppressed")


def run(config: Path, env: dict[str, str], *args: str) -> tuple[float, dict]:
    """The CLI in its own process: (wall seconds, report)."""
    cmd = [sys.executable, str(ROOT / "run_pipeline.py"), "run", "--config", str(config),
           "--json", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return wall, json.loads(proc.stdout)


def outputs(run_dir: Path) -> dict[str, bytes]:
    out = run_dir / "out"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and "/runs/" not in str(p) and "ledger" not in str(p)
            and "cache" not in str(p) and "membership" not in str(p)}


def configure(run_dir: Path, data: dict, report: Path | None) -> Path:
    """bench_pipeline's config plus a work folder and a work location on one file system
    (the client's profile keys reach the work location as hard links)."""
    config = write_config(run_dir, data)
    text = config.read_text().replace("[state]\n", f'[state]\nwork_dir = "{run_dir}/tmp"\n', 1)
    text += f'\n[executor]\nwork_location = "{run_dir}/dask-work"\n'
    if report is not None:
        text += f'performance_report = "{report}"\n'
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    config.write_text(text)
    return config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=ROOT / "bench-data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dask")
    args = parser.parse_args()

    folder, data, gen_s = dataset(args.data, GenerateSpec(lines=args.lines,
                                                          profiles=args.profiles,
                                                          files=args.files))
    env = {**os.environ, data["key_env"]: data["key_hex"],
           "_RJEM_MALLOC_CONF": "dirty_decay_ms:2000,muzzy_decay_ms:0"}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    runs = folder / "dask-runs" / stamp
    args.out.mkdir(parents=True, exist_ok=True)
    report_html = args.out / f"dask-performance-{args.lines}.html"

    local_wall, local = run(configure(runs / "local", data, None), env, "--executor", "local")
    with local_cluster(runs / "logs", env, workers=args.workers) as cluster:
        dask_wall, remote = run(configure(runs / "dask", data, report_html), env,
                                "--executor", "dask", "--scheduler", cluster.address)
    same_files = outputs(runs / "local") == outputs(runs / "dask")
    same_counts = ([{k: d[k] for k in (*COUNTS, "rows_written")} for d in local["deliveries"]]
                   == [{k: d[k] for k in (*COUNTS, "rows_written")}
                       for d in remote["deliveries"]])
    result = {
        "lines": input_lines(data), "email_lines": args.lines, "profiles": args.profiles,
        "files": args.files, "workers": args.workers, "cores": os.cpu_count(),
        "local_wall_s": round(local_wall, 1), "dask_wall_s": round(dask_wall, 1),
        "dask_over_local": round(dask_wall / local_wall, 3),
        "tasks": remote["executor"]["tasks"], "tasks_per_worker": remote["executor"]["workers"],
        "outputs_identical": same_files, "counts_identical": same_counts,
        "load_average": os.getloadavg(), "peak_rss_children_mb":
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024,
        "performance_report": report_html.name, "when": stamp,
    }
    with open(args.out / "results.jsonl", "a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if same_files and same_counts else 1


if __name__ == "__main__":
    sys.exit(main())
