"""Pass 1 alone (ingest + resolve of every split file) on the `email` workload, per feed.

Run: .venv/bin/python benchmarks/bench_ingest.py [--data ./bench-data] [--lines 2000000]
         [--threads 1,2] [--repeat 2]

Uses the data set of `bench_pipeline.py --workload email --lines N` (generated when missing)
and runs `ingest_split` over each delivery's split files on the local executor, exactly as
pass 1 does (spill in memory or in files as the bucket count says, read-ahead, quarantine
rows kept), without the profile index, passes 2-3 or the report. For each thread count it
prints wall and process CPU seconds per feed (CPU is the steadier number on a shared
machine), the counts (identical for every thread count, or the script fails) and the peak
RSS of the process so far. Thread counts alternate, `--repeat` times.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench_pipeline import dataset, write_config

from localdev.generate import GenerateSpec
from pipeline.config import load_config
from pipeline.executors.local import LocalExecutor
from pipeline.flows import aam
from pipeline.stages.ingest import find_deliveries
from pipeline.stores import open_store


def run_feeds(config_path: Path, env: dict[str, str], threads: int, tmp: Path
              ) -> list[tuple[str, float, float, dict[str, int]]]:
    config = load_config(config_path, env)
    out = []
    for feed in config.feeds:
        source = open_store(feed.source.url, feed.source.options)
        delivery = find_deliveries(source, feed.name)[0]
        buckets = aam.bucket_count(delivery, 0)
        executor = LocalExecutor(tmp)
        work = executor.work_area(feed.name, aam.MEMORY_ROWS if buckets == 1 else 0)
        res = aam.Resources(feed, work, config.default_country, buckets, source)
        tasks = [aam.SplitTask(seq, f) for seq, f in enumerate(delivery.files, start=1)]
        counts: dict[str, int] = {}
        cpu, wall = time.process_time(), time.perf_counter()
        for result in executor.map(aam.ingest_split, tasks, res, None, threads=threads):
            for name, value in result.items():
                counts[name] = counts.get(name, 0) + value
        out.append((feed.name, time.perf_counter() - wall, time.process_time() - cpu, counts))
        work.clear()
        source.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    spec = GenerateSpec(lines=args.lines, profiles=max(args.lines // 2, 1), files=8, seed=1,
                        workload="email")
    folder, data, _ = dataset(args.data.resolve(), spec)
    env = {**os.environ, data["key_env"]: data["key_hex"]}
    print(f"data: {folder}; load average {os.getloadavg()[0]:.2f}")
    seen: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        config = write_config(Path(tmp) / "run", data)
        for _ in range(args.repeat):
            for threads in (int(t) for t in args.threads.split(",")):
                total_wall = total_cpu = 0.0
                for feed, wall, cpu, counts in run_feeds(config, env, threads, Path(tmp)):
                    if seen.setdefault(feed, counts) != counts:
                        raise SystemExit(f"{feed}: counts differ: {seen[feed]} vs {counts}")
                    total_wall, total_cpu = total_wall + wall, total_cpu + cpu
                    print(f"threads {threads}  {feed:10s} wall {wall:5.2f} s  CPU {cpu:5.2f} s"
                          f"  {json.dumps(counts)}")
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"threads {threads}  {'total':10s} wall {total_wall:5.2f} s  CPU "
                      f"{total_cpu:5.2f} s  peak RSS so far {peak:,.0f} MB  load average "
                      f"{os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
