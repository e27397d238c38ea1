"""Cost of the feed membership (SPEC §11): what keeping the (profile, segment) pairs adds to a
delivery's wall time, and the delivery's peak RSS.

Run: .venv/bin/python benchmarks/bench_membership.py --lines 10000000 --seed-lines 15000000
         [--profiles 6000000] [--data ./bench-data] [--no-off]

One email feed (40% AES-GCM, 40% SHA-256, 20% plain IDs, 1-3 of 5 segments per line, from
localdev/generate.py), three deliveries applied in turn on one state location:
  0. `full`, `--seed-lines` lines: builds the membership the next two apply to (~15M pairs at
     the defaults); not the measured part;
  1. `iter`, `--lines` lines, on top of it;
  2. `full`, `--lines` lines (the first `--lines` rows of delivery 0, less day 2's missing
     tenth), against the membership after 1: its leavers are the pairs it no longer lists.
Each step is one `run` in a child process (this script with --child): wall time, CPU and
peak RSS of that child alone (wait4 rusage, bench_pipeline.measure). Two measures of what
the membership adds:
- probes: in the child the membership functions are wrapped from the outside
  (bench_pipeline's probe mechanism, no pipeline code changed, with bench_pipeline's stage
  probes too so a peak can be placed in its stage), and membership work =
  FeedMembership.load (old version -> spill) + the membership part of mirror_bucket (its
  time less `_mentions` and `merge_segments`: members read, `mirror`, part written, leavers
  numbered) + FeedMembership.save (parts uploaded, HEAD). Overhead = membership work /
  (run time - membership work). The writers run on threads beside the next bucket's merge,
  so this wall time also holds time the mirror waited for a core: pessimistic on a busy
  machine;
- twin runs (steps 1 and 2, unless --no-off): the same step again, from a copy of the state
  before it, with the membership switched off (`switch_off`: nothing loaded, mirrored,
  written or saved); added = run time (and CPU) with / without - 1. For `iter` the outputs
  of both runs are compared (they must be equal); for `full` the run without has no
  leavers to write, so its difference also counts writing them (an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_pipeline as bp  # noqa: E402

from localdev import generate as gen  # noqa: E402

SEGMENTS = {str(s): 9000 + s for s in gen.SEGMENTS}
# Membership work, and the parts of mirror_bucket that are not membership work.
MEMBERSHIP = ("membership load", "membership mirror_bucket", "membership save")
NOT_MEMBERSHIP = ("mirror_bucket: mentions", "mirror_bucket: merge segments")
PROBES = (
    bp.Probe("pipeline.membership:FeedMembership", "load", "membership load"),
    bp.Probe("pipeline.membership:FeedMembership", "save", "membership save"),
    bp.Probe("pipeline.flows.aam", "mirror_bucket", "membership mirror_bucket"),
    bp.Probe("pipeline.flows.aam", "_mentions", "mirror_bucket: mentions", nested=True,
             eager=True),
    bp.Probe("pipeline.stages.join", "merge_segments", "mirror_bucket: merge segments",
             nested=True, eager=True),
)


def generate_deliveries(folder: Path, args: argparse.Namespace) -> dict:
    """Snapshot + the three deliveries under folder/pending/<step>/ (kept for reuse)."""
    marker = folder / "generate.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    key = gen.demo_key(args.seed)
    snap = folder / "profiles" / "snapshot.parquet"
    snap.parent.mkdir(parents=True)
    gen.profile_frame(args.profiles, args.seed).write_parquet(snap)
    seed = args.seed * 1000
    steps = [  # (kind, lines, day, line seed, full day)
        ("full", args.seed_lines, 0, seed, 0),
        ("iter", args.lines, 1, seed + 10, None),
        ("full", args.lines, 2, seed, 2),  # same rows as day 0: a full delivery repeats them
    ]
    roots = []
    for n, (kind, lines, day, line_seed, full_day) in enumerate(steps):
        root = f"ftp_5000_6000_{kind}_{gen.BASE_TS_MS + day * gen.DAY_MS}"
        feed_lines = gen._FeedLines(args.profiles, lines, line_seed, key, gen.email_ids,
                                    0.01, full_day)
        gen.write_delivery(folder / "pending" / str(n), root, feed_lines, args.files)
        roots.append(root)
    data = {"profiles": str(snap), "roots": roots, "key_env": gen.KEY_ENV,
            "key_hex": key.hex()}
    marker.write_text(json.dumps(data, indent=1))
    return data


def config_text(out: Path, feed: Path, data: dict) -> str:
    # work files beside the outputs, not in the shared temp folder others may clean
    text = (f'# Written by benchmarks/bench_membership.py\n[state]\nlocation = "{out}/state"\n'
            f'work_dir = "{out}/work"\n'
            f'\n[profiles]\nsnapshot = "{data["profiles"]}"\ndefault_country = "FR"\n')
    text += bp.EMAIL_FEED.format(name="emails", folder=feed, encoding="auto")
    text += f'decryption = "aes-gcm"\nkey_env = "{data["key_env"]}"\n'
    # Step 2 removes ~45% of the pairs, near the default valve (0.5): a run must not fail on it.
    text += "max_removal_ratio = 0.9\n"
    segments = ", ".join(f'"{s}" = {t}' for s, t in SEGMENTS.items())
    return text + bp.EMAIL_DESTINATIONS.format(out=out, segments=segments)


def child(config: Path, off: bool = False) -> int:
    """One run with the membership probes (and bench_pipeline's stage probes, so a peak RSS
    can be placed in its stage); prints the per-probe seconds and peaks as JSON. `off`: the
    membership switched off (see `switch_off`)."""
    if off:
        switch_off()
    bp.PROBES = (*bp.PROBES, *PROBES)
    stats, total = bp.profile_stages(config, dict(os.environ))
    json.dump({"wall_s": total, "stages": {k: v.seconds for k, v in stats.items()},
               "stage_peak_rss_mb": {k: v.peak_rss_mb for k, v in stats.items()}}, sys.stdout)
    return 0


def switch_off() -> None:
    """The delivery without its membership: no old version loaded (so no mirror: every
    bucket takes the no-membership path), no part written, no version saved. An `iter`
    delivery's outputs are unchanged (checked); a `full` one then has no leavers to write."""
    from pipeline.flows import aam
    from pipeline.membership import FeedMembership

    FeedMembership.load = lambda *a, **k: None  # type: ignore[method-assign]
    FeedMembership.save = lambda *a, **k: None  # type: ignore[method-assign]
    aam.write_members = lambda *a, **k: None  # type: ignore[assignment]


def outputs(out: Path, root: str) -> dict[str, bytes]:
    """A delivery's published files (campaign list, AAM inbound) below `out`, by path."""
    stamp = root.rpartition("_")[2][:-3]  # AAM inbound files are named by the seconds
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.relative_to(out).parts[0] != "state"
            and (root in p.name or stamp in p.name)}


def off_run(cmd: list[str], twin: Path, env: dict[str, str], rss_limit_mb: int,
            on: dict, root: str) -> dict:
    """The twin run with the membership off, and what the membership added (run time and
    CPU of the child, relative to the run without it)."""
    m = bp.measure("pipeline", cmd, twin, env, rss_limit_mb)
    run_s = m.report.get("wall_s", float("nan"))
    return {"exit": m.exit_code or processed(twin, root), "wall_s": m.wall_s,
            "run_s": run_s, "cpu_s": m.cpu_s, "peak_rss_mb": m.peak_rss_mb,
            "added_run": on["run_s"] / run_s - 1, "added_cpu": on["cpu_s"] / m.cpu_s - 1}


def processed(out: Path, root: str) -> int:
    """0 when the newest run report under `out` says the delivery was processed, else 1 (a
    failed delivery, e.g. a full disk, still ends the child with exit code 0)."""
    reports = sorted((out / "state" / "runs").glob("*.json"))
    if not reports:
        return 1
    runs = json.loads(reports[-1].read_text())["deliveries"]
    return 0 if any(d["delivery"] == root and d["status"] == "processed" for d in runs) else 1


def membership_seconds(stages: dict[str, float]) -> float:
    return (sum(stages.get(k, 0.0) for k in MEMBERSHIP)
            - sum(stages.get(k, 0.0) for k in NOT_MEMBERSHIP))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lines", type=int, default=10_000_000)
    p.add_argument("--seed-lines", type=int, default=15_000_000)
    p.add_argument("--profiles", type=int, default=6_000_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data", type=Path, default=ROOT / "bench-data")
    p.add_argument("--rss-limit-mb", type=int, default=6000)
    p.add_argument("--no-off", action="store_true",
                   help="skip the twin runs of steps 1 and 2 with the membership off")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--off", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.off)
    name = (f"membership-lines-{args.lines}_seed-{args.seed_lines}_profiles-{args.profiles}"
            f"_files-{args.files}_seed-{args.seed}")
    folder = args.data.resolve() / name
    start = time.perf_counter()
    data = generate_deliveries(folder, args)
    print(f"data {folder} ({time.perf_counter() - start:.0f} s)", flush=True)
    run_dir = folder / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    feed = run_dir / "feed"
    feed.mkdir(parents=True)
    config = run_dir / "config.toml"
    config.write_text(config_text(run_dir / "out", feed, data))
    env = {**os.environ, data["key_env"]: data["key_hex"]}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(config)]
    rows, results = [], []
    steps = ("0 full (builds the membership)", "1 iter", "2 full")
    for n, (label, root) in enumerate(zip(steps, data["roots"], strict=True)):
        kind = label.split()[1]
        for f in (folder / "pending" / str(n)).iterdir():  # the step's delivery appears
            os.link(f, feed / f.name)
        step_dir = run_dir / f"step-{n}"
        step_dir.mkdir()
        twin = run_dir / f"off-{n}"
        if n and not args.no_off:  # the same step later from the same state, membership off
            shutil.copytree(run_dir / "out" / "state", twin / "state")
            (twin / "config.toml").write_text(config_text(twin, feed, data))
        m = bp.measure("pipeline", cmd, step_dir, env, args.rss_limit_mb)
        m.exit_code = m.exit_code or processed(run_dir / "out", root)
        stages = m.report.get("stages", {})
        member = membership_seconds(stages)
        inner = m.report.get("wall_s", float("nan"))
        head = json.loads((run_dir / "out" / "state" / "feed_membership" / "emails" /
                           "HEAD.json").read_text())
        pairs = head["versions"][-1]["pairs"] if head["versions"] else 0
        result = {"step": label, "exit": m.exit_code, "wall_s": m.wall_s, "run_s": inner,
                  "peak_rss_mb": m.peak_rss_mb, "cpu_s": m.cpu_s, "membership_s": member,
                  "overhead": member / (inner - member), "pairs_after": pairs,
                  "stages": stages, "stage_peak_rss_mb": m.report.get("stage_peak_rss_mb")}
        if twin.exists():
            result["off"] = off_run(cmd[:-1] + [str(twin / "config.toml"), "--off"], twin,
                                    env, args.rss_limit_mb, result, root)
            if kind == "iter":
                same = outputs(run_dir / "out", root) == outputs(twin, root)
                result["off"]["same_outputs"] = same
        results.append(result)
        off = result.get("off", {})
        rows.append([label, f"{m.wall_s:.1f}", f"{inner:.1f}", f"{member:.1f}",
                     f"{100 * result['overhead']:.1f}%",
                     f"{off['run_s']:.1f}" if off else "-",
                     f"{100 * off['added_run']:+.1f}%" if off else "-",
                     f"{100 * off['added_cpu']:+.1f}%" if off else "-",
                     f"{m.peak_rss_mb:,.0f}", f"{off['peak_rss_mb']:,.0f}" if off else "-",
                     f"{pairs:,}", str(m.exit_code)])
        print(json.dumps({k: v for k, v in result.items() if k != "stages"}), flush=True)
        if m.exit_code != 0:
            break
    print(bp._fmt_table([["step", "process wall s", "run s", "membership s", "overhead",
                          "run s off", "run +", "CPU +", "peak RSS MiB", "peak off",
                          "pairs after", "exit"], *rows]))
    record = {"code": bp._code_version(), "lines": args.lines, "seed_lines": args.seed_lines,
              "profiles": args.profiles, "files": args.files, "results": results}
    with open(args.data.resolve() / "results.jsonl", "a") as out:
        out.write(json.dumps({"bench": "membership", **record}) + "\n")
    print(f"code {record['code']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
