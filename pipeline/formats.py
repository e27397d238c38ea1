"""AAM file formats: outbound names, `.info` control files, segment lines, inbound output."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import polars as pl

from pipeline.errors import DeliveryFailed

# --------------------------------------------------------------------------------------------
# Outbound (AAM -> us) file names
# --------------------------------------------------------------------------------------------

_SYNC_TYPES = {"ftp": "ftp", "s3": "S3"}
_SYNC_MODES = {"iter", "full"}
# `.pgp` / `.gpg`: OpenPGP-encrypted (SPEC §12), whose plaintext may itself be gzip'd.
_SUFFIX = re.compile(r"\.sync(\.gz)?(\.pgp|\.gpg)?\Z")
_FOLDER_DATE = re.compile(r"date=([0-9]{4}-[0-9]{2}-[0-9]{2})")
# Last `_` token: a 13-digit timestamp, then an optional split glued as 3+ digits or after `-`.
_TS_TAIL = re.compile(r"(?P<ts>[0-9]{13})(?:(?P<glued>[0-9]{3,})|-(?P<dash>[0-9]+))?")
# Without a timestamp, only the dash form is unambiguous (glued digits could be an ID).
_DASH_TAIL = re.compile(r"(?P<head>.+)-(?P<dash>[0-9]+)", re.DOTALL)
_INT = re.compile(r"[0-9]+")  # ASCII only; every pattern here is used with fullmatch


@dataclass(frozen=True)
class OutboundName:
    """The parts of one AAM outbound file path; absent name elements are None."""

    path: str
    root: str
    folder: str
    sync_type: str | None
    did: str | None
    master_dpid: str | None
    pid_alias: str | None
    sync_mode: str | None
    timestamp_ms: int | None
    split: int
    gzip: bool
    folder_date: date | None
    pgp: bool = False

    @property
    def delivery_date(self) -> date | None:
        """UTC date of the name's timestamp, else of its `date=` folder (SPEC §6)."""
        if self.timestamp_ms is not None:
            return datetime.fromtimestamp(self.timestamp_ms / 1000, tz=UTC).date()
        return self.folder_date


# C0 and C1 controls and Unicode line/paragraph separators: a line break in a file name would
# split CSV cells, manifests and log lines downstream. Surrogates are how Python holds the
# bytes of a file name that is not UTF-8: such a name cannot be written to JSON or S3.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_UNDECODED = re.compile("[\ud800-\udfff]")


def file_name_problem(*names: str) -> str | None:
    """Why these names cannot be published as they are, else None."""
    for name in names:
        if _UNDECODED.search(name):
            return "a file name is not valid UTF-8; rename the delivery's files"
        found = _CONTROL.search(name)
        if found:
            return (f"a file name holds a control character (U+{ord(found.group()):04X}); "
                    "rename the delivery's files")
    return None


def escaped(name: str) -> str:
    """`name` with control characters written as escapes (`\\n`), for reports and ledgers."""
    if _CONTROL.search(name) or _UNDECODED.search(name):
        return name.encode("unicode_escape").decode("ascii")
    return name


def date_of_folder(folder: str) -> date | None:
    """Date of the innermost `date=YYYY-MM-DD` folder of a path, if any."""
    # The innermost `date=` segment wins; an impossible date (2017-02-30) is ignored.
    for segment in reversed(folder.split("/")):
        match = _FOLDER_DATE.fullmatch(segment)
        if match:
            try:
                return date.fromisoformat(match.group(1))
            except ValueError:
                return None
    return None


def _split_tail(stem: str) -> tuple[str, int | None, int]:
    """Return (root, timestamp_ms, split) of a file name without `.sync[.gz]`."""
    last = stem.rpartition("_")[2]
    tail = _TS_TAIL.fullmatch(last)
    if tail:
        split_text = tail.group("glued") or tail.group("dash") or "0"
        root_end = len(stem) - len(last) + 13
        return stem[:root_end], int(tail.group("ts")), int(split_text)
    dash = _DASH_TAIL.fullmatch(stem)
    if dash:
        return dash.group("head"), None, int(dash.group("dash"))
    return stem, None, 0


def _identify(tokens: list[str]) -> tuple[str | None, ...] | None:
    """Map `_` tokens (timestamp removed) to sync type, DID, DPID, alias, mode by shape."""
    if any(token == "" for token in tokens):
        return None
    sync_type = sync_mode = None
    if tokens and tokens[0].lower() in _SYNC_TYPES:
        sync_type = _SYNC_TYPES[tokens.pop(0).lower()]
    if tokens and tokens[-1].lower() in _SYNC_MODES:
        sync_mode = tokens.pop().lower()
    ints: list[str] = []
    while tokens and _INT.fullmatch(tokens[0]) and len(ints) < 2:
        ints.append(tokens.pop(0))
    if tokens and _INT.fullmatch(tokens[0]):
        return None  # a third integer has no slot in the naming scheme
    # An alias may itself contain `_`: everything between the IDs and the mode is the alias.
    alias = "_".join(tokens) or None
    did, dpid = (ints + [None, None])[:2]
    return sync_type, did, dpid, alias, sync_mode


def parse_outbound_name(path: str) -> OutboundName | None:
    """Parse an AAM outbound `.sync[.gz][.pgp|.gpg]` path; None for other files or unreadable
    names."""
    folder, _, name = path.rpartition("/")
    suffix = _SUFFIX.search(name)
    if not suffix:
        return None
    root, timestamp_ms, split = _split_tail(name[: suffix.start()])
    if not root:
        return None
    stem_tokens = root.split("_")
    if timestamp_ms is not None:
        stem_tokens.pop()
    parts = _identify(stem_tokens)
    if parts is None:
        return None
    sync_type, did, dpid, alias, sync_mode = parts
    return OutboundName(
        path=path,
        root=root,
        folder=folder,
        sync_type=sync_type,
        did=did,
        master_dpid=dpid,
        pid_alias=alias,
        sync_mode=sync_mode,
        timestamp_ms=timestamp_ms,
        split=split,
        gzip=suffix.group(1) is not None,
        folder_date=date_of_folder(folder),
        pgp=suffix.group(2) is not None,
    )


def group_deliveries(
    names: Iterable[OutboundName],
) -> dict[tuple[str, str], list[OutboundName]]:
    """Group split files into deliveries keyed by (folder, root), keys and splits sorted."""
    groups: dict[tuple[str, str], list[OutboundName]] = {}
    for name in names:
        groups.setdefault((name.folder, name.root), []).append(name)
    return {key: sorted(groups[key], key=lambda n: (n.split, n.path)) for key in sorted(groups)}


# --------------------------------------------------------------------------------------------
# `.info` control files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InfoEntry:
    """One data file listed in a `.info` control file."""

    file_name: str
    byte_size: int
    line_count: int
    sequence: int | None
    md5: str | None


@dataclass(frozen=True)
class InfoFile:
    """A parsed `.info` control file; totals are None when the file carries none."""

    files: tuple[InfoEntry, ...]
    total_byte_size: int | None
    total_line_count: int | None
    total_file_count: int | None
    file_name: str | None


def info_order(entry: InfoEntry) -> tuple[bool, int, int, str]:
    """Processing order of a control file's files: by FileSequenceNumber (optional in Adobe's
    format); files without one after those with one, by the split number of their name."""
    name = parse_outbound_name(entry.file_name)
    return (entry.sequence is None, entry.sequence or 0, name.split if name else 0,
            entry.file_name)


def info_name(root: str) -> str:
    """Name of the control file of the delivery `root`."""
    return f"{root}.info"


# Strings first so that `"a: b"` or `"{x:"` inside a value is never touched; then a bare key
# (identifier followed by `:`); then a trailing comma before `}` or `]`.
_RELAXED_TOKEN = re.compile(
    r'(?P<string>"(?:[^"\\]|\\.)*")'
    r"|(?P<key>[A-Za-z_$][A-Za-z0-9_$]*)(?P<colon>\s*:)"
    r"|,(?P<close>\s*[}\]])",
    re.DOTALL,
)
_MD5 = re.compile(r"[0-9a-fA-F]{32}")


def _quote_bare_keys(text: str) -> str:
    def fix(match: re.Match[str]) -> str:
        if match.group("string") is not None:
            return match.group("string")
        if match.group("key") is not None:
            return f'"{match.group("key")}"{match.group("colon")}'
        return match.group("close")

    return _RELAXED_TOKEN.sub(fix, text)


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return json.loads(_quote_bare_keys(text))
    except json.JSONDecodeError as exc:
        # Position only: the message never quotes content.
        raise DeliveryFailed(
            f"info: not valid JSON (line {exc.lineno}, column {exc.colno})"
        ) from None


def _field(obj: Mapping[str, Any], key: str) -> Any:
    # Adobe's examples mix `md5` and `FileName`: match keys case-insensitively.
    for name, value in obj.items():
        if name.lower() == key.lower():
            return value
    return None


def _count(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(obj, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DeliveryFailed(f"info: {where}.{key} missing or not a non-negative integer")
    return value


def _optional_count(obj: Mapping[str, Any], key: str, where: str) -> int | None:
    return None if _field(obj, key) is None else _count(obj, key, where)


def _entry(obj: Any, where: str) -> InfoEntry:
    if not isinstance(obj, dict):
        raise DeliveryFailed(f"info: {where} is not an object")
    name = _field(obj, "FileName")
    if not isinstance(name, str) or not name or "/" in name or file_name_problem(name):
        raise DeliveryFailed(f"info: {where}.FileName missing or not a plain file name")
    md5 = _field(obj, "md5")
    if md5 is not None and (not isinstance(md5, str) or not _MD5.fullmatch(md5)):
        raise DeliveryFailed(f"info: {where}.md5 of {name} is not 32 hex digits")
    return InfoEntry(
        file_name=name,
        byte_size=_count(obj, "FileByteSize", where),
        line_count=_count(obj, "FileLineCount", where),
        sequence=_optional_count(obj, "FileSequenceNumber", where),
        md5=md5.lower() if md5 else None,
    )


def _check_totals(info: InfoFile) -> None:
    expected = {
        "TotalByteSize": (info.total_byte_size, sum(f.byte_size for f in info.files)),
        "TotalLineCount": (info.total_line_count, sum(f.line_count for f in info.files)),
        "TotalFileCount": (info.total_file_count, len(info.files)),
    }
    for key, (given, actual) in expected.items():
        if given is not None and given != actual:
            raise DeliveryFailed(f"info: Totals.{key} does not match Files")


def parse_info(text: str) -> InfoFile:
    """Parse a `.info` file, strict JSON or Adobe's unquoted-key form.

    Raises DeliveryFailed naming the offending field (never a content value).
    """
    doc = _load_json(text)
    if not isinstance(doc, dict):
        raise DeliveryFailed("info: top level is not an object")
    files = _field(doc, "Files")
    if not isinstance(files, list) or not files:
        raise DeliveryFailed("info: Files missing, empty or not a list")
    entries = tuple(_entry(obj, f"Files[{i}]") for i, obj in enumerate(files))
    names = [e.file_name for e in entries]
    if len(set(names)) != len(names):
        raise DeliveryFailed("info: Files lists a FileName twice")
    totals = _field(doc, "Totals")
    if totals is None:
        totals = {}
    if not isinstance(totals, dict):
        raise DeliveryFailed("info: Totals is not an object")
    total_name = _field(totals, "FileName")
    if total_name is not None and not isinstance(total_name, str):
        raise DeliveryFailed("info: Totals.FileName is not a string")
    info = InfoFile(
        files=entries,
        total_byte_size=_optional_count(totals, "TotalByteSize", "Totals"),
        total_line_count=_optional_count(totals, "TotalLineCount", "Totals"),
        total_file_count=_optional_count(totals, "TotalFileCount", "Totals"),
        file_name=total_name,
    )
    _check_totals(info)
    return info


def render_info(entries: Iterable[InfoEntry], root: str) -> str:
    """Strict-JSON `.info` text for `entries` with computed totals (generator, tests)."""
    files = list(entries)
    doc = {
        "Files": [
            {
                "FileName": e.file_name,
                "FileByteSize": e.byte_size,
                "FileLineCount": e.line_count,
                "FileSequenceNumber": e.sequence if e.sequence is not None else i + 1,
                **({"md5": e.md5} if e.md5 is not None else {}),
            }
            for i, e in enumerate(files)
        ],
        "Totals": {
            "FileName": f"{root}.sync",
            "TotalByteSize": sum(e.byte_size for e in files),
            "TotalLineCount": sum(e.line_count for e in files),
            "TotalFileCount": len(files),
        },
    }
    return json.dumps(doc, indent=2) + "\n"


# --------------------------------------------------------------------------------------------
# Segment lines: `USER_ID<SPACE>SEG,SEG,...[<SPACE>REMOVED,...]`
# --------------------------------------------------------------------------------------------

FORMAT_ERRORS = ("line_too_long", "no_user_id", "too_many_fields", "no_segments", "bad_segment",
                 "segment_zero")
# A line holds one ID and at most a few thousand segments; anything longer is not AAM's. The
# reader never holds more than this of one line, and quarantine keeps only its start.
MAX_LINE_BYTES = 64 << 10
QUARANTINED_LINE_CHARS = 1024
_SEGMENT = r"^[0-9]+$"  # ASCII only: Rust's \d would accept other scripts' digits
_EMPTY_SEGMENTS = pl.lit([], dtype=pl.List(pl.String))


def _segment_list(field: pl.Expr) -> pl.Expr:
    """A comma list as strings; an empty (or absent) field is an empty list, not `[""]`."""
    text = field.fill_null("")
    return pl.when(text == "").then(_EMPTY_SEGMENTS).otherwise(text.str.split(","))


def _bad_segments(items: pl.Expr) -> pl.Expr:
    # Not ASCII digits (also catches `1,,2`), or too large for u32.
    valid = (
        pl.element().str.contains(_SEGMENT)
        & pl.element().cast(pl.UInt32, strict=False).is_not_null()
    )
    return ~items.list.eval(valid).list.all()


def parse_lines(lines: pl.LazyFrame) -> pl.LazyFrame:
    """Parse segment lines column-wise; blank lines are dropped.

    Adds `user_id`, `added`, `removed` (list[u32]) and `format_error` (a code of
    FORMAT_ERRORS, else null). Rows with an error carry nulls in the three parsed columns.
    """
    text = pl.col("line").str.strip_chars_end()  # trailing `\r` and spaces
    fields = pl.col("_fields")
    added_s, removed_s = pl.col("_added_s"), pl.col("_removed_s")
    error = (
        pl.when(pl.col("line").str.len_bytes() > MAX_LINE_BYTES)
        .then(pl.lit("line_too_long"))
        .when(fields.list.first() == "")
        .then(pl.lit("no_user_id"))
        .when(fields.list.len() > 3)
        .then(pl.lit("too_many_fields"))
        .when((added_s.list.len() + removed_s.list.len()) == 0)
        .then(pl.lit("no_segments"))
        .when(_bad_segments(added_s) | _bad_segments(removed_s))
        .then(pl.lit("bad_segment"))
        .when(pl.col("_added").list.contains(0) | pl.col("_removed").list.contains(0))
        .then(pl.lit("segment_zero"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    ok = pl.col("format_error").is_null()
    return (
        lines.filter(text.str.len_bytes() > 0)
        .with_columns(_fields=text.str.split(" "))
        .with_columns(
            _added_s=_segment_list(fields.list.get(1, null_on_oob=True)),
            _removed_s=_segment_list(fields.list.get(2, null_on_oob=True)),
        )
        .with_columns(
            _added=added_s.list.eval(pl.element().cast(pl.UInt32, strict=False)),
            _removed=removed_s.list.eval(pl.element().cast(pl.UInt32, strict=False)),
        )
        .with_columns(format_error=error)
        .with_columns(
            user_id=pl.when(ok).then(fields.list.first()),
            added=pl.when(ok).then(pl.col("_added")),
            removed=pl.when(ok).then(pl.col("_removed")),
        )
        .drop("_fields", "_added_s", "_removed_s", "_added", "_removed")
        .select(pl.exclude("format_error"), "format_error")
    )


# --------------------------------------------------------------------------------------------
# AAM inbound (us -> Experience Cloud) files
# --------------------------------------------------------------------------------------------

# AAM keeps at most 200 lines per user ID in one inbound file and sets no limit on traits per
# line (Experience League, "Inbound Data File Contents"): one line per DPUUID always honours it.


def inbound_file_name(dpid: int, timestamp_s: int, split: int | None, gzip: bool) -> str:
    """`ftp_dpm_<DPID>_<TIMESTAMP>.sync[.<SPLIT>][.gz]` (SPEC §5)."""
    if dpid <= 0 or timestamp_s < 0 or (split is not None and split < 0):
        raise ValueError("dpid must be positive, timestamp and split non-negative")
    name = f"ftp_dpm_{dpid}_{timestamp_s}.sync"
    if split is not None:
        name += f".{split}"
    return name + (".gz" if gzip else "")


def inbound_folder(timestamp_s: int) -> str:
    """`date=YYYY-MM-DD` (UTC) folder of an inbound file."""
    return f"date={datetime.fromtimestamp(timestamp_s, tz=UTC).date().isoformat()}"


def valid_dpuuid(col: str | pl.Expr = "dpuuid") -> pl.Expr:
    """True where a DPUUID can be written to an inbound line (non-empty, no tab/line break)."""
    expr = pl.col(col) if isinstance(col, str) else col
    return expr.is_not_null() & (expr.str.len_bytes() > 0) & ~expr.str.contains(r"[\t\r\n]")


def inbound_lines(rows: pl.DataFrame) -> pl.DataFrame:
    """Inbound lines `<DPUUID>\\td_sid=...,d_unsid=...`, one per DPUUID, sorted by DPUUID.

    Adds come first, then removals, trait IDs ascending. Duplicate signals collapse; when
    one trait is both added and removed for a DPUUID (two segments sharing a trait), the add
    wins because the profile still qualifies through the other segment.
    Raises ValueError on an invalid DPUUID (`valid_dpuuid`), an action other than
    add/remove or a null trait.
    """
    _check_inbound_rows(rows)
    is_add = pl.col("action") == "add"
    signal = (pl.when(pl.col("add")).then(pl.lit("d_sid=")).otherwise(pl.lit("d_unsid="))
              + pl.col("trait_id").cast(pl.String))
    # One row per (DPUUID, trait), the add winning; then adds first, traits ascending.
    return (
        rows.lazy()
        .group_by("dpuuid", pl.col("trait_id").cast(pl.Int64)).agg(add=is_add.any())
        .sort("dpuuid", ~pl.col("add"), "trait_id")
        .group_by("dpuuid", maintain_order=True)
        .agg(_signal=signal.str.join(","))
        .select(line=pl.col("dpuuid") + "\t" + pl.col("_signal"))
        .collect()
    )


def hex_order(digests: pl.Series) -> pl.Series:
    """Each lowercase hex digest's rank among `digests` (UInt32, from 1; equal digests, equal
    rank), found from its first 16 digits as an integer: sorting on it sorts the digests
    without comparing strings. All null when two different digests share those digits (then
    only the strings order them; about one chance in 10^7 at 10^6 digests)."""
    high, low = (pl.col("d").str.slice(start, 8).str.to_integer(base=16).cast(pl.UInt64)
                 for start in (0, 8))
    prefix = digests.to_frame("d").select(high * (1 << 32) + low).to_series()
    by_prefix = prefix.arg_sort()
    ordered = prefix.gather(by_prefix)
    repeated = (ordered == ordered.shift(1)).fill_null(False)  # equal to the one before
    if repeated.any():  # shared prefixes (e.g. one email twice): must be shared digests
        rows, before = by_prefix.filter(repeated), by_prefix.shift(1).filter(repeated)
        if (digests.gather(rows) != digests.gather(before)).fill_null(True).any():
            return pl.repeat(None, len(digests), dtype=pl.UInt32, eager=True).alias("order")
    ranks = (~repeated).cum_sum().cast(pl.UInt32)
    return pl.zeros(len(digests), pl.UInt32, eager=True).scatter(by_prefix, ranks).alias("order")


def inbound_pieces(rows: pl.DataFrame, dpuuids: pl.Series | None = None) -> pl.DataFrame:
    """The text of `inbound_lines` (no signal limit) as one piece per signal, in line order.

    Columns `line` (0-based line number) and `text`; joining the pieces of lines a..b gives
    those lines, each ending in a newline. Sorts put repeats of a (DPUUID, trait) next to
    each other, so neighbours settle duplicates and lines without any group-by on 64-char
    strings. An `order` column without nulls (`hex_order` of SHA-256 DPUUIDs) ranks the
    DPUUIDs: one sort on a packed integer then gives the lines (`_ranked_signals`);
    otherwise the strings are sorted (`_sorted_signals`). Either way the DPUUID strings are
    never moved by a sort, only picked once per line. With `dpuuids` (SHA-256 digests, ranked by
    `order`), rows carry `pnum`, their DPUUID's position in it, instead of the string.
    """
    ranked = "order" in rows.columns and not rows.get_column("order").has_nulls()
    if dpuuids is not None and not ranked:
        raise ValueError("inbound rows naming their DPUUID by position need its rank")
    _check_inbound_rows(rows, digests=ranked, dpuuids=dpuuids)
    signals = _ranked_signals(rows) if ranked else _sorted_signals(rows)
    first = signals.get_column("_row")  # null but on a line's first signal
    starts = (rows.get_column("dpuuid").gather(first) if dpuuids is None
              else dpuuids.gather(rows.get_column("pnum").gather(first)))
    return signals.select("line", text=pl.concat_str(pl.lit(starts), _signals(signals),
                                                     ignore_nulls=True))


def _ranked_signals(rows: pl.DataFrame) -> pl.DataFrame:
    """Signals over one UInt64 per row, in one sort: (DPUUID rank, removal bit, trait index)
    is the line order itself. Exact repeats are neighbours; a removal whose (DPUUID, trait)
    is also added (the add wins) is found among the adds, which that order keeps sorted by
    (rank, trait). A second, stable sort by line took ~20% more."""
    traits = rows.get_column("trait_id").cast(pl.Int64).unique().sort()
    trait = pl.lit(traits).search_sorted(pl.col("trait_id").cast(pl.Int64)).cast(pl.UInt64)
    removal = (pl.col("action") != "add").cast(pl.UInt64)
    key = pl.col("order").cast(pl.UInt64) * (1 << 32) + removal * (1 << 31) + trait
    ordered = (rows.lazy().select(_key=key, trait_id=pl.col("trait_id").cast(pl.Int64),
                                  _removal=removal.cast(pl.Boolean),
                                  _row=pl.int_range(pl.len(), dtype=pl.UInt32))
               .sort("_key").collect())
    keys, removals = ordered.get_column("_key"), ordered.get_column("_removal")
    pair = (keys // (1 << 32)) * (1 << 31) + keys % (1 << 31)  # (rank, trait)
    adds, removed = pair.filter(~removals), pair.filter(removals)
    shadowed = pl.zeros(len(keys), pl.Boolean, eager=True)
    if len(adds) and len(removed):
        at = adds.search_sorted(removed).clip(upper_bound=len(adds) - 1)
        shadowed = shadowed.scatter(removals.arg_true().filter(adds.gather(at) == removed),
                                    True)
    keep = ~(keys == keys.shift(1)).fill_null(False) & ~shadowed
    return _line_signals(ordered.lazy().filter(keep), pl.col("_key") // (1 << 32))


def _sorted_signals(rows: pl.DataFrame) -> pl.DataFrame:
    """Signals over the DPUUID strings themselves: one sort by (DPUUID, trait, removal) puts
    every repeat of a (DPUUID, trait) after its add (which wins), neighbours drop them, and a
    stable sort on the line number puts adds first."""
    ident = pl.col("dpuuid")
    pair = pl.struct("dpuuid", "trait_id")
    line = ((ident != ident.shift(1)).fill_null(True).cum_sum() - 1).cast(pl.UInt32)
    ordered = (rows.lazy()
               .select("dpuuid", pl.col("trait_id").cast(pl.Int64),
                       _removal=pl.col("action") != "add",
                       _row=pl.int_range(pl.len(), dtype=pl.UInt32))
               .sort("dpuuid", "trait_id", "_removal")
               .filter((pair != pair.shift(1)).fill_null(True))
               .with_columns(_line=line)
               .sort("_line", "_removal", maintain_order=True))  # traits stay ascending
    return _line_signals(ordered, ident)


def _line_signals(ordered: pl.LazyFrame, ident: pl.Expr) -> pl.DataFrame:
    """Signals already in line order (adds first, traits ascending), repeats dropped, as
    (line, trait_id, _removal, _first, _last, _row: the row's index where it starts a line).
    `ident` is equal exactly where the DPUUIDs are."""
    first = (ident != ident.shift(1)).fill_null(True)
    last = (ident != ident.shift(-1)).fill_null(True)
    return (ordered
            .select(line=(first.cum_sum() - 1).cast(pl.UInt32), trait_id=pl.col("trait_id"),
                    _removal=pl.col("_removal"), _first=first, _last=last,
                    _row=pl.when(first).then(pl.col("_row")))
            .collect())


def _signals(rows: pl.DataFrame) -> pl.Series:
    """Each row's `<sep>d_sid=<trait>` / `d_unsid=` (+ newline on a line's last signal),
    taken from a table of the few distinct texts: building each row's text from parts cost
    more than the rest of the writer."""
    traits = rows.get_column("trait_id").unique().sort()
    texts = [f"{sep}{kind}={trait}{end}" for trait in traits
             for kind in ("d_sid", "d_unsid") for sep in (",", "\t") for end in ("", "\n")]
    code = (((pl.lit(traits).search_sorted(pl.col("trait_id")).cast(pl.UInt32) * 2
              + pl.col("_removal").cast(pl.UInt32)) * 2
             + pl.col("_first").cast(pl.UInt32)) * 2 + pl.col("_last").cast(pl.UInt32))
    return rows.select(pl.lit(pl.Series(texts, dtype=pl.String)).gather(code)).to_series()


def _check_inbound_rows(rows: pl.DataFrame, digests: bool = False,
                        dpuuids: pl.Series | None = None) -> None:
    """`digests`: the DPUUIDs are hex SHA-256 digests (never empty, no tab or line break):
    their characters need no check. `dpuuids`: rows name theirs by position (`pnum`)."""
    if dpuuids is None:
        missing = pl.col("dpuuid").is_null() if digests else ~valid_dpuuid("dpuuid")
    else:
        missing = pl.col("pnum").is_null() | pl.lit(dpuuids.is_null()).gather(pl.col("pnum"))
    # Counts only: a DPUUID may be a hashed email or CRM ID and never goes into a message.
    checks = {
        "an empty DPUUID or one with a tab/line break": missing,
        "an action other than add/remove": ~pl.col("action").is_in(["add", "remove"])
        | pl.col("action").is_null(),
        "no trait ID": pl.col("trait_id").is_null(),
    }
    for problem, expr in checks.items():
        bad = rows.filter(expr).height
        if bad:
            raise ValueError(f"{bad} inbound rows have {problem}")
