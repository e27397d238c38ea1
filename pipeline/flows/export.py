"""Export flow: one Campaign audience file -> AAM inbound changes of each audience (SPEC §10).

One export file is one delivery: the full current membership of the audiences it names.
Its members resolve through the profile snapshot to each destination's DPUUID; what changed
since the last published membership (membership.py) goes out as `d_sid` / `d_unsid` lines.
Order per file: read and validate, count, refuse (threshold, unmapped audience), publish,
then save the membership state; the run loop writes the ledger last. A crash anywhere
re-runs the file against the state before it, so the same names get the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass

import polars as pl

from pipeline.config import Config, DestinationConfig, FeedConfig
from pipeline.context import Context
from pipeline.errors import ConfigError, DeliveryFailed, IncompleteDelivery
from pipeline.ledger import LedgerEntry
from pipeline.membership import Head, MembershipState, base_version, diff
from pipeline.report import DeliveryReport
from pipeline.stages import publish
from pipeline.stages.export import (
    ExportFile,
    count,
    find_exports,
    gunzip,
    members,
    read_export,
    resolve,
)
from pipeline.stores import Store

log = logging.getLogger(__name__)
_NO_MEMBERS = pl.DataFrame(schema={"audience": pl.String, "trait_id": pl.Int64,
                                   "dpuuid": pl.String})
_NO_CHANGES = pl.DataFrame(schema={"dpuuid": pl.String, "trait_id": pl.Int64,
                                   "action": pl.String})


def export_destinations(config: Config) -> list[DestinationConfig]:
    return [d for d in config.destinations if d.kind == "aam_inbound" and d.audiences]


@dataclass
class _Plan:
    """Everything one file publishes, computed before anything is written."""

    outputs: dict[str, publish.Output]
    members: dict[str, dict[str, pl.DataFrame]]  # destination -> audience -> (dpuuid)
    audiences: list[str]
    missing_ids: dict[str, int]  # destination -> exportable rows lacking the DPUUID


class ExportFlow:
    """The export files of one `campaign_export` feed, for the run loop (run.py)."""

    def __init__(self, ctx: Context, feed: FeedConfig, source: Store) -> None:
        self.ctx, self.feed, self.source = ctx, feed, source
        self.dests = export_destinations(ctx.config)
        if not self.dests:
            raise ConfigError(f"feeds.{feed.name}: campaign_export needs an aam_inbound "
                              "destination with an audiences table")
        self.states = {d.name: MembershipState(ctx.state, d.name) for d in self.dests}
        self.current: set[str] = set()  # --full republishes the exports now in force
        if ctx.options.full:
            self.current = set().union(*(s.current_exports() for s in self.states.values()))
        self._md5: dict[str, str] = {}  # root -> md5 of the bytes read, for the ledger

    def units(self) -> list[ExportFile]:
        return [f for f in find_exports(self.source) if self.ctx.options.wants(f.date)]

    @staticmethod
    def blocked(f: ExportFile) -> tuple[str, str] | None:
        return ("failed", f.problem) if f.problem else None

    def again(self, f: ExportFile) -> bool:
        return self.ctx.options.reprocess or f.root in self.current

    @staticmethod
    def changed(f: ExportFile, previous: LedgerEntry) -> str | None:
        if previous.files.get(f.path, f.identity).split()[-1] != f.identity:
            return "file changed since processed; rerun with --force to reprocess"
        return None

    def files(self, f: ExportFile) -> dict[str, str]:
        """`md5:<hex> size:<n>`: md5 for the record, size for the cheap changed-file check."""
        md5 = self._md5.get(f.root)
        return {f.path: f"md5:{md5} {f.identity}" if md5 else f.identity}

    def process(self, f: ExportFile, rep: DeliveryReport) -> None:
        data = self.source.read_bytes(f.path)
        if len(data) != f.size:
            raise IncompleteDelivery(f"{f.path}: size changed while reading")
        self._md5[f.root] = hashlib.md5(data).hexdigest()  # noqa: S324  # not security
        _process_file(self.ctx, self.feed, f, data, self.states, self.dests, rep)


def _process_file(ctx: Context, feed: FeedConfig, f: ExportFile, data: bytes,
                  states: dict[str, MembershipState], dests: list[DestinationConfig],
                  rep: DeliveryReport) -> None:
    rows = read_export(data, f)
    _, profiles = ctx.snapshots.profiles(f.date)
    columns = [publish.DPUUID_COLUMN[d.id] for d in dests]
    resolved = resolve(rows.lazy(), profiles.lazy(), columns).collect()
    for name, value in count(resolved).items():
        setattr(rep, name, value)
    if rep.format_errors and not ctx.options.dry_run:
        _quarantine(ctx, feed, f, resolved, data)
    rep.check_reject_ratio(feed.max_reject_ratio)
    audiences = sorted(resolved.filter(pl.col("reject").is_null())["audience"].unique())
    _check_mapped(audiences, dests)
    heads = {d.name: {a: states[d.name].head(a) for a in audiences} for d in dests}
    newer = _superseded(heads, f)
    if newer:
        rep.status = "skipped"
        rep.reason = (f"older than the export already applied for {newer} audience(s); "
                      "not applied (diffs apply oldest first)")
        return
    key = publish.DeliveryKey(feed.name, f.root, f.timestamp_s)
    plan = _plan(ctx, f, key, resolved, dests, states, heads, audiences)
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
    log.info("feed=%s export=%s audiences=%d", feed.name, f.root, len(audiences))


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


def _plan(ctx: Context, f: ExportFile, key: publish.DeliveryKey, resolved: pl.DataFrame,
          dests: list[DestinationConfig], states: dict[str, MembershipState],
          heads: dict[str, dict[str, Head]], audiences: list[str]) -> _Plan:
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
        plan.outputs[dest.name] = publish.inbound_files_for(rows, dest, key, ctx.workdir)
        plan.missing_ids[dest.name] = resolved.lazy().select(missing).collect().item()
        log.info("destination=%s export=%s members=%d changes=%d missing_dpuuid=%d",
                 dest.name, f.root, sum(m.height for m in now.values()), rows.height,
                 plan.missing_ids[dest.name])
    return plan


def _publish(ctx: Context, dests: list[DestinationConfig], key: publish.DeliveryKey,
             plan: _Plan, rep: DeliveryReport) -> None:
    written = publish.publish_outputs(ctx.targets, dests, key, plan.outputs, ctx.keys)
    rep.outputs += [f"{name}:{p}" for name, paths in written.items() for p in paths]


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
            data = gunzip(data, f.path)
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

