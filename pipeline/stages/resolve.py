"""Resolve: parse segment lines and turn each user ID into a hashed key, or a reject reason.

Pure frame -> frame; works on any subset of rows (one file, one key bucket).
"""

from __future__ import annotations

import polars as pl

from pipeline import identity
from pipeline.config import FeedConfig
from pipeline.errors import ConfigError
from pipeline.formats import parse_lines

_HEX64 = r"^\s*[0-9a-fA-F]{64}\s*$"
BAD_UTF8 = "\ufffd"


def parse(lines: pl.LazyFrame) -> pl.LazyFrame:
    """Segment lines -> user_id/added/removed/format_error; blank lines dropped."""
    parsed = parse_lines(lines)
    bad_utf8 = pl.col("line").str.contains(BAD_UTF8, literal=True)
    too_long = pl.col("format_error") == "line_too_long"
    return parsed.with_columns(
        format_error=pl.when(bad_utf8 & ~too_long.fill_null(False)).then(pl.lit("bad_utf8"))
        .otherwise(pl.col("format_error"))
    )


def resolve(parsed: pl.LazyFrame, feed: FeedConfig, default_country: str | None,
            known_phones: pl.DataFrame | None = None) -> pl.LazyFrame:
    """Add `key` (SHA-256 hex), `contact` (decrypted address) and `reject` (reason or null).

    `known_phones` (number, region, e164) spares phone parsing for numbers normalized before.

    Built in stages of named columns: polars does not share subexpressions inside when/then,
    so one nested expression would recompute its branches many times over.
    """
    country = feed.default_country or default_country
    user_id = pl.col("user_id")
    ok_format = pl.col("format_error").is_null()
    frame = parsed.with_columns(_id=pl.when(ok_format).then(user_id))
    decrypts = feed.id_encoding in ("encrypted", "auto")
    if decrypts:
        frame = _decrypted(frame, feed, country, known_phones)
    ident = pl.col("_id")
    if feed.id_encoding == "plain":
        key = identity.sha256_hex(normalize_any(feed.kinds, ident, country, known_phones))
    elif feed.id_encoding == "sha256":
        key = identity.parse_incoming_hash(ident)
    elif feed.id_encoding == "encrypted":
        key = identity.sha256_hex(pl.col("_dec"))
    else:
        # auto, per row. A value that decrypts to a valid ID is encrypted even when it has a
        # hash's shape: short AES-CBC tokens are exactly 44-char Base64 like a SHA-256, while
        # a real hash never authenticates (GCM) nor decrypts to a valid address (CBC). Then
        # hash shape -> hashed, else plain (SPEC §3). Each branch sees only its own rows.
        frame = frame.with_columns(
            _hashed=identity.parse_incoming_hash(pl.when(pl.col("_dec").is_null()).then(ident)))
        frame = frame.with_columns(
            _plain=pl.when(pl.col("_dec").is_null() & pl.col("_hashed").is_null()).then(ident))
        plain = normalize_any(feed.kinds, pl.col("_plain"), country, known_phones)
        key = pl.coalesce(identity.sha256_hex(pl.col("_dec")), pl.col("_hashed"),
                          identity.sha256_hex(plain))
    contact = pl.col("_contact") if decrypts else pl.lit(None, pl.String)
    decrypt_failed = (pl.col("_dec_raw").is_null() if feed.id_encoding == "encrypted"
                      else pl.lit(False))
    reject = (
        pl.when(~ok_format).then(pl.col("format_error"))
        .when(decrypt_failed).then(pl.lit("decrypt_failure"))
        .when(pl.col("key").is_null()).then(pl.lit("invalid_id"))
        .otherwise(pl.lit(None, pl.String))
    )
    ok = pl.col("reject").is_null()
    return (
        frame.with_columns(key=key)
        .with_columns(reject=reject)
        .with_columns(key=pl.when(ok).then(pl.col("key")), contact=pl.when(ok).then(contact))
        .select(pl.exclude("^_.*$"))
    )


# Kinds that are addresses a message can reach: only these go to the no-profile contacts file
# (SPEC §5: "decrypted email/SMS addresses"); an encrypted ECID or CRM ID is not one.
CONTACT_KINDS = ("email", "phone")


def _decrypted(frame: pl.LazyFrame, feed: FeedConfig, country: str | None,
               known: pl.DataFrame | None) -> pl.LazyFrame:
    """Add `_dec_raw` (plaintext), `_dec` (normalized as the first kind that accepts it) and
    `_contact` (that value if it is an address kind)."""
    ident = pl.col("_id")
    # Under auto only a valid ID counts, so tokens too short to hold one are not tried
    # (a Base64 SHA-256 is 32 bytes: a GCM token of 4 plaintext bytes, never an email).
    # A 64-hex value is a hash: a token's Base64 is never all hex digits ((16/64)^64).
    if feed.decryption is None or feed.key is None:  # config requires both for this encoding
        raise ConfigError(f"feed {feed.name!r}: id_encoding {feed.id_encoding!r} needs "
                          "decryption and key_env")
    min_plain = identity.min_id_bytes(feed.kinds) if feed.id_encoding == "auto" else 0
    candidates = pl.when(~ident.str.contains(_HEX64)).then(ident)
    # Materialized once: the UDFs (AES, phone parsing) must not run again in every branch.
    frame = frame.with_columns(_dec_raw=identity.decrypt_expr(
        candidates, feed.decryption, feed.key, feed.iv, min_plain))
    parts = normalized_parts(feed.kinds, pl.col("_dec_raw"), country, known)
    frame = frame.with_columns(**{f"_dec_{kind}": part for kind, part in parts.items()})
    # The kinds are disjoint (38 digits are no E.164 number, an ECID has no '@') except CRM,
    # which comes last and takes anything, so the first address kind is the detected kind.
    addresses = [pl.col(f"_dec_{kind}") for kind in parts if kind in CONTACT_KINDS]
    return frame.with_columns(_dec=_first([pl.col(f"_dec_{kind}") for kind in parts]),
                              _contact=_first(addresses))


def _first(parts: list[pl.Expr]) -> pl.Expr:
    if not parts:
        return pl.lit(None, pl.String)
    return parts[0] if len(parts) == 1 else pl.coalesce(parts)


_PHONE_SHAPE = r"^\+?[0-9][0-9 ().\-]{3,}$"


def normalize_any(kinds: tuple[str, ...], value: pl.Expr, country: str | None,
                  known_phones: pl.DataFrame | None = None) -> pl.Expr:
    """Normalize as the first kind that accepts the value (kinds in detection order)."""
    return _first(list(normalized_parts(kinds, value, country, known_phones).values()))


def normalized_parts(kinds: tuple[str, ...], value: pl.Expr, country: str | None,
                     known_phones: pl.DataFrame | None = None) -> dict[str, pl.Expr]:
    """The value normalized as each kind (null where that kind rejects it), in kinds order.

    Phone parsing is costly, so in a mixed feed it only sees values shaped like a number.
    """
    if len(kinds) == 1:
        return {kinds[0]: identity.normalize(kinds[0], value, country, known_phones)}
    parts: dict[str, pl.Expr] = {}
    for kind in kinds:
        source = value
        if kind == "phone":
            source = pl.when(value.str.strip_chars().str.contains(_PHONE_SHAPE)).then(value)
        parts[kind] = identity.normalize(kind, source, country, known_phones)
    return parts


def count_rejects(resolved: pl.DataFrame) -> dict[str, int]:
    """Counts per report bucket (format_errors, invalid_ids, decrypt_failures)."""
    reason = pl.col("reject")
    row = resolved.select(
        format_errors=(reason.is_not_null() & ~reason.is_in(["invalid_id", "decrypt_failure"]))
        .sum(),
        invalid_ids=(reason == "invalid_id").sum(),
        decrypt_failures=(reason == "decrypt_failure").sum(),
    ).row(0, named=True)
    return {k: int(v or 0) for k, v in row.items()}
