"""Export: Campaign audience files -> AAM inbound changes of each audience (SPEC §10).

One export file is one delivery: the full current membership of the audiences it names.
Its members resolve through the profile snapshot to each destination's DPUUID; what changed
since the last published membership (membership.py) goes out as `d_sid` / `d_unsid` lines.
Order per file: read and validate, count, refuse (threshold, unmapped audience), publish,
then save the membership state, then the ledger. A crash anywhere re-runs the file against
the state before it, so the same names get the same bytes (nothing lost or duplicated).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

import polars as pl

from pipeline.config import Config, DestinationConfig, FeedConfig
from pipeline.errors import (
    ConfigError,
    DeliveryFailed,
    IncompleteDelivery,
    SchemaError,
    TransientError,
)
from pipeline.formats import date_of_folder, valid_dpuuid
from pipeline.ledger import LedgerEntry
from pipeline.membership import Head, MembershipState, base_version, diff
from pipeline.report import DeliveryReport
from pipeline.stages import publish
from pipeline.stores import Store
from pipeline.tables import check_columns

if TYPE_CHECKING:
    from pipeline.run import Context

log = logging.getLogger(__name__)
_SUFFIX = re.compile(r"\.(csv|csv\.gz|parquet)\Z", re.IGNORECASE)
_DIGITS = re.compile(r"(?<![0-9])[0-9]+(?![0-9])")
_SEPARATORS = (",", ";", "\t", "|")
_EXTRA = "_extra_fields"  # catches rows with more fields than the header
DAY = 86_400
_NO_MEMBERS = pl.DataFrame(schema={"audience": pl.String, "trait_id": pl.Int64,
                                   "dpuuid": pl.String})
_NO_CHANGES = pl.DataFrame(schema={"dpuuid": pl.String, "trait_id": pl.Int64,
                                   "action": pl.String})


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
        return ExportFile(path, size, root, exact, datetime.fromtimestamp(exact, UTC).date())
    day = day or date_of_folder(folder)
    midnight = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) if day else 0
    return ExportFile(path, size, root, midnight + zlib.crc32(root.encode()) % DAY, day)


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
                data = _gunzip(data, name)
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


def _gunzip(data: bytes, name: str) -> bytes:
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


def export_destinations(config: Config) -> list[DestinationConfig]:
    return [d for d in config.destinations if d.kind == "aam_inbound" and d.audiences]


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything one file publishes, computed before anything is written."""

    outputs: dict[str, publish.Output]
    members: dict[str, dict[str, pl.DataFrame]]  # destination -> audience -> (dpuuid)
    audiences: list[str]
    missing_ids: dict[str, int]  # destination -> exportable rows lacking the DPUUID


def process_export(ctx: Context, feed: FeedConfig, source: Store) -> Iterator[DeliveryReport]:
    """Process the feed's export files oldest first; never raises for a single file."""
    dests = export_destinations(ctx.config)
    if not dests:
        raise ConfigError(f"feeds.{feed.name}: campaign_export needs an aam_inbound "
                          "destination with an audiences table")
    states = {d.name: MembershipState(ctx.state, d.name) for d in dests}
    current: set[str] = set()
    if ctx.options.full:
        current = set().union(*(s.current_exports() for s in states.values()))
    for f in _selected(find_exports(source), ctx):
        yield _process(ctx, feed, source, f, states, current)


def _selected(files: list[ExportFile], ctx: Context) -> list[ExportFile]:
    return [f for f in files if ctx.options.wants(f.date)]


def _process(ctx: Context, feed: FeedConfig, source: Store, f: ExportFile,
             states: dict[str, MembershipState], current: set[str]) -> DeliveryReport:
    rep = DeliveryReport(feed=feed.name, delivery=f.root,
                         date=f.date.isoformat() if f.date else None)
    previous = ctx.ledger.get(feed.name, f.root)
    again = ctx.options.force or ctx.options.command == "backfill" or f.root in current
    if previous and previous.status in ("processed", "skipped") and not again:
        rep.status = "skipped"
        if previous.files.get(f.path, f.identity).split()[-1] != f.identity:
            rep.reason = "file changed since processed; rerun with --force to reprocess"
            log.warning("feed=%s export=%s changed_after_processing", feed.name, f.root)
        return rep
    data = None
    try:
        if f.problem:
            raise DeliveryFailed(f.problem)
        data = source.read_bytes(f.path)
        if len(data) != f.size:
            raise IncompleteDelivery(f"{f.path}: size changed while reading")
        _process_file(ctx, feed, f, data, states, rep)
    except (IncompleteDelivery, DeliveryFailed, TransientError) as exc:
        rep.status = "incomplete" if isinstance(exc, IncompleteDelivery) else "failed"
        rep.reason = str(exc)
        log.error("feed=%s export=%s status=%s reason=%s", feed.name, f.root, rep.status, exc)
    # A superseded file that was processed before keeps that record (and its outputs).
    kept = rep.status == "skipped" and previous is not None and previous.status == "processed"
    if not ctx.options.dry_run and not kept:
        ctx.ledger.put(LedgerEntry(
            feed=rep.feed, delivery=rep.delivery, status=rep.status,
            files={f.path: _identity(f, data)}, counts=rep.counts(), outputs=rep.outputs,
            run_id=ctx.run_id, reason=rep.reason, date=rep.date))
    return rep


def _identity(f: ExportFile, data: bytes | None) -> str:
    """`md5:<hex> size:<n>`: md5 for the record, size for the cheap changed-file check."""
    if data is None:
        return f.identity
    return f"md5:{hashlib.md5(data).hexdigest()} {f.identity}"  # noqa: S324  # not security


def _process_file(ctx: Context, feed: FeedConfig, f: ExportFile, data: bytes,
                  states: dict[str, MembershipState], rep: DeliveryReport) -> None:
    rows = read_export(data, f)
    _, profiles = ctx.snapshots.profiles(f.date)
    dests = [d for d in export_destinations(ctx.config) if d.name in states]
    columns = [publish.DPUUID_COLUMN[d.id] for d in dests]
    resolved = resolve(rows.lazy(), profiles.lazy(), columns).collect()
    for name, value in count(resolved).items():
        setattr(rep, name, value)
    if rep.format_errors and not ctx.options.dry_run:
        _quarantine(ctx, feed, f, resolved, data)
    ratio = rep.rejected / rep.records_received if rep.records_received else 0.0
    if ratio > feed.max_reject_ratio:
        raise DeliveryFailed(f"reject ratio {ratio:.4f} exceeds max_reject_ratio "
                             f"{feed.max_reject_ratio} ({rep.rejected} of {rep.records_received} "
                             "records rejected; see quarantine)")
    audiences = sorted(resolved.filter(pl.col("reject").is_null())["audience"].unique())
    _check_mapped(audiences, dests)
    heads = {d.name: {a: states[d.name].head(a) for a in audiences} for d in dests}
    newer = _superseded(heads, f)
    if newer:
        rep.status = "skipped"
        rep.reason = (f"older than the export already applied for {newer} audience(s); "
                      "not applied (diffs apply oldest first)")
        return
    plan = _plan(ctx, f, resolved, dests, states, heads, audiences)
    key = publish.DeliveryKey(feed.name, f.root, f.timestamp_s)
    for dest in dests:
        out = plan.outputs[dest.name]
        rep.rows_written[dest.name] = out.rows
        if plan.missing_ids[dest.name]:
            rep.missing_ids[dest.name] = plan.missing_ids[dest.name]
        if ctx.options.dry_run:
            rep.outputs += [f"{dest.name}:{p}" for p, _ in out.files]
    if not ctx.options.dry_run:
        _publish(ctx, dests, key, plan, rep)
        _save_state(states, f, dests, plan)
    rep.status = "dry_run" if ctx.options.dry_run else "processed"
    log.info("feed=%s export=%s status=%s received=%d matched=%d rejected=%d audiences=%d",
             feed.name, f.root, rep.status, rep.records_received, rep.matched, rep.rejected,
             len(audiences))


def _check_mapped(audiences: list[str], dests: list[DestinationConfig]) -> None:
    for dest in dests:
        unmapped = [a for a in audiences if a not in dest.audiences]
        if unmapped:
            shown = ", ".join(repr(a) for a in unmapped[:5])
            more = f" and {len(unmapped) - 5} more" if len(unmapped) > 5 else ""
            raise DeliveryFailed(f"audience {shown}{more} not mapped in destinations."
                                 f"{dest.name}.audiences; nothing published")


def _superseded(heads: dict[str, dict[str, Head]], f: ExportFile) -> int:
    """Audiences whose saved membership comes from a newer export than this file."""
    return sum(1 for by_audience in heads.values() for head in by_audience.values()
               if head.current is not None and head.current.order > f.sort_key)


def _plan(ctx: Context, f: ExportFile, resolved: pl.DataFrame, dests: list[DestinationConfig],
          states: dict[str, MembershipState], heads: dict[str, dict[str, Head]],
          audiences: list[str]) -> _Plan:
    plan = _Plan({}, {}, audiences, {})
    for dest in dests:
        new, missing = members(resolved.lazy(), dest)
        by_audience = new.collect().partition_by("audience", as_dict=True)
        now = plan.members[dest.name] = {
            a: by_audience.get((a,), _NO_MEMBERS).select("dpuuid") for a in audiences}
        changes = [_NO_CHANGES]
        for audience in audiences:
            base = base_version(heads[dest.name][audience], f.root)
            changes.append(diff(states[dest.name].read(audience, base), now[audience],
                                base.trait_id if base else None, dest.audiences[audience],
                                ctx.options.full))
        rows = pl.concat(changes)
        plan.outputs[dest.name] = publish.inbound_files_for(rows, dest, f.timestamp_s,
                                                             ctx.workdir)
        plan.missing_ids[dest.name] = resolved.lazy().select(missing).collect().item()
        log.info("destination=%s export=%s members=%d changes=%d missing_dpuuid=%d",
                 dest.name, f.root, sum(m.height for m in now.values()), rows.height,
                 plan.missing_ids[dest.name])
    return plan


def _publish(ctx: Context, dests: list[DestinationConfig], key: publish.DeliveryKey,
             plan: _Plan, rep: DeliveryReport) -> None:
    for dest in dests:  # every name is checked before the first file is written
        _check_names(ctx.targets[dest.name], dest, key, plan.outputs[dest.name])
    for dest in dests:
        written = publish.write_outputs(ctx.targets[dest.name], dest, key,
                                        plan.outputs[dest.name])
        rep.outputs += [f"{dest.name}:{p}" for p in written]


def _check_names(store: Store, dest: DestinationConfig, key: publish.DeliveryKey,
                 out: publish.Output) -> None:
    """Names are unique per (destination, delivery): refuse to replace another delivery's
    file. Our own files (in our manifest, or left whole by a crash before the manifest and
    so byte-identical) may be rewritten."""
    manifest = publish.manifest_path(key)
    own = set(json.loads(store.read_bytes(manifest)).get("files", {})) \
        if store.exists(manifest) else set()
    for path, data in out.files:
        if path not in own and store.exists(path) and store.read_bytes(path) != data:
            raise DeliveryFailed(f"destinations.{dest.name}: {path} already holds another "
                                 "delivery's output; nothing published")


def _save_state(states: dict[str, MembershipState], f: ExportFile,
                dests: list[DestinationConfig], plan: _Plan) -> None:
    for dest in dests:
        for audience in plan.audiences:
            save_membership(states[dest.name], audience, f, dest.audiences[audience],
                            plan.members[dest.name][audience])


def save_membership(state: MembershipState, audience: str, f: ExportFile, trait_id: int,
                    members: pl.DataFrame) -> None:
    """Save one audience's published membership (a seam for crash tests)."""
    state.save(audience, f.root, f.timestamp_s, trait_id, members)


def _quarantine(ctx: Context, feed: FeedConfig, f: ExportFile, resolved: pl.DataFrame,
                data: bytes) -> None:
    """Rejected rows with line number, reason and the raw line (CSV) or fields (Parquet)."""
    rejected = resolved.filter(pl.col("reject").is_not_null())
    if not f.path.lower().endswith(".parquet"):
        if f.path.lower().endswith(".gz"):
            data = _gunzip(data, f.path)
        lines = data.decode("utf-8", errors="replace").split("\n")
        raw = [lines[n - 1].rstrip("\r") if n <= len(lines) else ""
               for n in rejected["line_no"].to_list()]
    else:
        raw = [f"{a},{p}" for a, p in zip(rejected["audience"], rejected["profile_id"],
                                           strict=True)]
    table = rejected.select("line_no", reason="reject").with_columns(
        file=pl.lit(f.path), line=pl.Series(raw, dtype=pl.String)
    ).select("file", "line_no", "reason", "line")
    buf = io.BytesIO()
    table.write_csv(buf)
    ctx.state.write_bytes(f"quarantine/{feed.name}/{f.root}.csv", buf.getvalue())

