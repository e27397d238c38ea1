"""Export files: names, reading, validation and resolution of Campaign audience files (SPEC §10).

Transforms on frames; the flow that reads, publishes and saves state is flows/export.py.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl

from pipeline.config import DestinationConfig
from pipeline.errors import (
    DeliveryFailed,
    IncompleteDelivery,
    SchemaError,
)
from pipeline.formats import date_of_folder, escaped, file_name_problem, valid_dpuuid
from pipeline.stages import publish
from pipeline.stores import Store
from pipeline.tables import check_columns

log = logging.getLogger(__name__)
_SUFFIX = re.compile(r"\.(csv|csv\.gz|parquet)\Z", re.IGNORECASE)
_DIGITS = re.compile(r"(?<![0-9])[0-9]+(?![0-9])")
_SEPARATORS = (",", ";", "\t", "|")
_EXTRA = "_extra_fields"  # catches rows with more fields than the header
DAY = 86_400


# --------------------------------------------------------------------------------------------
# Export files: names, order, timestamps
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFile:
    path: str
    size: int
    root: str  # path without extension: the delivery name (ledger, manifest, quarantine)
    timestamp_s: int  # TIMESTAMP of the output names; orders the files
    date: date | None
    problem: str | None = None

    @property
    def sort_key(self) -> tuple[int, str]:
        return (self.timestamp_s, self.root)

    @property
    def identity(self) -> str:
        """What the changed-file check compares: the listing gives it without a read."""
        return f"size:{self.size}"


def find_exports(store: Store) -> list[ExportFile]:
    """Every export file (`.csv`, `.csv.gz`, `.parquet`) on the feed, oldest first."""
    files = [export_file(e.path, e.size) for e in store.list("") if _SUFFIX.search(e.path)]
    roots: dict[str, int] = {}
    for f in files:
        roots[f.root] = roots.get(f.root, 0) + 1
    files = [f if roots[f.root] == 1 else _with_problem(f, "two export files share this name "
                                                          "with different extensions")
             for f in files]
    return sorted(files, key=lambda f: f.sort_key)


def _with_problem(f: ExportFile, problem: str) -> ExportFile:
    return ExportFile(f.path, f.size, f.root, f.timestamp_s, f.date, problem)


def export_file(path: str, size: int) -> ExportFile:
    """Timestamp and date from the name: a 13-digit ms or 10-digit s UNIX time, or a
    YYYYMMDDhhmmss / YYYYMMDD token, else the innermost `date=` folder, else none.

    Date-only names get a deterministic offset into their day (from the root), so two
    exports of one day never share an output name. Never the file's mtime.
    """
    root = path[: _SUFFIX.search(path).start()]  # type: ignore[union-attr]  # caller matched
    folder, _, stem = root.rpartition("/")
    exact, day = _name_time(stem)
    if exact is not None:
        f = ExportFile(path, size, root, exact, datetime.fromtimestamp(exact, UTC).date())
    else:
        day = day or date_of_folder(folder)
        midnight = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) \
            if day else 0
        f = ExportFile(path, size, root, midnight + zlib.crc32(root.encode()) % DAY, day)
    # Refused as a problem of the file: outputs would land in date=1970-01-01, or under a
    # name with a line break in it.
    problem = file_name_problem(path) or (None if f.date else (
        "no date: neither a timestamp or date in the name nor a date= folder"))
    return ExportFile(path, size, escaped(root), f.timestamp_s, f.date, problem) \
        if problem else f


def _name_time(stem: str) -> tuple[int | None, date | None]:
    for token in reversed(_DIGITS.findall(stem)):
        if len(token) in (10, 13):
            return int(token) // (1000 if len(token) == 13 else 1), None
        for width, fmt in ((14, "%Y%m%d%H%M%S"), (8, "%Y%m%d")):
            if len(token) == width:
                try:
                    moment = datetime.strptime(token, fmt).replace(tzinfo=UTC)
                except ValueError:
                    continue
                return (int(moment.timestamp()), None) if width == 14 else (None, moment.date())
    return None, None



# --------------------------------------------------------------------------------------------
# Reading and validation: (line_no, audience, profile_id, reject)
# --------------------------------------------------------------------------------------------


def read_export(data: bytes, f: ExportFile) -> pl.DataFrame:
    """Rows of one export file with a `reject` reason (null when valid); blank CSV lines
    are dropped (not records). Raises DeliveryFailed for an unreadable file."""
    name = f.path.rpartition("/")[2]
    try:
        if f.path.lower().endswith(".parquet"):
            rows = _parquet_rows(data, name)
        else:
            if f.path.lower().endswith(".gz"):
                data = gunzip(data, name)
            rows = _csv_rows(data, name)
    except SchemaError as exc:
        raise DeliveryFailed(str(exc)) from None
    return validate(rows.lazy()).collect()


def _csv_rows(data: bytes, name: str) -> pl.DataFrame:
    if not data:
        raise IncompleteDelivery(f"{name}: empty file (still being written?)")
    if not data.endswith(b"\n"):
        # Campaign writes whole lines: a file cut mid-line is still being written. Read now,
        # it would look like a smaller membership and send removals for everyone missing.
        raise IncompleteDelivery(f"{name}: does not end with a line break (still being "
                                 "written?)")
    header, _, body = data.partition(b"\n")
    text = header.decode("utf-8", errors="replace").lstrip("\ufeff").rstrip("\r")
    sep = next((s for s in _SEPARATORS if {"audience", "profile_id"} <= _names(text, s)), ",")
    names = [n.strip().strip('"').strip().lower() for n in text.split(sep)]
    if len(set(names)) != len(names):
        raise DeliveryFailed(f"{name}: header names a column twice")
    check_columns(pl.Schema(dict.fromkeys(names, pl.String)), "campaign_export",
                  f"export file {name}")
    # One more column than the header: a row with too many fields fills it (format error).
    head = sep.join([*names, _EXTRA]).encode() + b"\n"
    try:
        rows = pl.read_csv(io.BytesIO(head + body), separator=sep, infer_schema=False,
                           encoding="utf8-lossy", truncate_ragged_lines=True)
    except pl.exceptions.PolarsError as exc:
        raise DeliveryFailed(f"{name}: not readable CSV ({type(exc).__name__})") from None
    blank = pl.all_horizontal(pl.col(c).str.strip_chars().fill_null("") == ""
                              for c in rows.columns)
    return (rows.with_row_index("line_no", offset=2)  # line 1 is the header
            .filter(~blank)
            .select("line_no", "audience", "profile_id", _EXTRA))


def _names(header: str, sep: str) -> set[str]:
    return {n.strip().strip('"').strip().lower() for n in header.split(sep)}


def _parquet_rows(data: bytes, name: str) -> pl.DataFrame:
    try:
        table = pl.read_parquet(io.BytesIO(data))
    except (pl.exceptions.PolarsError, OSError) as exc:
        raise DeliveryFailed(f"{name}: not readable Parquet ({type(exc).__name__})") from None
    check_columns(table.schema, "campaign_export", f"export file {name}")
    return table.with_row_index("line_no", offset=1).select(
        "line_no", pl.col("audience").cast(pl.String), pl.col("profile_id").cast(pl.String),
        pl.lit(None, pl.String).alias(_EXTRA))


def gunzip(data: bytes, name: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error):
        raise IncompleteDelivery(f"{name}: truncated or corrupt gzip") from None


def validate(rows: pl.LazyFrame) -> pl.LazyFrame:
    """Trim fields and give each bad row its reason (format errors, SPEC §6)."""
    audience = pl.col("audience").str.strip_chars()
    profile_id = pl.col("profile_id").str.strip_chars()
    bad_utf8 = (audience.str.contains("\ufffd", literal=True).fill_null(False)
                | profile_id.str.contains("\ufffd", literal=True).fill_null(False))
    reason = (
        pl.when(pl.col(_EXTRA).is_not_null()).then(pl.lit("too_many_fields"))
        .when(bad_utf8).then(pl.lit("bad_utf8"))
        .when(audience.fill_null("") == "").then(pl.lit("no_audience"))
        .when(profile_id.fill_null("") == "").then(pl.lit("no_profile_id"))
        .otherwise(pl.lit(None, pl.String))
    )
    return rows.select(pl.col("line_no").cast(pl.UInt64), audience.alias("audience"),
                       profile_id.alias("profile_id"), reason.alias("reject"))


# --------------------------------------------------------------------------------------------
# Resolution and membership (pure frames)
# --------------------------------------------------------------------------------------------


def resolve(rows: pl.LazyFrame, profiles: pl.LazyFrame, id_columns: list[str]) -> pl.LazyFrame:
    """Add `found`, `suppressed` and the DPUUID columns of each row's profile."""
    ids = profiles.select("profile_id", "suppressed", *sorted(set(id_columns) - {"profile_id"}),
                          found=pl.lit(True))
    valid = pl.col("reject").is_null()
    return (rows.with_columns(_key=pl.when(valid).then(pl.col("profile_id")))
            .join(ids.rename({"profile_id": "_key"}), on="_key", how="left", validate="m:1")
            .with_columns(pl.col("found").fill_null(False), pl.col("suppressed").fill_null(False))
            .drop("_key"))


def count(resolved: pl.DataFrame) -> dict[str, int]:
    """SPEC §6 counts; `unmatched` = profile IDs absent from the snapshot."""
    ok, found = pl.col("reject").is_null(), pl.col("found")
    row = resolved.select(
        records_received=pl.len(), format_errors=(~ok).sum(), matched=(ok & found).sum(),
        unmatched=(ok & ~found).sum(), suppressed=(ok & found & pl.col("suppressed")).sum(),
    ).row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}


def members(resolved: pl.LazyFrame, dest: DestinationConfig) -> tuple[pl.LazyFrame, pl.Expr]:
    """(audience, trait_id, dpuuid) the destination should now hold, and an expression
    counting exportable rows whose profile lacks the DPUUID (counted, never exported)."""
    column = publish.DPUUID_COLUMN[dest.id]
    traits = pl.LazyFrame({"audience": list(dest.audiences),
                           "trait_id": list(dest.audiences.values())},
                          schema={"audience": pl.String, "trait_id": pl.Int64})
    eligible = pl.col("reject").is_null() & pl.col("found") & ~pl.col("suppressed")
    has_id = valid_dpuuid(column)
    rows = (resolved.filter(eligible & has_id)
            .join(traits, on="audience", how="inner", validate="m:1")
            .select("audience", "trait_id", dpuuid=pl.col(column))
            .unique())
    return rows, (eligible & ~has_id).sum()
