"""A lean in-memory polars script for the "email" workload: the product's own stack without
the product.

Run: .venv/bin/python benchmarks/polars_email.py --config FILE

Same inputs, outputs and JSON counts as `duckdb_email.py`, written the way a data engineer
would with polars instead of DuckDB: every delivery read whole into memory, a plain Python
AES-GCM loop over the encrypted column, `polars-hash` SHA-256, one join, one group-by, a
polars CSV and an ISA-L gzip (level 1, as the pipeline). No spill files, no feed membership,
no ledger, no md5 or line-count checks, no manifests: it shows what polars itself costs for
this work, so the pipeline's distance to the DuckDB script can be split into "the stack" and
"the product". It does not import `pipeline`. `bench_pipeline.py --reference polars` runs it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
import time
import tomllib
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import polars_hash as plh
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from isal import igzip

EMAIL_RE = r"^[^@\s\p{Cc}]+@[^@.\s\p{Cc}]+(?:\.[^@.\s\p{Cc}]+)+$"
SEGMENTS_RE = r"^([0-9]+(,[0-9]+)*)? ?([0-9]+(,[0-9]+)*)?$"
TIMES: dict[str, float] = {}


def timed(name: str, start: float) -> float:
    now = time.perf_counter()
    TIMES[name] = TIMES.get(name, 0.0) + now - start
    return now


def email_key(value: pl.Expr) -> pl.Expr:
    email = value.str.strip_chars().str.to_lowercase()
    return pl.when(email.str.contains(EMAIL_RE)).then(
        plh.CryptographicHashingNameSpace(email).sha2_256())


def decrypt_all(tokens: list[str | None], key: bytes) -> list[str | None]:
    aead = AESGCM(key)
    out: list[str | None] = []
    for token in tokens:
        try:
            raw = base64.b64decode(token or "")
            out.append(aead.decrypt(raw[:12], raw[12:], None).decode())
        except Exception:  # noqa: BLE001 - not Base64, too short, bad tag, not UTF-8, None
            out.append(None)
    return out


def read_lines(info: Path) -> pl.DataFrame:
    doc = json.loads(info.read_text())
    files = sorted(doc["Files"], key=lambda e: e["FileSequenceNumber"])
    return pl.concat([
        pl.read_csv(info.parent / e["FileName"], has_header=False, separator="\x01",
                    quote_char=None, schema={"line": pl.String})
        .with_row_index("line_no", offset=1)
        .with_columns(file_seq=pl.lit(n, pl.UInt8), file=pl.lit(e["FileName"]))
        for n, e in enumerate(files, start=1)])


def parse(lines: pl.DataFrame) -> pl.DataFrame:
    fields = pl.col("fields")
    added, removed = (fields.list.get(i, null_on_oob=True) for i in (1, 2))
    error = (pl.when(fields.list.first() == "").then(pl.lit("no_user_id"))
             .when(fields.list.len() > 3).then(pl.lit("too_many_fields"))
             .when((added.fill_null("") == "") & (removed.fill_null("") == ""))
             .then(pl.lit("no_segments"))
             .when(~(added.fill_null("") + " " + removed.fill_null("")).str.contains(
                 SEGMENTS_RE)).then(pl.lit("bad_segment")))

    def segments(text: pl.Expr) -> pl.Expr:
        return pl.when(pl.col("err").is_null()).then(
            pl.when(text != "").then(text).str.split(",").cast(pl.List(pl.UInt32)))

    return (lines.filter(pl.col("line") != "")
            .with_columns(fields=pl.col("line").str.split(" "))
            .with_columns(user_id=fields.list.first(), err=error)
            .with_columns(added=segments(added), removed=segments(removed))
            .drop("fields"))


def run_delivery(keys: pl.DataFrame, feed: dict, info: Path, cfg: dict,
                 key: bytes | None) -> dict:
    start = time.perf_counter()
    root = info.name[: -len(".info")]
    parsed = parse(read_lines(info))
    start = timed("read + parse", start)
    encoding = feed.get("id_encoding", "plain")
    failed = pl.lit(False)
    if encoding == "encrypted":
        assert key is not None
        plain = decrypt_all(parsed.get_column("user_id").to_list(), key)
        parsed = parsed.with_columns(dec=pl.Series(plain, dtype=pl.String))
        start = timed("decrypt (python)", start)
        id_key, failed = email_key(pl.col("dec")), pl.col("dec").is_null()
    elif encoding == "sha256":
        user = pl.col("user_id")
        id_key = pl.when(user.str.contains(r"^[0-9A-Fa-f]{64}$")).then(user.str.to_lowercase())
    else:
        id_key = email_key(pl.col("user_id"))
    ok = pl.col("err").is_null()
    joined = (parsed.lazy()
              .with_columns(key=pl.when(ok).then(id_key), dec_fail=pl.when(ok).then(failed))
              .join(keys.lazy(), on="key", how="left")
              .with_columns(reason=pl.coalesce(
                  "err", pl.when(pl.col("dec_fail")).then(pl.lit("decrypt_failure"))
                  .when(pl.col("key").is_null()).then(pl.lit("invalid_id"))))
              .collect())
    start = timed("resolve + join", start)
    reason, found = pl.col("reason"), pl.col("profile_id").is_not_null()
    counts = joined.select(
        records_received=pl.len(),
        format_errors=(reason.is_not_null()
                       & ~reason.is_in(["invalid_id", "decrypt_failure"])).sum(),
        invalid_ids=(reason == "invalid_id").sum(),
        decrypt_failures=(reason == "decrypt_failure").sum(),
        matched=(reason.is_null() & found).sum(),
        unmatched=(reason.is_null() & ~found).sum(),
        suppressed=(reason.is_null() & pl.col("suppressed").fill_null(False)).sum(),
    ).row(0, named=True)
    report = {"feed": feed["name"], "delivery": root, **{k: int(v) for k, v in counts.items()},
              "rows_written": {}}
    quarantine = Path(cfg["state"]["location"]) / "quarantine" / feed["name"] / f"{root}.csv"
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    joined.filter(reason.is_not_null()).select("file", "line_no", "reason", "line").write_csv(
        quarantine)
    start = timed("quarantine", start)
    mentions = joined.lazy().filter(found & ~pl.col("suppressed"))
    order = pl.col("file_seq").cast(pl.UInt64) * (1 << 34) + pl.col("line_no").cast(pl.UInt64) * 2
    audience = (pl.concat([
        mentions.select("profile_id", "key", segment_id=pl.col("added"), ord=order),
        mentions.select("profile_id", "key", segment_id=pl.col("removed"), ord=order + 1)])
        .explode("segment_id").drop_nulls("segment_id")
        .group_by("profile_id", "key", "segment_id")
        .agg(removal=pl.col("ord").max() % 2 == 1)
        .collect())
    start = timed("audience", start)
    ts = int(root.rsplit("_", 1)[1]) // 1000
    for dest in cfg["destinations"]:
        if dest["kind"] == "campaign_list":
            out = Path(dest["target"]) / feed["name"] / f"{root}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            audience.select(
                "profile_id", pl.col("segment_id").cast(pl.Int64),
                action=pl.when("removal").then(pl.lit("remove")).otherwise(pl.lit("add")),
                matched_on=pl.lit("email"), delivery=pl.lit(root)).write_csv(out)
            start = timed("campaign csv", start)
        else:
            write_inbound(audience, dest, feed["name"], root, ts)
            start = timed("aam inbound", start)
        report["rows_written"][dest["name"]] = audience.height
    return report


def write_inbound(audience: pl.DataFrame, dest: dict, feed: str, root: str, ts: int) -> None:
    traits = pl.DataFrame({"segment_id": [int(s) for s in dest["segments"]],
                           "trait": [int(t) for t in dest["segments"].values()]},
                          schema={"segment_id": pl.UInt32, "trait": pl.Int64})
    day = datetime.fromtimestamp(ts, tz=UTC).date().isoformat()
    # The pipeline's name: split slot = 6 digits of sha256("<feed>/<root>") + part.
    digest = hashlib.sha256(f"{feed}/{root}".encode()).digest()
    slot = (100_000 + int.from_bytes(digest[:8], "big") % 900_000) * 1000 + 1
    out = Path(dest["target"]) / f"date={day}" / f"ftp_dpm_{dest['dpid']}_{ts}.sync.{slot}.gz"
    out.parent.mkdir(parents=True, exist_ok=True)
    signal = (pl.when(pl.col("removal")).then(pl.lit("d_unsid=")).otherwise(pl.lit("d_sid="))
              + pl.col("trait").cast(pl.String))
    lines = (audience.lazy().join(traits.lazy(), on="segment_id")
             .sort("key", "removal", "trait")
             .group_by("key", maintain_order=True).agg(signals=signal.str.join(","))
             .select(pl.col("key") + "\t" + pl.col("signals"))
             .collect().to_series())
    with igzip.open(out, "wb", compresslevel=1) as fh:
        fh.write((lines.str.join("\n").item() + "\n").encode())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--json", action="store_true", help="(always JSON; for bench_pipeline)")
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = tomllib.loads(args.config.read_text())
    suppressed = pl.col("opt_out").fill_null(False) | pl.col("blacklisted").fill_null(False)
    keys = (pl.scan_parquet(cfg["profiles"]["snapshot"])
            .select("profile_id", key=email_key(pl.col("email")), suppressed=suppressed)
            .drop_nulls("key").sort("profile_id")
            .group_by("key").agg(pl.col("profile_id").first(), pl.col("suppressed").first())
            .collect())
    timed("profile keys", start)
    reports = []
    for feed in cfg["feeds"]:
        key = bytes.fromhex(os.environ[feed["key_env"]]) if "key_env" in feed else None
        for info in sorted(Path(feed["source"]).glob("*.info")):
            reports.append(run_delivery(keys, feed, info, cfg, key))
    totals = {k: sum(r[k] for r in reports) for k in reports[0] if isinstance(reports[0][k], int)}
    TIMES["total"] = time.perf_counter() - start
    print(json.dumps({"totals": totals, "deliveries": reports, "steps": TIMES}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
