"""Machine floor: per-core throughput of the primitive work of the `email` workload, on its data.

Run: .venv/bin/python benchmarks/bench_floor.py [--data ./bench-data] [--lines 2000000]
         [--repeat 3] [--outputs DIR]

Uses the data set of `bench_pipeline.py --workload email --lines N` (generated when missing)
and the outputs of one pipeline run over it (`--outputs`, else the newest kept run under the
data set's `runs/`, else one run made here, not timed). Every primitive runs on one core
(POLARS_MAX_THREADS=1, set before polars is imported), on bytes already in memory (no disk
reads), `--repeat` times; the best run's process CPU seconds are reported (less sensitive than
wall time to other work on a shared machine) with its wall time. The last column scales the
CPU seconds to a workload of `--scale-lines` input lines (default: `--lines`). Rows marked
`ref` are for comparison (stock zlib, the full email normalization, a join on hex strings)
and stay out of the floor total.
"""

from __future__ import annotations

import os

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # one core: before polars is imported

import argparse  # noqa: E402
import hashlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import polars as pl  # noqa: E402
from bench_pipeline import (  # noqa: E402
    ROOT,
    _code_version,
    _fmt_table,
    dataset,
    input_lines,
    side_command,
    write_config,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from isal import igzip, isal_zlib  # noqa: E402

from localdev.generate import GenerateSpec  # noqa: E402
from pipeline.identity import (  # noqa: E402
    _GCM_NONCE,
    _GCM_TAG,
    _gcm_all,
    _utf8_all,
    load_key,
    normalize_email,
    parse_incoming_hash,
    sha256_hex,
)

MB = 1e6


@dataclass
class Row:
    name: str
    size: str  # what went in, for the table
    cpu_s: float
    wall_s: float
    amount: float  # MB or items the rate is computed over
    unit: str  # "MB/s" or "items/s"
    ref: bool = False  # comparison only: not part of the floor total


def best(repeat: int, work: Callable[[], Any]) -> tuple[float, float, Any]:
    """(CPU s, wall s, result) of the run with the least CPU time out of `repeat`."""
    runs = []
    for _ in range(max(repeat, 1)):
        cpu, wall = time.process_time(), time.perf_counter()
        result = work()
        runs.append((time.process_time() - cpu, time.perf_counter() - wall, result))
    return min(runs, key=lambda r: r[0])


def find_outputs(folder: Path, data: dict, env: dict[str, str]) -> Path:
    """`out` of the newest kept pipeline run of this data set, or of one run made now."""
    kept = sorted((p for p in folder.glob("runs/*/pipeline/out") if (p / "aam").is_dir()),
                  key=lambda p: p.stat().st_mtime)
    if kept:
        return kept[-1]
    run_dir = folder / "runs" / "floor-outputs"
    print(f"no kept pipeline run under {folder}/runs: running the pipeline once (not timed)",
          flush=True)
    subprocess.run(side_command("pipeline", write_config(run_dir, data)), env=env, cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    return run_dir / "out"


def _output_files(out: Path) -> list[Path]:
    """The files the manifests checksum: campaign lists and AAM inbound files."""
    return sorted(p for sub in ("campaign", "aam") for p in (out / sub).rglob("*")
                  if p.is_file() and "_manifests" not in p.parts and not p.name.startswith("."))


def _lines(text: bytes) -> pl.Series:
    """What `ingest._frame` does to a chunk: UTF-8 check (Arrow), split at newlines."""
    line = pl.Series("line", [text.rstrip(b"\n")], dtype=pl.Binary).cast(pl.String)
    return line.str.split("\n").explode()


def _fields(lines: pl.Series) -> pl.DataFrame:
    """ID and added segments of each line (`<id> <added>[ <removed>]`): the minimum split."""
    fields = lines.str.split(" ")
    return pl.DataFrame({"id": fields.list.first(), "added": fields.list.get(1, null_on_oob=True)})


def _segments(added: pl.Series) -> pl.Series:
    """A comma list of segment IDs as a list of u32 (bad ones null)."""
    return added.str.split(",").list.eval(pl.element().cast(pl.UInt32, strict=False))


def measure(args: argparse.Namespace) -> tuple[list[Row], dict]:
    spec = GenerateSpec(lines=args.lines, profiles=args.profiles, files=args.files,
                        seed=args.seed, workload="email")
    folder, data, _ = dataset(args.data.resolve(), spec)
    env = {**os.environ, data["key_env"]: data["key_hex"]}
    out = args.outputs or find_outputs(folder, data, env)
    key = load_key(data["key_hex"])
    r = args.repeat
    rows: list[Row] = []

    def add(name: str, size: str, amount: float, unit: str, work: Callable[[], Any],
            ref: bool = False) -> Any:
        cpu, wall, result = best(r, work)
        rows.append(Row(name, size, cpu, wall, amount, unit, ref))
        print(f"  {name}: {cpu:.2f} s CPU", file=sys.stderr, flush=True)
        return result

    # Inputs: every split file of the three deliveries, in memory.
    splits = {feed: [Path(data["feeds"][feed]) / name for name in names]
              for feed, names in data["files"].items()}
    raw = {feed: [p.read_bytes() for p in paths] for feed, paths in splits.items()}
    packed = [b for blobs in raw.values() for b in blobs]
    n_in = sum(map(len, packed))
    texts_by_feed = {feed: [isal_zlib.decompress(b, wbits=31) for b in blobs]
                     for feed, blobs in raw.items()}
    texts = [t for ts in texts_by_feed.values() for t in ts]
    n_text = sum(map(len, texts))
    io = f"{len(packed)} files, {n_in / MB:.0f} MB -> {n_text / MB:.0f} MB"

    add("md5 of the delivered files (control-file check)", f"{n_in / MB:.0f} MB", n_in / MB,
        "MB/s", lambda: [hashlib.md5(b).hexdigest() for b in packed])
    add("gunzip, ISA-L (isal_zlib)", io, n_text / MB, "MB/s (out)",
        lambda: [isal_zlib.decompress(b, wbits=31) for b in packed])
    add("gunzip, stock zlib", io, n_text / MB, "MB/s (out)",
        lambda: [zlib.decompress(b, wbits=31) for b in packed], ref=True)

    n_lines = sum(len(_lines(t)) for t in texts)
    lines = add("UTF-8 check + split into lines (polars)", f"{n_text / MB:.0f} MB",
                n_lines, "lines/s", lambda: {f: pl.concat([_lines(t) for t in ts])
                                            for f, ts in texts_by_feed.items()})
    fields = add("split lines into fields (id, segments)", f"{n_lines:,} lines", n_lines,
                 "lines/s", lambda: {f: _fields(s) for f, s in lines.items()})
    add("segment lists to u32 lists", f"{n_lines:,} lines", n_lines, "lines/s",
        lambda: [_segments(f["added"]) for f in fields.values()])
    ids = {f: frame["id"] for f, frame in fields.items()}

    # AES-GCM: the loop alone, over the tokens that decode and are long enough to try.
    tokens_b = ids["encrypted"].str.decode("base64", strict=False).drop_nulls()
    tokens = tokens_b.filter(tokens_b.bin.size() >= _GCM_NONCE + _GCM_TAG).to_list()
    aead = AESGCM(key)
    plains = add("AES-GCM decrypt (cryptography, plain loop)", f"{len(tokens):,} tokens",
                 len(tokens), "tokens/s", lambda: _gcm_all(aead, tokens))
    decrypted = _utf8_all(plains).drop_nulls()

    profiles = pl.read_parquet(data["profiles"], columns=["email"])["email"].drop_nulls()
    emails = pl.concat([ids["plain"], decrypted, profiles]).to_frame("v")
    v = pl.col("v")
    what = f"{len(emails):,} emails"
    composition = (f"{len(ids['plain']):,} plain + {len(decrypted):,} decrypted + "
                   f"{len(profiles):,} profile emails")
    add("trim + lowercase + SHA-256 hex (polars-hash)", what, len(emails), "values/s",
        lambda: emails.select(sha256_hex(v.str.strip_chars().str.to_lowercase())))
    add("normalize_email (+ regex, NFC path) + SHA-256", what, len(emails), "values/s",
        lambda: emails.select(sha256_hex(normalize_email(v))), ref=True)

    # Match pass: resolved keys of every line vs the profile keys, as hex and as a u64.
    resolved = pl.concat([
        pl.concat([ids["plain"], decrypted]).to_frame("v").select(sha256_hex(normalize_email(v))),
        ids["hashed"].to_frame("v").select(parse_incoming_hash(v)),
    ])["v"].drop_nulls()
    lines_side = pl.DataFrame({"key": resolved}).with_row_index("line_no")
    profile_side = (profiles.to_frame("v").select(key=sha256_hex(normalize_email(v)))
                    .drop_nulls().unique(maintain_order=True).with_row_index("pnum"))
    prefix = pl.col("key").str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64)
    lines64 = lines_side.select("line_no", k64=prefix)
    profile64 = profile_side.select("pnum", k64=prefix)
    sizes = f"{len(lines_side):,} x {len(profile_side):,} keys"
    add("hash join on 64-char hex keys", sizes, len(lines_side), "keys/s",
        lambda: lines_side.join(profile_side, on="key", how="inner"), ref=True)
    matched = add("hash join on u64 keys (digest prefix)", sizes, len(lines_side), "keys/s",
                  lambda: lines64.join(profile64, on="k64", how="inner"))
    keys = matched["k64"]
    add("sort of the matched u64 keys", f"{len(keys):,} u64", len(keys), "keys/s",
        lambda: keys.sort())

    # Outputs: ISA-L gzip level 1 of the AAM inbound lines (as the writer), md5 of each file.
    inbound = [isal_zlib.decompress(p.read_bytes(), wbits=31)
               for p in sorted((out / "aam").rglob("*.gz")) if "_manifests" not in p.parts]
    n_inbound = sum(map(len, inbound))
    gz_size = f"{len(inbound)} files, {n_inbound / MB:.0f} MB"
    add("gzip level 1, ISA-L (igzip), AAM inbound", gz_size, n_inbound / MB, "MB/s (in)",
        lambda: [igzip.compress(t, compresslevel=1, mtime=0) for t in inbound])
    add("gzip level 1, stock zlib, AAM inbound", gz_size, n_inbound / MB, "MB/s (in)",
        lambda: [zlib.compress(t, 1, wbits=31) for t in inbound], ref=True)
    campaign = [pl.read_csv(p) for p in sorted((out / "campaign").rglob("*.csv"))
                if "_manifests" not in p.parts]
    n_campaign = sum(map(len, campaign))
    add("write the campaign CSVs (polars write_csv)", f"{n_campaign:,} rows", n_campaign,
        "rows/s", lambda: [frame.write_csv() for frame in campaign])
    written = [p.read_bytes() for p in _output_files(out)]
    n_written = sum(map(len, written))
    add("md5 of the output files (manifests)", f"{len(written)} files, {n_written / MB:.0f} MB",
        n_written / MB, "MB/s", lambda: [hashlib.md5(b).hexdigest() for b in written])
    return rows, {"folder": folder, "outputs": out, "input_lines": input_lines(data),
                  "emails": composition}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("bench-data"),
                        help="root of bench_pipeline.py's data sets (its --data)")
    parser.add_argument("--lines", type=int, default=2_000_000,
                        help="the email workload's --lines (selects the data set)")
    parser.add_argument("--profiles", type=int, help="default: lines / 2, as bench_pipeline")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs per primitive")
    parser.add_argument("--outputs", type=Path,
                        help="`out` folder of a pipeline run over this data set (default: the "
                             "newest `runs/*/pipeline/out` kept by bench_pipeline --keep)")
    parser.add_argument("--scale-lines", type=int,
                        help="report CPU seconds for a workload of this many lines "
                             "(default: --lines)")
    args = parser.parse_args(argv)
    args.profiles = args.profiles or max(args.lines // 2, 1)
    scale_lines = args.scale_lines or args.lines
    code = _code_version()
    print(f"polars threads: {pl.thread_pool_size()}; code {code}", flush=True)
    rows, info = measure(args)
    scale = scale_lines / info["input_lines"]
    table = [["primitive", "input", "CPU s", "wall s", "per core",
              f"for {scale_lines / 1e6:g}M lines: CPU s"]]
    for row in rows:
        table.append([row.name + (" (ref)" if row.ref else ""), row.size, f"{row.cpu_s:.3f}",
                      f"{row.wall_s:.3f}", f"{row.amount / row.cpu_s:,.0f} {row.unit}",
                      f"{row.cpu_s * scale:.2f}"])
    floor = sum(row.cpu_s for row in rows if not row.ref) * scale
    print(f"\ndata: {info['folder']} ({info['input_lines']:,} input lines); outputs: "
          f"{info['outputs']}; best of {args.repeat}")
    print(_fmt_table(table))
    print(f"SHA-256 rows: {info['emails']}")
    print(f"\nfloor CPU seconds for the {scale_lines / 1e6:g}M-line email workload (rows "
          f"without ref): {floor:.2f} s; over 2 cores: {floor / 2:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
