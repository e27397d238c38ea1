"""Join: match resolved keys to profiles, apply governance, merge segments per profile.

Pure frame -> frame and free of global state, so it can run per key-hash bucket.
"""

from __future__ import annotations

import polars as pl
import polars_hash as plh

from pipeline import identity

KEY_KINDS = ("ecid", "email", "phone", "crm")
MATCH_PREFIX = "match:"  # a crm feed's own snapshot column (`match_column`), as scanned
_SOURCE = {"ecid": "ecid", "email": "email", "phone": "phone", "crm": "crm_id"}


def profile_table(snapshot: pl.LazyFrame, default_country: str | None,
                  kinds: tuple[str, ...] = KEY_KINDS) -> pl.LazyFrame:
    """Snapshot -> one row per profile: hashed keys of `kinds`, DPUUID attributes, suppressed.

    Kinds not asked for stay null: phone parsing is the costliest step of a run.
    """
    names = snapshot.collect_schema().names()

    def col(name: str, dtype: pl.DataType | type[pl.DataType] = pl.String) -> pl.Expr:
        return pl.col(name).cast(dtype) if name in names else pl.lit(None, dtype)

    def flag(name: str) -> pl.Expr:
        return col(name, pl.Boolean).fill_null(False)

    country = col("country").str.strip_chars().str.to_uppercase()
    if default_country:
        country = country.fill_null(default_country)
    phone = (identity.normalize("phone", col("phone"), country)
             if "phone" in kinds else pl.lit(None, pl.String))
    matches = {crm_key_column(n.removeprefix(MATCH_PREFIX)):
               identity.sha256_hex(identity.normalize("crm", pl.col(n)))
               for n in names if n.startswith(MATCH_PREFIX)}
    return snapshot.select(
        profile_id=col("profile_id"),
        suppressed=flag("opt_out") | flag("blacklisted"),
        ecid=identity.normalize("ecid", col("ecid")),
        crm_id=identity.normalize("crm", col("crm_id")),
        email_key=identity.sha256_hex(identity.normalize("email", col("email"))),
        phone_e164=phone,
        phone=col("phone"),
        country=country,
        **matches,
    ).with_columns(**{  # a key no feed matches on is not worth a SHA-256 per profile
        f"{kind}_key": (identity.sha256_hex(pl.col(source)) if kind in kinds
                        else pl.lit(None, pl.String))
        for kind, source in (("phone", "phone_e164"), ("ecid", "ecid"), ("crm", "crm_id"))
    })


def known_phones(profiles: pl.LazyFrame) -> pl.LazyFrame:
    """(number, region, e164) the snapshot already normalized: the feed side reuses them."""
    return (profiles.filter(pl.col("phone_e164").is_not_null())
            .select(identity.known_phones(pl.col("phone"), pl.col("country"),
                                          pl.col("phone_e164")))
            .unique(subset=["number", "region"], keep="first", maintain_order=True))


def crm_key_column(match_column: str | None) -> str:
    """Where the CRM key of a feed lives: crm_id's, or its own `match_column`'s."""
    return "crm_key" if match_column is None else f"crm_key:{match_column}"


def profile_keys(profiles: pl.LazyFrame, kinds: tuple[str, ...],
                 match_column: str | None = None, unique: bool = True,
                 carry: tuple[str, ...] = ()) -> pl.LazyFrame:
    """(key, matched_on, profile_id, suppressed, *carry), one row per key (`unique=False`:
    one per profile and kind, for a caller that settles repeats once over all its slices).

    Two profiles sharing a key (same email twice) resolve to the smallest profile_id, so the
    choice is deterministic across runs. On a key bucket this gives the same answer as on the
    whole table, since all rows of a key share its bucket.
    """
    parts = [
        profiles.select(
            pl.col(crm_key_column(match_column) if kind == "crm" else f"{kind}_key")
            .alias("key"),
            pl.lit(kind).alias("matched_on"), "profile_id", "suppressed", *carry,
        ).filter(pl.col("key").is_not_null())
        for kind in kinds
    ]
    return unique_keys(pl.concat(parts)) if unique else pl.concat(parts)


def unique_keys(keys: pl.LazyFrame) -> pl.LazyFrame:
    """One row per key: the smallest profile_id wins.

    Only keys that may repeat are sorted: nearly all are unique, and a sort by profile_id
    strings over a million rows cost more than the rest of the index. Repeats are found on
    a 64-bit hash of the key (hashing 64-char strings again inside `is_duplicated` took a
    second per million keys); a hash collision only sends a unique key down the exact path.
    """
    repeated = plh.NonCryptographicHashingNameSpace(pl.col("key")).xxh3_64().is_duplicated()
    return pl.concat([
        keys.filter(~repeated),
        keys.filter(repeated).sort("profile_id", "matched_on").unique(
            subset="key", keep="first", maintain_order=True),
    ])


def match(resolved: pl.LazyFrame, keys: pl.LazyFrame) -> pl.LazyFrame:
    """Left-join resolved rows to profile keys; rejected rows pass through unmatched."""
    return resolved.join(keys, on="key", how="left", validate="m:1")


def count_matches(joined: pl.DataFrame, profile: str = "profile_id") -> dict[str, int]:
    """matched / unmatched / suppressed over resolved (not rejected) rows; a row stands for
    `lines` input lines where `collapse_repeats` made it. `profile`: the column a matched
    row's profile is named by (set for every match)."""
    ok = pl.col("reject").is_null() if "reject" in joined.columns else pl.lit(True)
    found = pl.col(profile).is_not_null()
    lines = pl.col("lines") if "lines" in joined.columns else pl.lit(1, pl.UInt32)
    row = joined.select(
        matched=lines.filter(ok & found).sum(),
        unmatched=lines.filter(ok & ~found).sum(),
        suppressed=lines.filter(ok & found & pl.col("suppressed")).sum(),
    ).row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}


# How a profile was reached, as the low bits of a mention's order key (see `segment_rows`).
MATCHED_ON = ("ecid", "email", "phone", "crm", "contact")
_MATCH_BITS = 3
_LINE_BITS = 33  # line numbers below 2**32, then one bit for add/remove


def _line_order(file_seq: pl.Expr, line_no: pl.Expr) -> pl.Expr:
    return file_seq.cast(pl.UInt64) * (1 << _LINE_BITS) + line_no.cast(pl.UInt64) * 2


_SEGMENTS = pl.List(pl.UInt32)


def collapse_repeats(resolved: pl.DataFrame) -> pl.DataFrame:
    """Lines of a key seen more than once in `resolved` -> one row per (key, segment): the
    mention that wins the merge (later line; within a line the removal), as a one-segment
    line. `lines` holds how many input lines a row stands for (a key's count on its first
    row, 0 on the others), so the match counts still add up.

    Only done when most rows of the chunk repeat a key: millions of copies of one line
    become a few rows per chunk (less to spill, join and merge); the merge gives the same
    result as on the raw lines.
    """
    keys = resolved.get_column("key")
    if len(keys) < 2 or keys.hash().n_unique() > len(keys) // 2:
        # Few repeats (the usual case, checked cheaply): batching in the later passes bounds
        # memory already, and finding the repeats costs more than it saves.
        return resolved.with_columns(lines=pl.lit(1, pl.UInt32))
    repeated = keys.is_duplicated()
    once = resolved.filter(~repeated).with_columns(lines=pl.lit(1, pl.UInt32))
    if once.height == resolved.height:
        return once
    many = resolved.filter(repeated)
    extra = [c for c in many.columns if c not in ("key", "file_seq", "line_no", "added",
                                                   "removed")]  # per key (contact)
    line = _line_order(pl.col("file_seq"), pl.col("line_no"))
    mentions = pl.concat([
        many.select("key", *extra, segment=pl.col("added"), order=line),
        many.select("key", *extra, segment=pl.col("removed"), order=line + 1),
    ]).explode("segment").drop_nulls("segment")
    order = pl.col("order")
    one = pl.concat_list(pl.col("segment").cast(pl.UInt32))
    none = pl.lit([], dtype=_SEGMENTS)
    last = (mentions.group_by("key", "segment")
            .agg(order.max(), *(pl.col(c).first() for c in extra))
            .join(many.group_by("key").agg(_n=pl.len()), on="key")
            .sort("key", "segment"))  # deterministic spill content
    return last.with_columns(
        file_seq=(order // (1 << _LINE_BITS)).cast(pl.UInt32),
        line_no=(order % (1 << _LINE_BITS) // 2).cast(pl.UInt32),
        added=pl.when(order % 2 == 0).then(one).otherwise(none),
        removed=pl.when(order % 2 == 1).then(one).otherwise(none),
        lines=pl.when(pl.int_range(pl.len()).over("key") == 0).then(pl.col("_n"))
        .otherwise(0).cast(pl.UInt32),
    ).select(once.columns).vstack(once)


def segment_rows(joined: pl.LazyFrame, profile: str = "profile_id",
                 carry: tuple[str, ...] = ()) -> pl.LazyFrame:
    """Matched, non-suppressed rows -> one row per segment mention: (`profile`, segment_id,
    order, *carry). `profile` names the profile: its ID, or its number in its bucket.

    `order` packs what the merge needs into one integer, so it can take a plain max instead
    of a sort or arg_max: file_seq, line_no, then the removal after the add of the same line,
    then how the profile was matched (one line has one ID, so this never decides the order).
    """
    rows = joined.filter(pl.col(profile).is_not_null() & ~pl.col("suppressed"))
    line = _line_order(pl.col("file_seq"), pl.col("line_no"))
    matched = pl.col("matched_on").cast(pl.Enum(MATCHED_ON)).to_physical().cast(pl.UInt64)

    def mentions(column: str, removal: int) -> pl.LazyFrame:
        order = (line + removal) * (1 << _MATCH_BITS) + matched
        return rows.select(profile, *carry, segment_id=pl.col(column), order=order)

    return (
        pl.concat([mentions("added", 0), mentions("removed", 1)])
        .explode("segment_id")
        .filter(pl.col("segment_id").is_not_null())
    )


def reduce_mentions(rows: pl.LazyFrame, profile: str = "profile_id") -> pl.LazyFrame:
    """Segment mentions -> the winning mention per (profile, segment_id), same columns:
    merging part by part then merging the parts' results gives the whole merge's answer."""
    return _last_mentions(rows, profile)


def _last_mentions(rows: pl.LazyFrame, profile: str) -> pl.LazyFrame:
    """(profile, segment_id, order): the greatest `order` per pair. Profile numbers and
    segment IDs (two UInt32) are grouped as one UInt64: less than half the time of a
    two-column group-by."""
    if rows.collect_schema()[profile] != pl.UInt32:
        return rows.group_by(profile, "segment_id").agg(pl.col("order").max())
    pair = pl.col(profile).cast(pl.UInt64) * (1 << 32) + pl.col("segment_id").cast(pl.UInt64)
    return rows.group_by(_pair=pair).agg(pl.col("order").max()).select(
        (pl.col("_pair") // (1 << 32)).cast(pl.UInt32).alias(profile),
        (pl.col("_pair") % (1 << 32)).cast(pl.UInt32).alias("segment_id"), "order")


def merge_segments(rows: pl.LazyFrame, profile: str = "profile_id",
                   order_by: pl.Expr | None = None) -> pl.LazyFrame:
    """Segment mentions -> (`profile`, segment_id, action, matched_on), one per pair.
    `order_by`: sort the pairs on it first (cheaper before the text columns exist).

    A segment both added and removed for a profile: the later line (file_seq, line_no) wins;
    within one line the removal wins. Rows come out in no particular order: the writers sort.
    """
    last = pl.col("order")
    removal = last // (1 << _MATCH_BITS) % 2
    matched = (last % (1 << _MATCH_BITS)).cast(pl.UInt32)
    merged = _last_mentions(rows, profile)
    return (
        (merged if order_by is None else merged.sort(order_by))
        .select(
            profile, pl.col("segment_id").cast(pl.UInt32),
            action=pl.when(removal == 1).then(pl.lit("remove")).otherwise(pl.lit("add")),
            matched_on=pl.lit(pl.Series(MATCHED_ON)).gather(matched),
        )
    )


def audience(joined: pl.LazyFrame) -> pl.LazyFrame:
    """Matched, non-suppressed rows -> merged (profile_id, segment_id, action, matched_on)."""
    return merge_segments(segment_rows(joined)).sort("profile_id", "segment_id")


def contact_rows(joined: pl.LazyFrame, profile: str = "profile_id") -> pl.LazyFrame:
    """Segment mentions of decrypted addresses with no profile (PII), keyed by `contact`."""
    # Rejected rows carry no contact (resolve clears it), so no reject filter is needed.
    rows = joined.filter(pl.col(profile).is_null() & pl.col("contact").is_not_null())
    return segment_rows(rows.with_columns(profile_id=pl.col("contact"),
                                          matched_on=pl.lit("contact"),
                                          suppressed=pl.lit(False)))


def merge_contacts(rows: pl.LazyFrame) -> pl.LazyFrame:
    return merge_segments(rows).rename({"profile_id": "contact"}).drop("matched_on")
