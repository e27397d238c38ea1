"""PGP-encrypted delivery vs the same delivery in plaintext: decryption throughput and peak RSS.

1. Data: one AAM delivery of `--size-mb` MB of plaintext (ECID lines with ten segments, one
   split file, `.info`), and the same delivery as a partner sends it: `gpg --encrypt --sign`
   (compression off by default, so the encrypted file is as large as the plaintext;
   `--compress` keeps gpg's default ZIP).
2. `gpg --decrypt` alone, encrypted file -> /dev/null: raw decryption throughput.
3. Ingest, in a fresh process per side: every chunk of the delivery through
   `ingest.read_chunks` (plaintext; or decrypted through gpg's pipe): wall time, MB/s, peak
   RSS of that process (`wait4`), and gpg's own peak RSS (sampled with psutil).
4. With `--pipeline`: `run_pipeline.py run` on each delivery (a 200k-profile snapshot), in a
   fresh process each: wall time and peak RSS, and the Campaign lists must be equal.
5. While each encrypted side runs, the work folders are scanned every 0.2 s: the largest
   file seen there is reported (the plaintext must never appear on disk).

    .venv/bin/python benchmarks/bench_pgp.py --size-mb 1024 [--pipeline] [--data DIR]

One JSON record per run is appended to `DIR/results.jsonl`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from localdev.pgp_keys import make_party  # noqa: E402
from pipeline.formats import InfoEntry, render_info  # noqa: E402

DELIVERY = "ftp_1234_5678_iter_1486140844000"
LINES_PER_BLOCK = 1_000_000
SEGMENTS = "111,112,113,114,115,116,117,118,119,120 121"


def ecids(start: int, stop: int) -> pl.Expr:
    return pl.format("1{}", pl.int_range(start, stop).cast(pl.String).str.zfill(37))


def write_plain(folder: Path, size_mb: int) -> int:
    """`<root>-1.sync` of at least size_mb MB; returns its line count."""
    folder.mkdir(parents=True, exist_ok=True)
    path, lines = folder / f"{DELIVERY}-1.sync", 0
    with open(path, "wb") as fh:
        while fh.tell() < size_mb << 20:
            frame = pl.select(line=pl.format("{} {}", ecids(lines, lines + LINES_PER_BLOCK),
                                             pl.lit(SEGMENTS)))
            fh.write(("\n".join(frame["line"].to_list()) + "\n").encode())
            lines += frame.height
    _info(folder, path, lines)
    return lines


def _info(folder: Path, path: Path, lines: int) -> None:
    md5 = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(8 << 20):
            md5.update(block)
    entry = InfoEntry(path.name, path.stat().st_size, lines, 1, md5.hexdigest())
    (folder / f"{DELIVERY}.info").write_text(render_info([entry], DELIVERY))


def snapshot(path: Path, profiles: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.select(profile_id=pl.format("P{}", pl.int_range(0, profiles)),
              ecid=ecids(0, profiles)).write_parquet(path)


def config(folder: Path, feed: Path, keys: dict | None) -> Path:
    pgp = ""
    if keys:
        pgp = (f'pgp_secret_key_file = "{keys["us"].secret}"\n'
               f'pgp_signer_key_file = "{keys["partner"].public}"\n')
    path = folder / "pipeline.toml"
    path.write_text(f"""
[state]
location = "{folder}/state"
[profiles]
snapshot = "{folder.parent}/profiles/snapshot.parquet"
[[feeds]]
name = "ecids"
source = "{feed}"
id_type = "ecid"
{pgp}
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{folder}/out"
""")
    return path


INGEST = """
import json, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from pipeline.pgp import Decryptor, Keyring
from pipeline.stages.ingest import find_deliveries, read_chunks
from pipeline.stores import open_store
feed = open_store({feed!r})
decryptor, ring = None, None
if {keys!r}:
    ring = Keyring(Path({work!r}), "ring")
    ring.import_key({secret!r}, "k", secret=True)
    decryptor = Decryptor(ring, None, frozenset(ring.import_key({signer!r}, "s")))
import threading, psutil
gpg_rss, done = [0], threading.Event()
def watch():  # gpg's own RSS, sampled: rusage of children would count the forking parent
    me = psutil.Process()
    while not done.wait(0.05):
        for child in me.children():
            try:
                if child.name() == "gpg":
                    gpg_rss[0] = max(gpg_rss[0], child.memory_info().rss)
            except psutil.Error:
                pass
threading.Thread(target=watch, daemon=True).start()
start, rows = time.perf_counter(), 0
for chunk in read_chunks(feed, find_deliveries(feed, "ecids")[0], decryptor=decryptor):
    rows += chunk.height
seconds = time.perf_counter() - start
done.set()
if ring:
    ring.close()
print(json.dumps({{"rows": rows, "seconds": seconds, "gpg_peak_rss_mb": gpg_rss[0] / 2**20}}))
"""


def measured(cmd: list[str], watch: list[Path]) -> dict:
    """Run a child; wall time, its own peak RSS and its children's (gpg), the largest file
    seen under `watch` while it ran."""
    largest = [0]
    done = threading.Event()

    def scan() -> None:
        while not done.wait(0.2):
            for folder in watch:
                for path in folder.rglob("*") if folder.exists() else ():
                    try:
                        if path.is_file():
                            largest[0] = max(largest[0], path.stat().st_size)
                    except OSError:
                        pass

    watcher = threading.Thread(target=scan, daemon=True)
    watcher.start()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    done.set()
    watcher.join()
    if status != 0:
        raise SystemExit(f"{cmd[:3]} failed with status {status}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "largest_work_file_mb": round(largest[0] / 2**20, 2), "stdout": out.decode()}


def ingest(feed: Path, work: Path, keys: dict | None) -> dict:
    code = INGEST.format(root=str(ROOT), feed=str(feed), work=str(work), keys=bool(keys),
                         secret=str(keys["us"].secret) if keys else "",
                         signer=str(keys["partner"].public) if keys else "")
    result = measured([sys.executable, "-c", code], [work])
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    return result


def gpg_alone(party, signer, sealed: Path) -> dict:
    party.import_public(signer)  # else the unchecked signature makes gpg exit 2
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", "gpg", "--homedir", str(party.home),
                           "--batch", "--quiet", "--decrypt", "--output", "/dev/null",
                           str(sealed)], capture_output=True, check=True)
    wall = time.perf_counter() - start
    return {"wall_s": round(wall, 2), "mb_per_s": round(sealed.stat().st_size / 2**20 / wall, 1),
            "gpg_peak_rss_mb": round(int(done.stderr.split()[-1]) / 1024, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--data", default=str(ROOT / "bench-data" / "pgp"))
    parser.add_argument("--compress", action="store_true")
    parser.add_argument("--pipeline", action="store_true")
    parser.add_argument("--profiles", type=int, default=200_000)
    args = parser.parse_args()
    data = Path(args.data) / f"{args.size_mb}mb{'-z' if args.compress else ''}"
    shutil.rmtree(data, ignore_errors=True)
    plain, sealed_dir = data / "feed-plain", data / "feed-pgp"
    t = time.perf_counter()
    lines = write_plain(plain, args.size_mb)
    keys = {name: make_party(data / "keys", name) for name in ("us", "partner")}
    sealed_dir.mkdir()
    plain_file = plain / f"{DELIVERY}-1.sync"
    sealed = sealed_dir / f"{DELIVERY}-1.sync.pgp"
    keys["partner"].encrypt_file(plain_file, sealed, keys["us"], sign=True,
                                 compress=args.compress)
    _info(sealed_dir, sealed, lines)
    print(f"data: {lines} lines, {plain_file.stat().st_size >> 20} MB plain, "
          f"{sealed.stat().st_size >> 20} MB encrypted ({time.perf_counter() - t:.0f} s)",
          file=sys.stderr)
    record = {"size_mb": args.size_mb, "lines": lines, "compress": args.compress,
              "encrypted_mb": round(sealed.stat().st_size / 2**20, 1),
              "gpg_decrypt_alone": gpg_alone(keys["us"], keys["partner"], sealed)}
    print("gpg alone", record["gpg_decrypt_alone"], file=sys.stderr)
    for side, feed, side_keys in (("plain", plain, None), ("pgp", sealed_dir, keys)):
        work = data / f"work-{side}"
        record[f"ingest_{side}"] = ingest(feed, work, side_keys)
        record[f"ingest_{side}"]["mb_per_s"] = round(
            args.size_mb / record[f"ingest_{side}"]["seconds"], 1)
        print(f"ingest {side}", record[f"ingest_{side}"], file=sys.stderr)
    if args.pipeline:
        snapshot(data / "profiles" / "snapshot.parquet", args.profiles)
        for side, feed, side_keys in (("plain", plain, None), ("pgp", sealed_dir, keys)):
            folder = data / f"run-{side}"
            folder.mkdir()
            cfg = config(folder, feed, side_keys)
            env_tmp = folder / "tmp"
            env_tmp.mkdir()
            os.environ["TMPDIR"] = str(env_tmp)  # the run's work folder lands here: watched
            record[f"pipeline_{side}"] = measured(
                [sys.executable, "run_pipeline.py", "run", "--config", str(cfg), "--json"],
                [env_tmp])
            report = json.loads(record[f"pipeline_{side}"].pop("stdout"))
            record[f"pipeline_{side}"]["totals"] = report["totals"]
            print(f"pipeline {side}", record[f"pipeline_{side}"], file=sys.stderr)
        a = (data / "run-plain/out/ecids" / f"{DELIVERY}.csv").read_bytes()
        b = (data / "run-pgp/out/ecids" / f"{DELIVERY}.csv").read_bytes()
        record["outputs_equal"] = a == b
    for party in keys.values():
        party.close()
    with open(Path(args.data) / "results.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
