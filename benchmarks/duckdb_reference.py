"""Reference implementation of the pipeline's work in DuckDB SQL: the benchmark's baseline.

Run: .venv/bin/python benchmarks/duckdb_reference.py --config FILE [--json]

It reads the same TOML config as `run_pipeline.py run` (local feeds, local snapshot file,
local destinations) and does the same work per delivery, oldest first:
verify the `.info` (sizes, md5, line counts), read the gzip lines with `read_csv` (one
column), parse and validate segment lists, resolve IDs (hash shapes, AES-GCM decryption in
Python batches over the distinct candidate tokens only, email/ECID/CRM normalization and
`sha256()` in SQL, phone numbers through `phonenumbers` once per distinct value), join the
profile keys (smallest profile_id wins per key), apply governance, merge segments (later
line wins, removal wins within a line), and write the `campaign_list` CSV, the
`aam_inbound` files, the quarantine CSV and a manifest per destination.
It prints a JSON report (counts per delivery) on stdout and step timings on stderr.

Not covered (the benchmark does not exercise them): S3/SFTP stores, dated snapshot
partitions, AES-CBC, Parquet output, no-profile contacts, ledger and reruns, `\\r\\n` line
ends and bad UTF-8 (DuckDB's CSV reader handles these differently from the pipeline).
It does not import `pipeline`: it is an independent implementation of SPEC §2-§6.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import phonenumbers
import pyarrow as pa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

EMAIL_RE = r"[^@\s\p{Cc}]+@[^@.\s\p{Cc}]+(?:\.[^@.\s\p{Cc}]+)+"
WS = " \t\n\r\x0b\x0c"  # trim(x, chars) is slow: macros only call it when needed
BATCH = 262_144  # rows per Python batch (decryption, phone parsing)
ROOT_TS = re.compile(r"_(\d{13})$")


# --------------------------------------------------------------------------------------------
# Config (the subset of the pipeline's TOML this reference supports)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feed:
    name: str
    folder: Path
    id_type: str
    id_kind: str
    encoding: str
    country: str | None
    key: bytes | None = field(default=None, repr=False)
    max_reject_ratio: float = 0.05

    @property
    def kind(self) -> str:
        return "ecid" if self.id_type == "ecid" else self.id_kind


@dataclass(frozen=True)
class Dest:
    name: str
    kind: str
    target: Path
    segments: dict[int, int] | tuple[int, ...] | None
    dpid: int = 0
    id: str = "email_sha256"
    gzip: bool = False
    max_lines_per_file: int = 5_000_000


@dataclass(frozen=True)
class Settings:
    state: Path
    snapshot: Path
    country: str | None
    feeds: list[Feed]
    dests: list[Dest]


def load_settings(path: Path, env: dict[str, str]) -> Settings:
    raw = tomllib.loads(path.read_text())
    base = path.parent

    def local(p: str) -> Path:
        return (base / Path(p).expanduser()).resolve()

    country = raw["profiles"].get("default_country")
    feeds = []
    for f in raw["feeds"]:
        encoding = f.get("id_encoding", "plain")
        key = None
        if encoding in ("encrypted", "auto"):
            if f.get("decryption") != "aes-gcm":
                raise SystemExit("reference: only aes-gcm decryption is implemented")
            key = _load_key(env[f["key_env"]])
        feeds.append(Feed(
            name=f["name"], folder=local(f["source"]), id_type=f.get("id_type", "declared"),
            id_kind=f.get("id_kind", "email"), encoding=encoding,
            country=f.get("default_country") or country, key=key,
            max_reject_ratio=float(f.get("max_reject_ratio", 0.05)),
        ))
    dests = []
    for d in raw.get("destinations", []):
        segs = d.get("segments")
        if d["kind"] == "aam_inbound":
            segs = {int(k): int(v) for k, v in segs.items()}
        elif segs is not None:
            segs = tuple(int(s) for s in segs)
        if d["kind"] not in ("campaign_list", "aam_inbound") or d.get("format", "csv") != "csv":
            raise SystemExit(f"reference: destination {d['name']} is not supported")
        dests.append(Dest(
            name=d["name"], kind=d["kind"], target=local(d["target"]), segments=segs,
            dpid=int(d.get("dpid", 0)), id=d.get("id", "email_sha256"),
            gzip=bool(d.get("gzip", False)),
            max_lines_per_file=int(d.get("max_lines_per_file", 5_000_000)),
        ))
    return Settings(local(raw["state"]["location"]), local(raw["profiles"]["snapshot"]),
                    country, feeds, dests)


def _load_key(value: str) -> bytes:
    text = value.strip()
    if len(text) in (32, 48, 64) and re.fullmatch(r"[0-9A-Fa-f]+", text):
        return bytes.fromhex(text)
    raw = _b64(text)
    if raw is None or len(raw) not in (16, 24, 32):
        raise SystemExit("reference: key must be hex or Base64 of 16/24/32 bytes")
    return raw


def _b64(text: str) -> bytes | None:
    """Standard or URL-safe Base64, padding optional (SPEC §3)."""
    text = text.strip().replace("-", "+").replace("_", "/")
    if not text.endswith("="):
        if len(text) % 4 == 1:
            return None
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Python batches: the two things SQL cannot do (AES-GCM, libphonenumber)
# --------------------------------------------------------------------------------------------


def gcm_decryptor(key: bytes, min_plain: int = 0) -> Callable[[str], str | None]:
    """Token -> plaintext or None. With `min_plain`, tokens too short to hold a valid ID
    are skipped without trying AES (used under `auto`, where only a valid ID counts)."""
    aead = AESGCM(key)

    def one(token: str) -> str | None:
        raw = _b64(token)
        if raw is None or len(raw) < 28 + min_plain:
            return None
        try:
            return aead.decrypt(raw[:12], raw[12:], None).decode("utf-8")
        except (InvalidTag, UnicodeDecodeError):
            return None

    return one


def e164(number: str | None, region: str | None) -> str | None:
    if not number:
        return None
    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return None
    if not (phonenumbers.is_possible_number(parsed) and phonenumbers.is_valid_number(parsed)):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def map_in_python(con: duckdb.DuckDBPyConnection, query: str, name: str,
                  func: Callable[..., str | None]) -> None:
    """Register `name(v..., out)`: `func` over the rows of `query` (distinct values),
    streamed in Arrow record batches so Python never holds all values at once."""
    reader = con.sql(query).to_arrow_reader(BATCH)
    batches = []
    for batch in reader:
        columns = [batch.column(i).to_pylist() for i in range(batch.num_columns)]
        out = pa.array([func(*args) for args in zip(*columns, strict=True)], pa.string())
        batches.append(pa.RecordBatch.from_arrays([*batch.columns, out],
                                                  names=[*batch.schema.names, "out"]))
    schema = batches[0].schema if batches else pa.schema(
        [*reader.schema, pa.field("out", pa.string())])
    con.register(f"{name}_arrow", pa.Table.from_batches(batches, schema=schema))
    con.execute(f"CREATE OR REPLACE TEMP TABLE {name} AS SELECT * FROM {name}_arrow")
    con.unregister(f"{name}_arrow")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

TIMES: dict[str, float] = {}


@contextmanager
def step(name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        TIMES[name] = TIMES.get(name, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Deliveries
# --------------------------------------------------------------------------------------------


@dataclass
class Delivery:
    feed: Feed
    root: str
    files: list[dict]  # .info entries in sequence order

    @property
    def timestamp_ms(self) -> int:
        m = ROOT_TS.search(self.root)
        return int(m.group(1)) if m else 0

    @property
    def day(self) -> str:
        return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC).date().isoformat()


def find_deliveries(feed: Feed) -> list[Delivery]:
    out = []
    for info in sorted(feed.folder.glob("*.info")):
        doc = json.loads(info.read_text())
        files = sorted(doc["Files"], key=lambda e: e.get("FileSequenceNumber", 0))
        out.append(Delivery(feed, info.name[: -len(".info")], files))
    return sorted(out, key=lambda d: (d.day, d.timestamp_ms, d.root))


def verify(d: Delivery) -> None:
    for entry in d.files:
        path = d.feed.folder / entry["FileName"]
        md5 = hashlib.md5()  # noqa: S324 - AAM control files carry md5
        size = 0
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                md5.update(block)
                size += len(block)
        if size != entry["FileByteSize"] or md5.hexdigest() != entry.get("md5", md5.hexdigest()):
            raise SystemExit(f"reference: {path.name} does not match its control file")


# --------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------

MACROS = f"""
CREATE OR REPLACE MACRO strip_ws(x) AS
    CASE WHEN regexp_matches(x, '^[{WS}]|[{WS}]$') THEN trim(x, '{WS}') ELSE x END;
CREATE OR REPLACE MACRO rstrip_ws(x) AS
    CASE WHEN regexp_matches(x, '[{WS}]$') THEN rtrim(x, '{WS}') ELSE x END;
CREATE OR REPLACE MACRO email_norm(x) AS
    CASE WHEN regexp_full_match(nfc_normalize(lower(strip_ws(x))), '{EMAIL_RE}')
         THEN nfc_normalize(lower(strip_ws(x))) END;
CREATE OR REPLACE MACRO ecid_norm(x) AS
    CASE WHEN regexp_full_match(strip_ws(x), '[0-9]{{38}}') THEN strip_ws(x) END;
CREATE OR REPLACE MACRO crm_norm(x) AS
    CASE WHEN length(strip_ws(x)) > 0 THEN strip_ws(x) END;
CREATE OR REPLACE MACRO incoming_hash(x) AS
    CASE WHEN regexp_full_match(strip_ws(x), '[0-9A-Fa-f]{{64}}') THEN lower(strip_ws(x))
         WHEN regexp_full_match(strip_ws(x), '[A-Za-z0-9+/]{{43}}=')
         THEN lower(hex(from_base64(strip_ws(x)))) END;
CREATE OR REPLACE MACRO seg_list(s) AS
    CASE WHEN s = '' THEN []::VARCHAR[] ELSE string_split(s, ',') END;
CREATE OR REPLACE MACRO seg_bad(s) AS
    NOT regexp_full_match(s, '([0-9]+(,[0-9]+)*)?')
    OR list_count(list_transform(seg_list(s), lambda x: TRY_CAST(x AS UINTEGER)))
       < len(seg_list(s));
"""


def read_lines(con: duckdb.DuckDBPyConnection, d: Delivery) -> None:
    """`parsed`: one row per line (blank ones too, for the line count) with parse results."""
    selects = []
    for seq, entry in enumerate(d.files, start=1):
        path = str(d.feed.folder / entry["FileName"]).replace("'", "''")
        selects.append(
            f"SELECT {seq}::UTINYINT AS file_seq, ordinality::UINTEGER AS line_no, line "
            f"FROM read_csv('{path}', columns={{'line': 'VARCHAR'}}, delim='\\x01', quote='', "
            "escape='', header=false, auto_detect=false, strict_mode=false, "
            "compression='gzip') WITH ORDINALITY")
    con.execute(f"""
    CREATE OR REPLACE TEMP TABLE parsed AS
    WITH lines AS ({" UNION ALL ".join(selects)}),
    f AS (
        SELECT file_seq, line_no, line,
               string_split(rstrip_ws(coalesce(line, '')), ' ') AS fields
        FROM lines
    ),
    s AS (
        SELECT *, coalesce(fields[2], '') AS added_s, coalesce(fields[3], '') AS removed_s FROM f
    ),
    e AS (
        SELECT *,
            CASE WHEN fields = [''] THEN 'blank'
                 WHEN contains(line, '\ufffd') THEN 'bad_utf8'
                 WHEN fields[1] = '' THEN 'no_user_id'
                 WHEN len(fields) > 3 THEN 'too_many_fields'
                 WHEN added_s = '' AND removed_s = '' THEN 'no_segments'
                 WHEN seg_bad(added_s) OR seg_bad(removed_s) THEN 'bad_segment' END AS err
        FROM s
    ),
    l AS (
        SELECT *,
            CASE WHEN err IS NULL THEN seg_list(added_s)::UINTEGER[] END AS added,
            CASE WHEN err IS NULL THEN seg_list(removed_s)::UINTEGER[] END AS removed
        FROM e
    )
    SELECT file_seq, line_no, line, CASE WHEN err IS NULL AND (list_contains(added, 0)
        OR list_contains(removed, 0)) THEN 'segment_zero' ELSE err END AS format_error,
        CASE WHEN err IS NULL THEN fields[1] END AS user_id, added, removed
    FROM l
    """)
    counts = dict(con.execute("SELECT file_seq, count(*) FROM parsed GROUP BY ALL").fetchall())
    for seq, entry in enumerate(d.files, start=1):
        if counts.get(seq, 0) != entry["FileLineCount"]:
            raise SystemExit(f"reference: {entry['FileName']} line count differs")
    con.execute("DELETE FROM parsed WHERE format_error = 'blank'")


def resolve(con: duckdb.DuckDBPyConnection, feed: Feed) -> None:
    """`resolved`: parsed rows with `key` (SHA-256 hex) and `reject` (reason or NULL).

    `auto` per row, as the pipeline does it: a value that decrypts to a valid ID is
    encrypted (even when it has a hash's shape); else a hash shape is a hash; else plain.
    """
    join, decrypted = "", None
    if feed.encoding in ("encrypted", "auto"):
        # Base64-shaped and long enough for nonce + tag; a 64-hex value is a hash, never a
        # token (as in the pipeline: a token's Base64 is all hex digits with p = (1/4)^64).
        shape = ("regexp_full_match(strip_ws(user_id), '[A-Za-z0-9+/_-]+={0,2}') "
                 "AND length(strip_ws(user_id)) >= 38 "
                 "AND NOT regexp_full_match(strip_ws(user_id), '[0-9A-Fa-f]{64}')")
        min_plain = MIN_ID_BYTES[feed.kind] if feed.encoding == "auto" else 0
        with step("decrypt (python)"):
            map_in_python(con, f"SELECT DISTINCT user_id AS v FROM parsed "
                          f"WHERE format_error IS NULL AND {shape}", "dec",
                          gcm_decryptor(feed.key, min_plain))
        join += " LEFT JOIN dec ON dec.v = p.user_id"
        decrypted = "dec.out"
    if feed.kind == "phone":
        values = "SELECT strip_ws(user_id) FROM parsed WHERE format_error IS NULL"
        if decrypted:
            values += " UNION SELECT strip_ws(out) FROM dec WHERE out IS NOT NULL"
        phone_map(con, values, feed.country)
        join += " LEFT JOIN ph AS ph_u ON ph_u.v = strip_ws(p.user_id)"
        if decrypted:
            join += f" LEFT JOIN ph AS ph_d ON ph_d.v = strip_ws({decrypted})"
    norm_user = _normalized(feed.kind, "p.user_id", "ph_u.out")
    norm_dec = _normalized(feed.kind, decrypted, "ph_d.out") if decrypted else "NULL"
    key = {
        "plain": "sha256(norm_user)",
        "sha256": "h",
        "encrypted": "sha256(norm_dec)",
        "auto": "CASE WHEN norm_dec IS NOT NULL THEN sha256(norm_dec) WHEN h IS NOT NULL THEN h "
                "ELSE sha256(norm_user) END",
    }[feed.encoding]
    decrypt_failed = "dec_out IS NULL" if feed.encoding == "encrypted" else "false"
    hashed = "incoming_hash(p.user_id)" if feed.encoding in ("sha256", "auto") else "NULL"
    with step("resolve (sql)"):
        con.execute(f"""
        CREATE OR REPLACE TEMP TABLE resolved AS
        WITH n AS (
            SELECT p.file_seq, p.line_no, p.line, p.format_error, p.added, p.removed,
                   {decrypted or "NULL"} AS dec_out, {hashed} AS h,
                   {norm_user} AS norm_user, {norm_dec} AS norm_dec
            FROM parsed p{join} WHERE p.format_error IS NULL
        ), k AS (
            SELECT *, {key} AS key, {decrypt_failed} AS decrypt_failed FROM n
            UNION ALL
            SELECT file_seq, line_no, line, format_error, added, removed, NULL, NULL, NULL,
                   NULL, NULL, NULL
            FROM parsed WHERE format_error IS NOT NULL
        )
        SELECT file_seq, line_no, added, removed,
            CASE WHEN format_error IS NOT NULL THEN format_error
                 WHEN decrypt_failed THEN 'decrypt_failure'
                 WHEN key IS NULL THEN 'invalid_id' END AS reject,
            CASE WHEN reject IS NULL THEN key END AS key,
            CASE WHEN reject IS NOT NULL THEN line END AS line
        FROM k
        """)
    con.execute("DROP TABLE IF EXISTS dec; DROP TABLE IF EXISTS ph; DROP TABLE parsed")


def phone_map(con: duckdb.DuckDBPyConnection, values: str, region: str | None) -> None:
    """`ph(v, out)`: E.164 of each distinct feed value, reusing the profiles' results.

    As the pipeline does: a (number, region) pair parsed on the profile side is not parsed
    again, and a `+...` number equal to a profile's E.164 result is that result (libphonenumber
    ignores the region then). Only the rest goes to Python.
    """
    known = "EXISTS (SELECT 1 FROM duckdb_tables() WHERE table_name = 'pph')"
    have_profiles = con.execute(f"SELECT {known}").fetchall()[0][0]
    with step("phone parse (python)"):
        con.execute(f"CREATE OR REPLACE TEMP TABLE ph_ask AS SELECT DISTINCT v "
                    f"FROM ({values}) t(v) WHERE v IS NOT NULL")
        if have_profiles:
            con.execute(f"""
            CREATE OR REPLACE TEMP TABLE ph_known AS
            SELECT a.v, coalesce(k.out, e.out) AS out
            FROM ph_ask a
            LEFT JOIN pph k ON k.v = a.v AND k.region IS NOT DISTINCT FROM '{region}'
            LEFT JOIN (SELECT DISTINCT out FROM pph WHERE out IS NOT NULL) e ON e.out = a.v
            WHERE k.v IS NOT NULL OR e.out IS NOT NULL
            """)
        else:
            con.execute("CREATE OR REPLACE TEMP TABLE ph_known AS "
                        "SELECT v, NULL::VARCHAR AS out FROM ph_ask WHERE false")
        map_in_python(con, f"SELECT v, '{region}' AS region FROM ph_ask "
                      "ANTI JOIN ph_known USING (v)", "ph_new", e164)
        con.execute("CREATE OR REPLACE TEMP TABLE ph AS SELECT v, out FROM ph_known "
                    "UNION ALL SELECT v, out FROM ph_new")
        con.execute("DROP TABLE ph_ask; DROP TABLE ph_known; DROP TABLE ph_new")


# Shortest valid ID of each kind in bytes (x@y.z; 38 digits; phones and CRM IDs are left to
# their parsers).
MIN_ID_BYTES = {"email": 5, "ecid": 38, "phone": 1, "crm": 1}


def _normalized(kind: str, value: str, phone: str) -> str:
    """SQL for the normalized ID (NULL when invalid); phones come from the Python map."""
    if kind == "phone":
        return phone
    return {"email": "email_norm", "ecid": "ecid_norm", "crm": "crm_norm"}[kind] + f"({value})"


# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------


def load_profiles(con: duckdb.DuckDBPyConnection, s: Settings, kinds: set[str],
                  dpuuids: set[str]) -> None:
    """`profiles` with the keys some feed or destination needs (schema rules checked)."""
    snap = str(s.snapshot).replace("'", "''")
    con.execute(f"CREATE OR REPLACE TEMP VIEW snap AS SELECT * FROM read_parquet('{snap}')")
    names = {r[0] for r in con.execute("DESCRIBE snap").fetchall()}

    def col(name: str, typ: str = "VARCHAR") -> str:
        return f"CAST({name} AS {typ})" if name in names else f"NULL::{typ}"

    nulls, dups = con.execute(
        "SELECT count(*) - count(profile_id), count(profile_id) - count(DISTINCT profile_id) "
        "FROM snap").fetchall()[0]
    if nulls or dups:
        raise SystemExit("reference: profile_id has nulls or duplicates")
    country = f"upper(strip_ws({col('country')}))"
    if s.country:
        country = f"coalesce({country}, '{s.country}')"
    phone_join, phone_key = "", "NULL::VARCHAR"
    if "phone" in kinds:
        with step("profiles phone parse (python)"):
            map_in_python(con, f"SELECT DISTINCT strip_ws({col('phone')}) AS v, {country} AS "
                          "region FROM snap", "pph", e164)
        phone_join = (f" LEFT JOIN pph ON pph.v IS NOT DISTINCT FROM strip_ws({col('phone')}) "
                      f"AND pph.region IS NOT DISTINCT FROM {country}")
        phone_key = "sha256(pph.out)"
    need_email = "email" in kinds or "email_sha256" in dpuuids
    with step("profiles keys (sql)"):
        con.execute(f"""
        CREATE OR REPLACE TEMP TABLE profiles AS
        SELECT {col('profile_id')} AS profile_id,
            coalesce({col('opt_out', 'BOOLEAN')}, false)
                OR coalesce({col('blacklisted', 'BOOLEAN')}, false) AS suppressed,
            {f"sha256(email_norm({col('email')}))" if need_email else 'NULL'} AS email_key,
            {phone_key} AS phone_key,
            ecid_norm({col('ecid')}) AS ecid, crm_norm({col('crm_id')}) AS crm_id,
            {"sha256(ecid_norm(" + col('ecid') + "))" if "ecid" in kinds else "NULL"} AS ecid_key,
            {"sha256(crm_norm(" + col('crm_id') + "))" if "crm" in kinds else "NULL"} AS crm_key
        FROM snap{phone_join}
        """)
    # `pph` stays: feeds reuse the profiles' results (see phone_map).


def profile_keys(con: duckdb.DuckDBPyConnection, kind: str) -> str:
    """Table of (key, matched_on, profile_id, suppressed); the smallest profile_id per key."""
    name = f"keys_{kind}"
    with step("profiles keys (sql)"):
        con.execute(f"""
        CREATE TEMP TABLE IF NOT EXISTS {name} AS
        SELECT {kind}_key AS key, '{kind}' AS matched_on, min(profile_id) AS profile_id,
               arg_min(suppressed, profile_id) AS suppressed
        FROM profiles WHERE {kind}_key IS NOT NULL GROUP BY {kind}_key
        """)
    return name


# --------------------------------------------------------------------------------------------
# Join, audience, publish
# --------------------------------------------------------------------------------------------


def join_and_count(con: duckdb.DuckDBPyConnection, keys: str) -> dict[str, int]:
    with step("join (sql)"):
        con.execute(f"""
        CREATE OR REPLACE TEMP TABLE joined AS
        SELECT r.file_seq, r.line_no, r.added, r.removed, r.reject,
               k.profile_id, k.matched_on, k.suppressed
        FROM resolved r LEFT JOIN {keys} k ON r.key = k.key
        """)
        row = con.execute("""
        SELECT count(*),
            count(*) FILTER (reject IS NOT NULL
                             AND reject NOT IN ('invalid_id', 'decrypt_failure')),
            count(*) FILTER (reject = 'invalid_id'), count(*) FILTER (reject = 'decrypt_failure'),
            count(*) FILTER (reject IS NULL AND profile_id IS NOT NULL),
            count(*) FILTER (reject IS NULL AND profile_id IS NULL),
            count(*) FILTER (reject IS NULL AND profile_id IS NOT NULL AND suppressed)
        FROM joined
        """).fetchall()[0]
    names = ("records_received", "format_errors", "invalid_ids", "decrypt_failures",
             "matched", "unmatched", "suppressed")
    return dict(zip(names, (int(v) for v in row), strict=True))


def build_audience(con: duckdb.DuckDBPyConnection) -> None:
    """(profile_id, segment_id, action, matched_on): last line wins, removal wins in a line."""
    with step("audience (sql)"):
        con.execute("""
        CREATE OR REPLACE TEMP TABLE audience AS
        WITH rows AS (
            SELECT * FROM joined WHERE profile_id IS NOT NULL AND NOT suppressed
        ), sig AS (
            SELECT profile_id, matched_on, unnest(added) AS segment_id, 'add' AS action,
                   (file_seq::UBIGINT << 34) | (line_no::UBIGINT << 1) AS ord FROM rows
            UNION ALL
            SELECT profile_id, matched_on, unnest(removed), 'remove',
                   (file_seq::UBIGINT << 34) | (line_no::UBIGINT << 1) | 1 FROM rows
        )
        SELECT profile_id, segment_id, arg_max(action, ord) AS action,
               arg_max(matched_on, ord) AS matched_on
        FROM sig GROUP BY profile_id, segment_id
        """)
        con.execute("DROP TABLE joined")


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_campaign(con: duckdb.DuckDBPyConnection, dest: Dest, d: Delivery) -> tuple[int, dict]:
    final = dest.target / d.feed.name / f"{d.root}.csv"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    where = ""
    if dest.segments:
        where = f"WHERE segment_id IN ({', '.join(map(str, dest.segments))})"
    with step("publish campaign csv (sql)"):
        con.execute(f"""
        COPY (SELECT profile_id, segment_id::BIGINT AS segment_id, action, matched_on,
                     '{d.root}' AS delivery
              FROM audience {where} ORDER BY profile_id, segment_id)
        TO '{tmp}' (FORMAT csv, HEADER true, DELIMITER ',')
        """)
        rows = con.execute(f"SELECT count(*) FROM audience {where}").fetchall()[0][0]
        _replace(tmp, final)
    return rows, {f"{d.feed.name}/{d.root}.csv": _md5(final)}


def write_inbound(con: duckdb.DuckDBPyConnection, dest: Dest, d: Delivery) -> tuple[int, dict]:
    column = {"email_sha256": "email_key", "profile_id": "profile_id", "crm_id": "crm_id",
              "ecid": "ecid"}[dest.id]
    traits = pa.table({"segment_id": pa.array(list(dest.segments), pa.uint32()),
                       "trait_id": pa.array(list(dest.segments.values()), pa.int64())})
    con.register("traits", traits)
    with step("publish aam inbound (sql)"):
        con.execute(f"""
        CREATE OR REPLACE TEMP TABLE inbound_rows AS
        SELECT p.{column} AS dpuuid, t.trait_id, a.action
        FROM audience a JOIN traits t USING (segment_id) JOIN profiles p USING (profile_id)
        WHERE p.{column} IS NOT NULL
        """)
        rows = con.execute("SELECT count(*) FROM inbound_rows").fetchall()[0][0]
        # Per (DPUUID, trait): add if any row adds (another segment still qualifies), else
        # remove; then one line per DPUUID, adds first, traits ascending.
        con.execute("""
        CREATE OR REPLACE TEMP TABLE inbound AS
        WITH t AS (
            SELECT dpuuid, trait_id, bool_or(action = 'add') AS is_add
            FROM inbound_rows GROUP BY dpuuid, trait_id
        )
        SELECT dpuuid, string_agg(CASE WHEN is_add THEN 'd_sid=' ELSE 'd_unsid=' END
                                  || trait_id, ',' ORDER BY NOT is_add, trait_id) AS signals
        FROM t GROUP BY dpuuid
        """)
        lines = con.execute("SELECT count(*) FROM inbound").fetchall()[0][0]
        ts = d.timestamp_ms // 1000
        folder = f"date={datetime.fromtimestamp(ts, tz=UTC).date().isoformat()}"
        (dest.target / folder).mkdir(parents=True, exist_ok=True)
        per = dest.max_lines_per_file
        splits = range(0, lines, per)
        files = {}
        # Split slot: 6 digits from sha256("<feed>/<root>") (100000-999999), then the part.
        digest = hashlib.sha256(f"{d.feed.name}/{d.root}".encode()).digest()
        tag = 100_000 + int.from_bytes(digest[:8], "big") % 900_000
        for n, start in enumerate(splits, start=1):
            name = f"ftp_dpm_{dest.dpid}_{ts}.sync.{tag * 1000 + n}"
            name += ".gz" if dest.gzip else ""
            final = dest.target / folder / name
            tmp = final.with_name(f".{name}.tmp")
            comp = "gzip" if dest.gzip else "none"
            con.execute(f"""
            COPY (SELECT dpuuid, signals FROM inbound ORDER BY dpuuid LIMIT {per} OFFSET {start})
            TO '{tmp}' (FORMAT csv, HEADER false, DELIMITER '\t', COMPRESSION {comp})
            """)
            _replace(tmp, final)
            files[f"{folder}/{name}"] = _md5(final)
        con.execute("DROP TABLE inbound; DROP TABLE inbound_rows")
    con.unregister("traits")
    return rows, files


def write_quarantine(con: duckdb.DuckDBPyConnection, s: Settings, d: Delivery) -> None:
    final = s.state / "quarantine" / d.feed.name / f"{d.root}.csv"
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    names = " ".join(f"WHEN {i} THEN '{e['FileName']}'" for i, e in enumerate(d.files, start=1))
    with step("quarantine (sql)"):
        con.execute(f"""
        COPY (SELECT CASE file_seq {names} END AS file, line_no, reject AS reason, line
              FROM resolved WHERE reject IS NOT NULL ORDER BY file_seq, line_no)
        TO '{tmp}' (FORMAT csv, HEADER true)
        """)
        _replace(tmp, final)


def write_manifest(dest: Dest, d: Delivery, rows: int, files: dict) -> None:
    path = dest.target / "_manifests" / d.feed.name / f"{d.root}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"destination": dest.name, "feed": d.feed.name, "delivery": d.root, "rows": rows,
           "files": files}
    path.write_text(json.dumps(doc, sort_keys=True, indent=1))


def _md5(path: Path) -> str:
    md5 = hashlib.md5()  # noqa: S324
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            md5.update(block)
    return md5.hexdigest()


def process(con: duckdb.DuckDBPyConnection, s: Settings, d: Delivery) -> dict:
    with step("verify md5 (python)"):
        verify(d)
    with step("read + parse (sql)"):
        read_lines(con, d)
    resolve(con, d.feed)
    counts = join_and_count(con, profile_keys(con, d.feed.kind))
    rejected = counts["format_errors"] + counts["invalid_ids"] + counts["decrypt_failures"]
    report = {"feed": d.feed.name, "delivery": d.root, "status": "processed", **counts,
              "rows_written": {}}
    if rejected:
        write_quarantine(con, s, d)
    if counts["records_received"] and rejected / counts["records_received"] > \
            d.feed.max_reject_ratio:
        report["status"] = "failed"
        con.execute("DROP TABLE joined")
        return report
    build_audience(con)
    for dest in s.dests:
        writer = write_campaign if dest.kind == "campaign_list" else write_inbound
        rows, files = writer(con, dest, d)
        write_manifest(dest, d, rows, files)
        report["rows_written"][dest.name] = rows
    con.execute("DROP TABLE audience; DROP TABLE resolved")
    return report


def run(config: Path, env: dict[str, str], memory_limit: str | None = None) -> dict:
    s = load_settings(config, env)
    con = duckdb.connect()
    if memory_limit:  # DuckDB then spills its temp tables to disk instead of growing
        con.execute(f"SET memory_limit = '{memory_limit}'")
    con.execute(MACROS)
    deliveries = [d for f in s.feeds for d in find_deliveries(f)]
    with step("profiles (total)"):
        load_profiles(con, s, {f.kind for f in s.feeds},
                      {d.id for d in s.dests if d.kind == "aam_inbound"})
    reports = [process(con, s, d) for d in deliveries]
    keys = ("records_received", "format_errors", "invalid_ids", "decrypt_failures",
            "matched", "unmatched", "suppressed")
    totals = {k: sum(r[k] for r in reports) for k in keys}
    return {"totals": totals, "deliveries": reports, "steps": TIMES}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--memory-limit",
                        help="DuckDB memory_limit, e.g. 4GB (default: 80%% of RAM)")
    args = parser.parse_args()
    start = time.perf_counter()
    report = run(args.config, dict(os.environ), args.memory_limit)
    TIMES["total"] = time.perf_counter() - start
    for name, seconds in TIMES.items():
        print(f"step={name!r} seconds={seconds:.2f}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
