"""A lean DuckDB script for the "email" workload: the baseline a data engineer would write.

Run: .venv/bin/python benchmarks/duckdb_email.py --config FILE [--json]

Written for what that workload holds (email feeds that are `encrypted` (AES-GCM), `sha256`
(hex) or `plain`; a `campaign_list` CSV and an `aam_inbound` email_sha256 destination whose
segments map one to one to traits) and no more: SQL for everything except AES-GCM, which
is a plain Python loop over the encrypted column only. It skips what the outputs do not need
(md5 and line-count checks, manifests, Base64 digests, reject thresholds, sorting the files).
It does not import `pipeline`. Prints the same JSON counts as `run_pipeline.py run --json`.
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

import duckdb
import pyarrow as pa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

EMAIL_RE = r"[^@\s\p{Cc}]+@[^@.\s\p{Cc}]+(?:\.[^@.\s\p{Cc}]+)+"
TIMES: dict[str, float] = {}


def timed(name: str, con: duckdb.DuckDBPyConnection, sql: str) -> None:
    start = time.perf_counter()
    con.execute(sql)
    TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - start


def decrypt_all(tokens: list[str | None], key: bytes) -> list[str | None]:
    aead = AESGCM(key)
    out: list[str | None] = []
    for token in tokens:
        try:
            raw = base64.b64decode(token)
            out.append(aead.decrypt(raw[:12], raw[12:], None).decode())
        except Exception:  # noqa: BLE001 - not Base64, too short, bad tag, not UTF-8, None
            out.append(None)
    return out


def run_delivery(con: duckdb.DuckDBPyConnection, feed: dict, info: Path, cfg: dict,
                 key: bytes | None) -> dict:
    doc = json.loads(info.read_text())
    root = info.name[: -len(".info")]
    files = sorted(doc["Files"], key=lambda e: e["FileSequenceNumber"])
    reads = " UNION ALL ".join(
        f"SELECT {n}::UTINYINT AS file_seq, '{e['FileName']}' AS file, "
        f"ordinality::UINTEGER AS line_no, line FROM read_csv('{info.parent / e['FileName']}', "
        "columns={'line': 'VARCHAR'}, delim='\\x01', quote='', escape='', header=false, "
        "auto_detect=false) WITH ORDINALITY" for n, e in enumerate(files, start=1))
    timed("read + parse", con, f"""
    CREATE OR REPLACE TABLE parsed AS
    WITH f AS (SELECT *, string_split(line, ' ') AS fs FROM ({reads}) WHERE line <> '')
    SELECT file_seq, file, line_no, line, fs[1] AS user_id,
        CASE WHEN fs[1] = '' THEN 'no_user_id'
             WHEN len(fs) > 3 THEN 'too_many_fields'
             WHEN coalesce(fs[2], '') = '' AND coalesce(fs[3], '') = '' THEN 'no_segments'
             WHEN NOT regexp_full_match(coalesce(fs[2], '') || ' ' || coalesce(fs[3], ''),
                                        '([0-9]+(,[0-9]+)*)? ?([0-9]+(,[0-9]+)*)?')
                  THEN 'bad_segment' END AS err,
        CASE WHEN err IS NULL THEN string_split(nullif(fs[2], ''), ',')::UINTEGER[] END AS added,
        CASE WHEN err IS NULL THEN string_split(nullif(fs[3], ''), ',')::UINTEGER[] END AS removed
    FROM f
    """)
    encoding = feed.get("id_encoding", "plain")

    def email(v: str) -> str:
        return f"CASE WHEN regexp_full_match(lower(trim({v})), '{EMAIL_RE}') " \
               f"THEN sha256(lower(trim({v}))) END"

    source = "parsed"
    if encoding == "encrypted":
        start = time.perf_counter()
        table = con.sql("SELECT * FROM parsed").to_arrow_table()
        plain = decrypt_all(table["user_id"].to_pylist(), key)
        con.register("parsed_dec", table.append_column("dec", pa.array(plain, pa.string())))
        TIMES["decrypt (python)"] = TIMES.get("decrypt (python)", 0.0) + \
            time.perf_counter() - start
        source = "parsed_dec"
        key_sql, fail = email("dec"), "dec IS NULL"
    elif encoding == "sha256":
        key_sql = "CASE WHEN regexp_full_match(user_id, '[0-9A-Fa-f]{64}') THEN lower(user_id) END"
        fail = "false"
    else:
        key_sql, fail = email("user_id"), "false"
    timed("resolve + join", con, f"""
    CREATE OR REPLACE TABLE joined AS
    WITH r AS (SELECT *, CASE WHEN err IS NULL THEN {key_sql} END AS key,
                      CASE WHEN err IS NULL THEN {fail} END AS dec_fail FROM {source})
    SELECT r.file_seq, r.file, r.line_no, r.line, r.added, r.removed, r.key,
        coalesce(err, CASE WHEN dec_fail THEN 'decrypt_failure'
                           WHEN r.key IS NULL THEN 'invalid_id' END) AS reason,
        k.profile_id, k.suppressed
    FROM r LEFT JOIN keys k ON k.key = r.key
    """)
    if source != "parsed":
        con.unregister(source)
    n = con.execute("""
        SELECT count(*), count(*) FILTER (reason NOT IN ('invalid_id', 'decrypt_failure')),
            count(*) FILTER (reason = 'invalid_id'), count(*) FILTER (reason = 'decrypt_failure'),
            count(profile_id) FILTER (reason IS NULL),
            count(*) FILTER (reason IS NULL AND profile_id IS NULL),
            count(*) FILTER (reason IS NULL AND suppressed)
        FROM joined""").fetchone()
    names = ("records_received", "format_errors", "invalid_ids", "decrypt_failures",
             "matched", "unmatched", "suppressed")
    report = {"feed": feed["name"], "delivery": root, **dict(zip(names, n, strict=True)),
              "rows_written": {}}
    quarantine = Path(cfg["state"]["location"]) / "quarantine" / feed["name"] / f"{root}.csv"
    quarantine.parent.mkdir(parents=True, exist_ok=True)
    timed("quarantine", con, f"COPY (SELECT file, line_no, reason, line FROM joined "
                             f"WHERE reason IS NOT NULL) TO '{quarantine}' (HEADER)")
    timed("audience", con, """
    CREATE OR REPLACE TABLE audience AS
    WITH m AS (
        SELECT profile_id, key, unnest(added) AS segment_id,
               (file_seq::UBIGINT << 34) | (line_no::UBIGINT << 1) AS ord
        FROM joined WHERE profile_id IS NOT NULL AND NOT suppressed
        UNION ALL
        SELECT profile_id, key, unnest(removed),
               (file_seq::UBIGINT << 34) | (line_no::UBIGINT << 1) | 1
        FROM joined WHERE profile_id IS NOT NULL AND NOT suppressed
    )
    SELECT profile_id, key, segment_id, max(ord) & 1 = 1 AS removal FROM m
    GROUP BY profile_id, key, segment_id
    """)
    rows = con.execute("SELECT count(*) FROM audience").fetchone()[0]
    ts = int(root.rsplit("_", 1)[1]) // 1000
    for dest in cfg["destinations"]:
        target = Path(dest["target"])
        if dest["kind"] == "campaign_list":
            out = target / feed["name"] / f"{root}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)
            timed("campaign csv", con, f"""
            COPY (SELECT profile_id, segment_id::BIGINT AS segment_id,
                         CASE WHEN removal THEN 'remove' ELSE 'add' END AS action,
                         'email' AS matched_on, '{root}' AS delivery FROM audience)
            TO '{out}' (HEADER)""")
        else:
            traits = ", ".join(f"({int(s)}, {int(t)})" for s, t in dest["segments"].items())
            day = datetime.fromtimestamp(ts, tz=UTC).date().isoformat()
            # The pipeline's name: split slot = 6 digits of sha256("<feed>/<root>") + part.
            digest = hashlib.sha256(f"{feed['name']}/{root}".encode()).digest()
            slot = (100_000 + int.from_bytes(digest[:8], "big") % 900_000) * 1000 + 1
            out = target / f"date={day}" / f"ftp_dpm_{dest['dpid']}_{ts}.sync.{slot}.gz"
            out.parent.mkdir(parents=True, exist_ok=True)
            timed("aam inbound", con, f"""
            COPY (SELECT a.key, string_agg(CASE WHEN removal THEN 'd_unsid=' ELSE 'd_sid=' END
                                           || t.trait, ',' ORDER BY removal, t.trait)
                  FROM audience a JOIN (VALUES {traits}) t(segment_id, trait) USING (segment_id)
                  GROUP BY a.key)
            TO '{out}' (HEADER false, DELIMITER '\t', QUOTE '', COMPRESSION gzip)""")
        report["rows_written"][dest["name"]] = rows
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.perf_counter()
    cfg = tomllib.loads(args.config.read_text())
    con = duckdb.connect()
    snap = cfg["profiles"]["snapshot"]
    timed("profile keys", con, f"""
    CREATE TABLE keys AS
    SELECT sha256(e) AS key, min(profile_id) AS profile_id,
           arg_min(coalesce(opt_out, false) OR coalesce(blacklisted, false), profile_id)
               AS suppressed
    FROM (SELECT profile_id, lower(trim(email)) AS e, opt_out, blacklisted
          FROM read_parquet('{snap}'))
    WHERE regexp_full_match(e, '{EMAIL_RE}') GROUP BY e
    """)
    reports = []
    for feed in cfg["feeds"]:
        key = bytes.fromhex(os.environ[feed["key_env"]]) if "key_env" in feed else None
        for info in sorted(Path(feed["source"]).glob("*.info")):
            reports.append(run_delivery(con, feed, info, cfg, key))
    totals = {k: sum(r[k] for r in reports) for k in reports[0] if isinstance(reports[0][k], int)}
    TIMES["total"] = time.perf_counter() - start
    if args.json:
        print(json.dumps({"totals": totals, "deliveries": reports, "steps": TIMES}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
