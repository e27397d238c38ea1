"""End-to-end benchmark: this pipeline vs a DuckDB SQL reference on the same generated data.

Run: .venv/bin/python benchmarks/bench_pipeline.py --lines 1000000 [--profiles 1000000]
         [--files 2] [--data ./bench-data] [--keep] [--profile-stages] [--sides pipeline,duckdb]

Generates (or reuses) three deliveries — emails with `lines` lines (40% AES-GCM, 40% SHA-256,
20% plain), phones and ECIDs with a tenth each — and a snapshot of `profiles` profiles, then
runs `run_pipeline.py run --json` and `benchmarks/duckdb_reference.py` each in its own
subprocess, measuring wall time and peak RSS (`wait4` rusage of that child only). It checks
that both wrote the same campaign CSVs (bytes), AAM inbound lines, quarantine files and
report counts, and prints a table. `--profile-stages` also runs the pipeline in this process
with every stage wrapped from the outside (nothing in `pipeline/` is changed) and prints wall
time, the process's CPU while the stage ran (and so the cores it kept busy) and peak RSS per
stage. Results are appended to `<data>/results.jsonl`.
"""

from __future__ import annotations

import argparse
import gzip
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import polars as pl
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localdev.generate import GenerateSpec, generate  # noqa: E402

CONFIG = """\
# Written by benchmarks/bench_pipeline.py
[state]
location = "{out}/state"

[profiles]
snapshot = "{snapshot}"
default_country = "FR"

[[feeds]]
name = "emails"
source = "{feeds}/email"
id_type = "declared"
id_kind = "email"
id_encoding = "auto"          # encrypted, SHA-256 and plain emails mixed per row
decryption = "aes-gcm"
key_env = "{key_env}"

[[feeds]]
name = "phones"
source = "{feeds}/phone"
id_type = "declared"
id_kind = "phone"
id_encoding = "plain"

[[feeds]]
name = "ecids"
source = "{feeds}/ecid"
id_type = "ecid"

[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{out}/campaign"
format = "csv"

[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{out}/aam"
dpid = 12345
id = "email_sha256"
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
gzip = true
"""
EMAIL_FEED = """
[[feeds]]
name = "{name}"
source = "{folder}"
id_type = "declared"
id_kind = "email"
id_encoding = "{encoding}"
"""
EMAIL_DESTINATIONS = """
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{out}/campaign"
format = "csv"

[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{out}/aam"
dpid = 12345
id = "email_sha256"
segments = {{ {segments} }}
gzip = true
"""
COUNTS = ("records_received", "format_errors", "invalid_ids", "decrypt_failures",
          "matched", "unmatched", "suppressed")


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def dataset(root: Path, spec: GenerateSpec) -> tuple[Path, dict, float | None]:
    """Generate into root/<params> unless a complete earlier generation is there."""
    name = f"lines-{spec.lines}_profiles-{spec.profiles}_files-{spec.files}_seed-{spec.seed}"
    if spec.workload != "mixed":
        name = f"{spec.workload}-{name}" + (f"_feeds-{spec.feeds}"
                                             if spec.workload == "nightly" else "")
    folder = root / name
    marker = folder / "generate.json"
    if marker.exists():
        return folder, json.loads(marker.read_text()), None
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    result = generate(folder / "data", spec)
    seconds = time.perf_counter() - start
    marker.write_text(json.dumps(result, indent=1))  # last: marks the data complete
    return folder, result, seconds


def input_lines(data: dict) -> int:
    total = 0
    for folder in data["feeds"].values():
        for info in Path(folder).glob("*.info"):
            total += json.loads(info.read_text())["Totals"]["TotalLineCount"]
    return total


def write_config(run_dir: Path, data: dict, keep_state: bool = False) -> Path:
    if not keep_state:
        shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    path.write_text(email_config(run_dir / "out", data) if "encodings" in data else
                    CONFIG.format(out=run_dir / "out", snapshot=data["profiles"],
                                  feeds=Path(data["profiles"]).parent.parent / "feeds",
                                  key_env=data["key_env"]))
    return path


def email_config(out: Path, data: dict) -> str:
    """Email workloads: one feed per generated folder, every segment mapped to a trait."""
    text = (f'# Written by benchmarks/bench_pipeline.py\n[state]\nlocation = "{out}/state"\n\n'
            f'[profiles]\nsnapshot = "{data["profiles"]}"\ndefault_country = "FR"\n')
    for name, folder in data["feeds"].items():
        encoding = data["encodings"][name]
        text += EMAIL_FEED.format(name=name, folder=folder, encoding=encoding)
        if encoding == "encrypted":
            text += f'decryption = "aes-gcm"\nkey_env = "{data["key_env"]}"\n'
    segments = ", ".join(f'"{s}" = {s + 8000}' for s in data["segments"])
    return text + EMAIL_DESTINATIONS.format(out=out, segments=segments)


# --------------------------------------------------------------------------------------------
# Measured subprocess runs
# --------------------------------------------------------------------------------------------


@dataclass
class Measured:
    side: str
    wall_s: float
    peak_rss_mb: float
    exit_code: int
    report: dict
    killed_over_mb: int | None = None  # set when the RSS guard stopped the run
    cpu_s: float = 0.0  # user + system CPU of the child and its own children (pools)


def measure(side: str, cmd: list[str], run_dir: Path, env: dict[str, str],
            rss_limit_mb: int | None = None) -> Measured:
    """Run `cmd`; wall time and the peak RSS of that child alone (wait4 rusage).

    With `rss_limit_mb`, a watcher kills the child (by its pid) once its RSS passes the
    limit, so a run that does not scale cannot exhaust a shared machine.
    """
    out, err = run_dir / "stdout.json", run_dir / "stderr.log"
    killed = threading.Event()
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=ROOT)  # noqa: S603
        if rss_limit_mb:
            threading.Thread(target=_guard, args=(proc.pid, rss_limit_mb, killed),
                             daemon=True).start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    try:
        report = json.loads(out.read_text())
    except ValueError:
        report = {}
    if proc.returncode not in (0,):
        tail = err.read_text(errors="replace").strip().splitlines()[-5:]
        print(f"{side}: exit code {proc.returncode}; stderr tail:\n  " + "\n  ".join(tail),
              file=sys.stderr)
    # CPU: the child's own and, on Linux, that of the processes it waited for (its pools).
    # Less sensitive than wall time to other work on a shared machine.
    return Measured(side, wall, usage.ru_maxrss / 1024, proc.returncode, report,
                    rss_limit_mb if killed.is_set() else None, usage.ru_utime + usage.ru_stime)


def _guard(pid: int, limit_mb: int, killed: threading.Event) -> None:
    try:
        child = psutil.Process(pid)
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
            if child.memory_info().rss > limit_mb * 2**20:
                killed.set()
                child.kill()
                return
            time.sleep(0.1)
    except psutil.NoSuchProcess:
        return


def side_command(side: str, config: Path, duckdb_memory: str | None = None,
                 workload: str = "mixed", baseline: Path | None = None) -> list[str]:
    if side in ("pipeline", "baseline"):
        root = baseline if side == "baseline" and baseline else ROOT
        return [sys.executable, str(root / "run_pipeline.py"), "run", "--config", str(config),
                "--json"]
    if side == "polars":  # the lean polars script: the product's stack, in memory
        return [sys.executable, str(ROOT / "benchmarks" / "polars_email.py"), "--config",
                str(config)]
    if workload != "mixed":  # the lean script written for the email workloads
        return [sys.executable, str(ROOT / "benchmarks" / "duckdb_email.py"), "--config",
                str(config), "--json"]
    extra = ["--memory-limit", duckdb_memory] if duckdb_memory else []
    return [sys.executable, str(ROOT / "benchmarks" / "duckdb_reference.py"), "--config",
            str(config), "--json", *extra]


# --------------------------------------------------------------------------------------------
# Output comparison
# --------------------------------------------------------------------------------------------


def compare(a: Path, b: Path, pipeline: dict, reference: dict) -> tuple[list[str], list[str]]:
    """(differences, notes) between the two runs' outputs.

    Files are equal when they hold the same rows (lines), in any order: row order within a
    file is not part of the contract. A different order is only noted.
    """
    problems, notes = [], []
    for sub, pattern in (("campaign", "*.csv"), ("aam", "*.sync*"), ("state/quarantine", "*.csv")):
        files_a = _files(a / "out" / sub, pattern)
        files_b = _files(b / "out" / sub, pattern)
        if files_a.keys() != files_b.keys():
            problems.append(f"{sub}: file sets differ: {sorted(files_a.keys() ^ files_b.keys())}")
        for name in sorted(files_a.keys() & files_b.keys()):
            lines_a, lines_b = _lines(files_a[name]), _lines(files_b[name])
            if lines_a == lines_b:
                continue
            why = _row_diff(lines_a, lines_b)
            (notes if why == "same rows, different order" else problems).append(
                f"{sub}/{name}: {why}")
    totals_a, totals_b = pipeline.get("totals", {}), reference.get("totals", {})
    for key in COUNTS:
        if totals_a.get(key) != totals_b.get(key):
            problems.append(f"count {key}: pipeline {totals_a.get(key)} "
                            f"vs reference {totals_b.get(key)}")
    rows_a = {d["delivery"]: d.get("rows_written") for d in pipeline.get("deliveries", [])}
    rows_b = {d["delivery"]: d.get("rows_written") for d in reference.get("deliveries", [])}
    if rows_a != rows_b:
        problems.append(f"rows_written differ: {rows_a} vs {rows_b}")
    return problems, notes


def _files(folder: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(folder)): p for p in folder.rglob(pattern)
            if "_manifests" not in p.parts and not p.name.startswith(".")}


def _lines(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def _row_diff(a: bytes, b: bytes) -> str:
    """Same rows in another order, or how many rows each side has alone."""
    ra, rb = (pl.Series(x.decode(errors="replace").splitlines(), dtype=pl.String) for x in (a, b))
    if ra.sort().equals(rb.sort()):
        return "same rows, different order"
    only_a = ra.filter(~ra.is_in(rb.implode())).len()
    only_b = rb.filter(~rb.is_in(ra.implode())).len()
    return f"content differs: {only_a} rows only in pipeline, {only_b} only in the reference"


# --------------------------------------------------------------------------------------------
# Per-stage profile (in process, stages wrapped from the outside)
# --------------------------------------------------------------------------------------------


class RssSampler:
    """Polls this process's RSS; every open stage sees the peak reached while it ran."""

    def __init__(self, interval: float = 0.02) -> None:
        self.proc = psutil.Process()
        self.interval = interval
        self.open: list[list[int]] = []  # one [peak] cell per running (possibly nested) stage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            rss = self.proc.memory_info().rss
            for cell in list(self.open):
                cell[0] = max(cell[0], rss)
            time.sleep(self.interval)

    def enter(self) -> list[int]:
        cell = [self.proc.memory_info().rss]
        self.open.append(cell)
        return cell

    def leave(self, cell: list[int]) -> int:
        # By identity: two stages may hold equal peaks.
        self.open = [c for c in self.open if c is not cell]
        return max(cell[0], self.proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class StageStats:
    seconds: float = 0.0
    calls: int = 0
    peak_rss_mb: float = 0.0
    cpu_s: float = 0.0  # the whole process's CPU while the stage ran (every thread)
    order: int = 0
    nested: bool = False


@dataclass(frozen=True)
class Probe:
    """A function of the pipeline to time: `owner.attr`, shown as `stage`."""

    owner: str  # module path, or module path:Class
    attr: str
    stage: str
    nested: bool = False  # inside another probe's time (not added to the total)
    eager: bool = False  # the caller collects the LazyFrame at once: collect here instead
    label: Callable[..., str] | None = None  # splits a stage, e.g. by feed


def _feed_of_plan(ctx, plan, *rest, **kw) -> str:
    return plan.feed.name


def _feed_arg(parsed, feed, *rest, **kw) -> str:
    return feed.name


def _spill_name(self, name, *rest, **kw) -> str:
    return name.split("-")[0]  # "keys-email_-1" -> "keys"


# Stages of pipeline/flows/aam.py (bounded-memory design: three passes over spill files).
PROBES = (
    Probe("pipeline.flows.aam", "ingest", "1 ingest pass", label=_feed_of_plan),
    # Since 8887036 chunks are read on a thread one chunk ahead: overlaps parse + resolve.
    Probe("pipeline.flows.aam", "read_chunks",
          "read chunks (md5, gunzip, split; read-ahead thread)", nested=True),
    Probe("pipeline.stages.resolve", "resolve", "parse + resolve", nested=True, eager=True,
          label=_feed_arg),
    Probe("pipeline.flows.aam", "_quarantine", "quarantine file", nested=True),
    # Since 0a59afa the index is built on a thread while the first delivery is read: it
    # overlaps pass 1 and is not added to the total.
    Probe("pipeline.snapshot:Snapshots", "index",
          "2 profile index (normalize, hash, bucket; on a thread, overlaps 1)", nested=True),
    Probe("pipeline.snapshot:Snapshots", "_fingerprint",
          "snapshot fingerprint (md5 of the files; in 2)", nested=True),
    Probe("pipeline.snapshot:IndexCache", "save",
          "snapshot index cache write (night 1)", nested=True),
    Probe("pipeline.flows.aam", "match", "3 match pass (join per key bucket)"),
    Probe("pipeline.stages.join", "match", "join", nested=True, eager=True),
    Probe("pipeline.flows.aam", "build", "4 build pass (merge per profile bucket, writers)"),
    Probe("pipeline.stages.join", "merge_segments", "merge segments", nested=True,
          eager=True),
    Probe("pipeline.flows.aam", "mirror_bucket", "mirror bucket (merge + membership)",
          nested=True),
    Probe("pipeline.flows.aam", "mirror", "membership mirror", nested=True),
    Probe("pipeline.flows.aam", "write_members", "membership part write", nested=True),
    Probe("pipeline.flows.aam", "_hand_over", "merged audience to the work area",
          nested=True),
    Probe("pipeline.flows.aam", "_read", "merged audience read back", nested=True),
    Probe("pipeline.stages.publish:CampaignListWriter", "add", "campaign writer add",
          nested=True),
    Probe("pipeline.stages.publish:CampaignListWriter", "finish", "campaign writer finish",
          nested=True),
    Probe("pipeline.stages.publish:InboundWriter", "add", "inbound writer add", nested=True),
    Probe("pipeline.stages.publish:InboundWriter", "finish",
          "inbound writer finish (waits for the gzip thread)",
          nested=True),
    Probe("pipeline.stages.publish", "write_outputs", "5 publish (files + manifest)"),
    Probe("pipeline.spill:Spill", "write", "(in 1-4) spill writes, Arrow IPC", nested=True,
          label=_spill_name),
)


def _owner(path: str) -> object | None:
    import importlib

    module, _, cls = path.partition(":")
    try:
        obj: object = importlib.import_module(module)
    except ImportError:
        return None
    return getattr(obj, cls, None) if cls else obj


def profile_stages(config_path: Path, env: dict[str, str]) -> tuple[dict[str, StageStats], float]:
    """Run the pipeline in process with every probe wrapped; wall, CPU and peak RSS per stage.

    Wrapping happens from the outside (module/class attributes), so a probe whose function
    has been renamed is reported as missing instead of failing the run.
    """
    import pipeline.run as run_mod
    from pipeline.config import load_config
    from pipeline.context import RunOptions

    stats: dict[str, StageStats] = {}
    sampler = RssSampler()

    def record(probe: Probe, order: int, name: str, seconds: float, peak: int,
               cpu: float) -> None:
        s = stats.setdefault(name, StageStats(order=order, nested=probe.nested))
        s.seconds += seconds
        s.cpu_s += cpu
        s.calls += 1
        s.peak_rss_mb = max(s.peak_rss_mb, peak / 2**20)

    def wrap(probe: Probe, order: int) -> None:
        owner = _owner(probe.owner)
        original = getattr(owner, probe.attr, None) if owner is not None else None
        if original is None:
            print(f"profile: {probe.owner}.{probe.attr} not found; "
                  f"stage {probe.stage!r} not measured", file=sys.stderr)
            return

        def timed(*args, **kwargs):
            name = f"{probe.stage} [{probe.label(*args, **kwargs)}]" if probe.label \
                else probe.stage
            cell, start, cpu = sampler.enter(), time.perf_counter(), time.process_time()
            try:
                result = original(*args, **kwargs)
                if probe.eager and isinstance(result, pl.LazyFrame):
                    result = result.collect().lazy()
            finally:
                record(probe, order, name, time.perf_counter() - start, sampler.leave(cell),
                       time.process_time() - cpu)
            if inspect.isgenerator(result):
                return _timed_generator(result, probe, order, name)
            return result

        setattr(owner, probe.attr, timed)

    def _timed_generator(gen, probe: Probe, order: int, name: str):
        while True:
            cell, start, cpu = sampler.enter(), time.perf_counter(), time.process_time()
            try:
                item = next(gen)
            except StopIteration:
                return
            finally:
                record(probe, order, name, time.perf_counter() - start, sampler.leave(cell),
                       time.process_time() - cpu)
            yield item

    for order, probe in enumerate(PROBES):
        wrap(probe, order)
    config = load_config(config_path, env)
    with sampler:
        start, cpu = time.perf_counter(), time.process_time()
        report = run_mod.execute(config, RunOptions())
        total = time.perf_counter() - start
        stats["(whole run)"] = StageStats(seconds=total, cpu_s=time.process_time() - cpu,
                                          order=-1, nested=True)
    if report.exit_code() != 0:
        print(f"profile: pipeline exit code {report.exit_code()}", file=sys.stderr)
    return stats, total


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def fixed_cost(args: argparse.Namespace, results: list[Measured], runs: Path,
               env: dict[str, str]) -> dict:
    """Fixed cost per delivery: the nightly run (F feeds of L lines) against one delivery of
    F x L lines over the same profiles, run just after; (T_F - T_1) / (F - 1)."""
    spec = GenerateSpec(lines=args.lines * args.feeds, profiles=args.profiles,
                        files=args.files, seed=args.seed, workload="nightly", feeds=1)
    folder, data, _ = dataset(args.data.resolve(), spec)
    env = {**env, data["key_env"]: data["key_hex"]}
    many = [m.wall_s for m in results if m.side == "pipeline"]
    one = []
    for _ in range(max(args.repeat, 1)):
        run_dir = runs / "one-delivery"
        m = measure("pipeline", side_command("pipeline", write_config(run_dir, data)), run_dir,
                    env, args.rss_limit_mb)
        one.append(m.wall_s)
    t_many, t_one = sorted(many)[len(many) // 2], sorted(one)[len(one) // 2]
    per = (t_many - t_one) / max(args.feeds - 1, 1)
    print(f"\nnightly: {args.feeds} deliveries of {args.lines:,} lines {t_many:.2f} s; one "
          f"delivery of {args.lines * args.feeds:,} lines {t_one:.2f} s; fixed cost per "
          f"delivery {per:.3f} s (target <= 0.2 s)")
    return {"many_s": many, "one_s": one, "per_delivery_s": per}


def nights(data: dict, runs: Path, env: dict[str, str], rss_limit_mb: int | None) -> dict:
    """Night 1 builds the snapshot index and caches it in the state location; night 2
    reprocesses the same deliveries (--force) against the unchanged snapshot."""
    run_dir = runs / "nights"
    config = write_config(run_dir, data)
    out = {}
    for night, extra in (("night1", []), ("night2", ["--force"])):
        m = measure("pipeline", side_command("pipeline", config) + extra, run_dir, env,
                    rss_limit_mb)
        out[night] = {"wall_s": m.wall_s, "peak_rss_mb": m.peak_rss_mb, "exit": m.exit_code}
        print(f"{night}: {m.wall_s:.1f} s, peak RSS {m.peak_rss_mb:,.0f} MB, exit {m.exit_code}",
              flush=True)
    cache = run_dir / "out" / "state" / "cache" / "snapshot-index"
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    print(f"night 2 / night 1: {out['night2']['wall_s'] / out['night1']['wall_s']:.2f}; "
          f"cache {size / 2**20:,.0f} MB")
    return out | {"cache_mb": size / 2**20}


def _code_version() -> str:
    """Commit of the measured code, `+dirty` when pipeline/ or benchmarks/ have changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,  # noqa: S607
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "pipeline", "benchmarks"],  # noqa: S607
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def _fmt_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(r, widths, strict=True))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def warm_up(folder: Path) -> None:
    """Read the input files once, untimed: otherwise the first side of the first pair reads
    them from disk and the others from the page cache (after another job pushed them out, a
    first pair measured 10.2 s where the next ones took 8.6)."""
    for path in sorted((folder / "data").rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                while fh.read(8 << 20):
                    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, required=True,
                        help="lines of the email feed (mixed), of all feeds (email), per feed "
                             "(nightly)")
    parser.add_argument("--workload", choices=("mixed", "email", "nightly"), default="mixed",
                        help="mixed: email+phone+ECID feeds vs duckdb_reference.py; email: "
                             "encrypted/hashed/plain email feeds vs duckdb_email.py; nightly: "
                             "--feeds small email feeds, and the fixed cost per delivery")
    parser.add_argument("--profiles", type=int,
                        help="default: 1,000,000 (mixed), lines / 2 (email), 100,000 (nightly)")
    parser.add_argument("--files", type=int,
                        help="split files per delivery (default: 2 mixed, 8 email/nightly)")
    parser.add_argument("--feeds", type=int, default=20, help="feeds of the nightly workload")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the sides this many times, alternating; ratio = median of "
                             "the pairs (the machine is shared: repeat when noisy)")
    parser.add_argument("--nights", action="store_true",
                        help="pipeline only: night 1 (fresh state) then night 2 (--force, same "
                             "state: the snapshot index is reused), both timed")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout of other code (e.g. `git archive` of an older commit): "
                             "its run_pipeline.py replaces the DuckDB side, same data, "
                             "alternating, outputs compared")
    parser.add_argument("--reference", choices=("duckdb", "polars"), default="duckdb",
                        help="email workloads: what the pipeline is compared with, the DuckDB "
                             "script (default) or the lean in-memory polars script "
                             "(benchmarks/polars_email.py: the same stack without the product)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--data", type=Path, default=Path("bench-data"))
    parser.add_argument("--keep", action="store_true", help="keep the runs' outputs")
    parser.add_argument("--profile-stages", action="store_true",
                        help="also run the pipeline in process and time each stage")
    parser.add_argument("--sides", default="pipeline,duckdb",
                        help="comma list of sides to run: pipeline, duckdb (default both); "
                             "'none' with --profile-stages runs only the stage profile")
    parser.add_argument("--rss-limit-mb", type=int,
                        help="kill a side whose RSS passes this (protects a shared machine)")
    parser.add_argument("--duckdb-memory-limit",
                        help="memory_limit for the reference, e.g. 6GB (default: DuckDB's)")
    parser.add_argument("--profile-config", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_config:  # child of --profile-stages: a fresh process, nothing else in it
        stats, total = profile_stages(args.profile_config, dict(os.environ))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"stages": {k: asdict(v) for k, v in stats.items()},
                          "total": total, "peak_rss_mb": peak}))
        return 0
    sides = set(args.sides.split(","))
    if args.profiles is None:
        args.profiles = {"mixed": 1_000_000, "email": max(args.lines // 2, 1),
                         "nightly": 100_000}[args.workload]
    if args.files is None:
        args.files = 2 if args.workload == "mixed" else 8

    spec = GenerateSpec(lines=args.lines, profiles=args.profiles, files=args.files,
                        seed=args.seed, workload=args.workload, feeds=args.feeds)
    folder, data, gen_seconds = dataset(args.data.resolve(), spec)
    rows = input_lines(data)
    gen_note = f"generated in {gen_seconds:.1f} s" if gen_seconds is not None else "reused"
    code = _code_version()  # before the runs: commits may land while they run
    print(f"data: {folder} ({rows:,} input lines, {args.profiles:,} profiles; {gen_note}); "
          f"code {code}")
    env = {**os.environ, data["key_env"]: data["key_hex"]}
    warm_up(folder)

    results: list[Measured] = []
    # One folder per invocation: benchmarks run at the same time on one dataset must not
    # clear each other's outputs (they still share the CPU: their timings are not valid).
    runs = folder / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    # what the pipeline is compared with ("duckdb" in --sides names it)
    other = "baseline" if args.baseline else args.reference
    if args.reference == "polars" and args.workload == "mixed":
        parser.error("--reference polars is written for the email workloads")
    sides = {other if x == "duckdb" else x for x in sides}
    dirs = {side: runs / side for side in ("pipeline", other)}
    first_pair: tuple[list[str], list[str]] = ([], [])
    first_ok = False
    for attempt in range(args.repeat):
        for side in ("pipeline", other):
            if side in sides:
                config = write_config(dirs[side], data)
                cmd = side_command(side, config, args.duckdb_memory_limit, args.workload,
                                   args.baseline)
                m = measure(side, cmd, dirs[side], env, args.rss_limit_mb)
                results.append(m)
                guard = (f" (killed: RSS passed {m.killed_over_mb:,} MB)"
                         if m.killed_over_mb else "")
                print(f"{side}: {m.wall_s:.1f} s (CPU {m.cpu_s:.1f} s), peak RSS "
                      f"{m.peak_rss_mb:,.0f} MB, exit {m.exit_code}{guard}", flush=True)
        if attempt == 0 and len(results) == 2:  # outputs compared once: later runs replace them
            first_pair = compare(dirs["pipeline"], dirs[other], results[0].report,
                                 results[1].report)
            first_ok = results[0].exit_code == 0 and results[1].exit_code == 0

    table = [["side", "wall s", "CPU s", "rows/s", "peak RSS MB", "exit"]]
    for m in results:
        table.append([m.side, f"{m.wall_s:.1f}", f"{m.cpu_s:.1f}", f"{rows / m.wall_s:,.0f}",
                      f"{m.peak_rss_mb:,.0f}", str(m.exit_code)])
    if results:
        print()
        print(_fmt_table(table))
    record: dict = {"workload": args.workload, "reference": other, "lines": args.lines,
                    "profiles": args.profiles, "files": args.files, "input_lines": rows,
                    "code": code, "runs": [asdict(m) | {"report": None} for m in results]}
    if sides >= {"pipeline", other} and results:
        pairs = [(results[i], results[i + 1]) for i in range(0, len(results) - 1, 2)]
        ratios = sorted(p.wall_s / d.wall_s for p, d in pairs)
        ratio = ratios[len(ratios) // 2]
        rss = max(p.peak_rss_mb for p, _ in pairs) / max(d.peak_rss_mb for _, d in pairs)
        cpu = sum(p.cpu_s for p, _ in pairs) / max(sum(d.cpu_s for _, d in pairs), 1e-9)
        print(f"\nratio pipeline/{other}: wall {ratio:.2f}"
              + (f" (median of {len(ratios)}: {', '.join(f'{r:.2f}' for r in ratios)})"
                 if len(ratios) > 1 else "")
              + f", CPU {cpu:.2f}, peak RSS {rss:.2f}")
        problems, notes = first_pair
        identical = not problems and first_ok
        print(f"outputs identical (same rows per file, same counts): "
              f"{'yes' if identical else 'NO'}")
        for problem in problems:
            print(f"  - {problem}")
        for note in notes:
            print(f"  note: {note}")
        record |= {"wall_ratio": ratio, "wall_ratios": ratios, "cpu_ratio": cpu,
                   "identical": identical,
                   "problems": problems, "notes": notes}
    if args.workload == "nightly" and "pipeline" in sides:
        record["fixed_cost"] = fixed_cost(args, results, runs, env)
    if args.nights:
        record["nights"] = nights(data, runs, env, args.rss_limit_mb)
    for m in results:
        if m.side in ("duckdb", "polars") and m.report.get("steps"):
            steps = ", ".join(f"{k} {v:.1f}" for k, v in m.report["steps"].items())
            print(f"{m.side} steps (s): {steps}")
            record[f"{m.side}_steps"] = m.report["steps"]

    if args.profile_stages:
        run_dir = runs / "profile"
        config = write_config(run_dir, data)
        cmd = [sys.executable, __file__, "--lines", str(args.lines), "--profile-config",
               str(config)]
        with open(run_dir / "stderr.log", "wb") as log:
            child = subprocess.run(cmd, env=env, cwd=ROOT, check=True,  # noqa: S603
                                   stdout=subprocess.PIPE, stderr=log)
        for line in (run_dir / "stderr.log").read_text(errors="replace").splitlines():
            if line.startswith("profile:"):
                print(line, file=sys.stderr)
        result = json.loads(child.stdout)
        stats = {k: StageStats(**v) for k, v in result["stages"].items()}
        total = result["total"]
        whole = stats.pop("(whole run)", None)
        measured = sum(s.seconds for s in stats.values() if not s.nested)
        # CPU: the process's (every thread's) while the stage ran; cores = CPU / wall
        table = [["stage", "calls", "seconds", "share", "CPU s", "cores", "peak RSS MB"]]
        for name, s in sorted(stats.items(), key=lambda kv: (kv[1].order, kv[0])):
            table.append([("    " if s.nested else "") + name, str(s.calls), f"{s.seconds:.1f}",
                          f"{s.seconds / total:.0%}", f"{s.cpu_s:.1f}",
                          f"{s.cpu_s / s.seconds:.2f}" if s.seconds else "",
                          f"{s.peak_rss_mb:,.0f}"])
        table.append(["other (waits for the index, find deliveries, ledger, report)", "",
                      f"{total - measured:.1f}", f"{(total - measured) / total:.0%}", "", "",
                      ""])
        cpu_total = f"{whole.cpu_s:.1f}" if whole else ""
        cores = f"{whole.cpu_s / total:.2f}" if whole else ""
        table.append(["total (in process)", "", f"{total:.1f}", "100%", cpu_total, cores,
                      f"{result['peak_rss_mb']:,.0f}"])
        print("\npipeline stages (in process):")
        print(_fmt_table(table))
        record["stages"] = result

    with open(args.data / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
    return 0 if record.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main())
