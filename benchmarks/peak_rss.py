"""Where a run's memory peaks: the pipeline in this process, with a thread that samples RSS
every few milliseconds and, at each new peak, keeps every thread's Python stack.

    .venv/bin/python benchmarks/peak_rss.py --config FILE [--every-ms 2] [--out peak.txt]

Prints the peak (MiB, seconds into the run) and writes the stacks of every thread at that
moment (pipeline frames only, innermost last) to --out. The key variables of the config's
feeds come from the environment, as for `run_pipeline.py run`. Sampling holds the GIL for
a moment each time: the run is slower than without it; use it to find *where*, not how long.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


class PeakSampler(threading.Thread):
    def __init__(self, every_s: float, step_bytes: int = 4 << 20) -> None:
        super().__init__(name="peak-sampler", daemon=True)
        self.every_s, self.step = every_s, step_bytes
        self.peak, self.at, self.stacks = 0, 0.0, ""
        self.start_time = time.perf_counter()
        self._done = threading.Event()
        self.places: dict[str, int] = {}

    def run(self) -> None:
        n = 0
        while not self._done.wait(self.every_s):
            rss = rss_bytes()
            n += 1
            if n % 10 == 0:  # where the main thread is: the highest RSS seen per place
                place = _main_place()
                self.places[place] = max(self.places.get(place, 0), rss)
            if rss > self.peak + self.step or (rss > self.peak and not self.stacks):
                self.peak, self.at = rss, time.perf_counter() - self.start_time
                self.stacks = _kinds() + "\n" + _stacks(self.ident)
            elif rss > self.peak:
                self.peak = rss

    def stop(self) -> None:
        self._done.set()
        self.join()


def _main_place() -> str:
    """The main thread's innermost frame in the flow module (the pass it is in)."""
    frame = sys._current_frames().get(threading.main_thread().ident)  # noqa: SLF001
    place = "other"
    while frame is not None:
        if frame.f_code.co_filename.endswith(("flows/aam.py", "publish.py")):
            place = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}"
            break
        frame = frame.f_back
    return place


def _kinds() -> str:
    """Anonymous memory vs mapped files (an Arrow IPC spill read back is memory-mapped)."""
    with open("/proc/self/status") as fh:
        return " ".join(" ".join(line.split()[:2]) for line in fh
                        if line.startswith(("RssAnon", "RssFile", "RssShmem")))


def _stacks(skip: int | None) -> str:
    names = {t.ident: t.name for t in threading.enumerate()}
    out = []
    for ident, frame in sys._current_frames().items():  # noqa: SLF001 - a profiler's job
        if ident == skip:
            continue
        lines = [f"  {f.filename.split('/pipeline/')[-1]}:{f.lineno} {f.name}"
                 for f in traceback.extract_stack(frame) if "/pipeline/" in f.filename]
        if lines:
            out.append(f"=== {names.get(ident, ident)}\n" + "\n".join(lines))
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--every-ms", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=Path("peak.txt"))
    args = parser.parse_args()

    from pipeline.config import load_config
    from pipeline.context import RunOptions
    from pipeline.run import execute

    config = load_config(args.config, dict(os.environ))
    sampler = PeakSampler(args.every_ms / 1000)
    sampler.start()
    try:
        report = execute(config, RunOptions())
    finally:
        sampler.stop()
    mib = sampler.peak / 2**20
    places = "\n".join(f"  {rss / 2**20:8,.0f} MiB  {place}" for place, rss in
                       sorted(sampler.places.items(), key=lambda kv: -kv[1]))
    args.out.write_text(f"peak {mib:,.0f} MiB at {sampler.at:.1f} s\n"
                        f"highest RSS by where the main thread was:\n{places}\n"
                        f"{sampler.stacks}\n")
    print(f"peak {mib:,.0f} MiB at {sampler.at:.1f} s (exit {report.exit_code()}); "
          f"stacks at the peak: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
