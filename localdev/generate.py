"""Synthetic data: AAM deliveries (split gzip + .info) and a Campaign profile snapshot.

Deterministic for a seed. The ID mix follows production feeds: an email feed with 40%
encrypted (AES-GCM), 40% SHA-256 and 20% plain IDs, a phone feed and an ECID feed, ~1% bad
lines, ~10% IDs without a profile and a few opted-out/blacklisted profiles.
Feeds named in `full_feeds` get `full` deliveries (SPEC §11): every day the same lines
without removal lists, each day missing a different 10% of them (every 10th line, shifted by
one each day), so each full delivery after the first has leavers and returners, well below
the default removal safety valve.

Built for benchmark sizes (tens of millions of lines): every column is a polars expression
over a row index with a counter-based random generator (SplitMix64), lines are produced and
gzip-streamed in chunks so memory stays flat, and only AES-GCM runs per value in Python.
"""

from __future__ import annotations

import gzip
import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import polars as pl
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.formats import InfoEntry, render_info
from pipeline.identity import sha256_hex

BASE_TS_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z: fixed so names are reproducible
DAY_MS = 86_400_000
SEGMENTS = (111, 112, 113, 114, 115)
KEY_ENV = "DEMO_DECLARED_ID_KEY"
CHUNK_ROWS = 500_000  # lines generated and compressed at a time (bounds memory)
GZIP_LEVEL = 6  # zlib's default: ~2x faster than gzip.compress's 9, same format
MISSING_EVERY = 10  # a full feed's delivery of day d lacks the lines with row % 10 == d % 10
FEEDS = ("email", "phone", "ecid")

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


@dataclass(frozen=True)
class GenerateSpec:
    lines: int = 10_000  # lines of the email feed; phone and ECID feeds get a tenth each
    profiles: int = 5_000
    files: int = 2  # split files per delivery
    deliveries: int = 1  # per feed, one per day
    seed: int = 1
    bad_ratio: float = 0.01
    # "mixed": the feeds above. "email": three email feeds, one per encoding (40% AES-GCM,
    # 40% SHA-256 hex, 20% plain of `lines`), 30 segments. "nightly": `feeds` small email
    # feeds of `lines` lines each, encodings in turn (see `email_feeds`).
    workload: str = "mixed"
    feeds: int = 20  # "nightly" only
    full_feeds: tuple[str, ...] = ()  # "mixed": feeds (email, phone, ecid) delivered `full`


def demo_key(seed: int) -> bytes:
    return hashlib.sha256(f"demo-key-{seed}".encode()).digest()


def generate(output: str | Path, spec: GenerateSpec) -> dict:
    out = Path(output)
    key = demo_key(spec.seed)
    if spec.workload != "mixed":
        return _generate_email(out, spec, key)
    profiles = profile_frame(spec.profiles, spec.seed)
    snap = out / "profiles" / "snapshot.parquet"
    snap.parent.mkdir(parents=True, exist_ok=True)
    profiles.write_parquet(snap)
    feeds: dict[str, tuple[int, IdFactory]] = {
        "email": (spec.lines, email_ids),
        "phone": (max(spec.lines // 10, 1), phone_ids),
        "ecid": (max(spec.lines // 10, 1), ecid_ids),
    }
    written: dict[str, list[str]] = {}
    for feed, (n, make_ids) in feeds.items():
        written[feed] = []
        full = feed in spec.full_feeds
        for d in range(spec.deliveries):
            seed = spec.seed * 1000 + d * 10 + len(written)
            ts = BASE_TS_MS + d * DAY_MS + len(written) * 1000
            root = f"ftp_5000_{6000 + len(written)}_{'full' if full else 'iter'}_{ts}"
            # A full feed repeats day 0's lines (its seed) less that day's missing share.
            feed_lines = _FeedLines(spec.profiles, n, seed - d * 10 if full else seed, key,
                                    make_ids, spec.bad_ratio, d if full else None)
            written[feed] += write_delivery(out / "feeds" / feed, root, feed_lines, spec.files)
    return {
        "profiles": str(snap),
        "feeds": {k: str(out / "feeds" / k) for k in feeds},
        "files": written,
        "key_env": KEY_ENV,
        "key_hex": key.hex(),
    }


# --------------------------------------------------------------------------------------------
# Counter-based randomness: row i of stream s is a pure function of (seed, s, i), so chunks
# can be produced in any order and the data never depends on the chunk size.
# --------------------------------------------------------------------------------------------


def _mix64(z: int) -> int:
    z = (z + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _u64(row: pl.Expr, seed: int, stream: int) -> pl.Expr:
    """SplitMix64 of (seed, stream, row): a uniform UInt64 per row (wrapping arithmetic)."""
    base = _mix64(_mix64(seed & _MASK64) ^ stream)

    def lit(v: int) -> pl.Expr:
        return pl.lit(v, dtype=pl.UInt64)

    z = row.cast(pl.UInt64) * lit(_GOLDEN) + lit(base)
    z = (z.xor(z // (1 << 30))) * lit(_MIX1)  # unsigned floor division == shift right
    z = (z.xor(z // (1 << 27))) * lit(_MIX2)
    return z.xor(z // (1 << 31))


def _uniform(row: pl.Expr, seed: int, stream: int) -> pl.Expr:
    """Uniform float in [0, 1) from the top 53 bits."""
    return (_u64(row, seed, stream) // (1 << 11)).cast(pl.Float64) * (2.0 ** -53)


def _below(row: pl.Expr, seed: int, stream: int, n: int) -> pl.Expr:
    """Uniform integer in [0, n) (modulo bias < n / 2**64, negligible)."""
    return (_u64(row, seed, stream) % pl.lit(n, dtype=pl.UInt64)).cast(pl.Int64)


# --------------------------------------------------------------------------------------------
# Profiles and IDs
# --------------------------------------------------------------------------------------------


def profile_frame(n: int, seed: int, opt_out: float = 0.03,
                  blacklisted: float = 0.01) -> pl.DataFrame:
    i = pl.col("i")
    flag = _uniform(i, seed, 0)
    return pl.DataFrame({"i": pl.int_range(0, n, eager=True, dtype=pl.Int64)}).select(
        profile_id=pl.format("P{}", i.cast(pl.String).str.zfill(8)),
        email=_email(i),
        phone=pl.format("0{}", i + 600_000_000),
        country=pl.lit("FR"),
        ecid=_ecid(i),
        crm_id=pl.format("CRM{}", i),
        opt_out=flag < opt_out,
        blacklisted=(flag >= opt_out) & (flag < opt_out + blacklisted),
    )


def _email(idx: pl.Expr) -> pl.Expr:
    return pl.format("user{}@example{}.com", idx, idx % 7)


def _ecid(idx: pl.Expr) -> pl.Expr:
    return (idx + 10**17).cast(pl.String).str.zfill(38)


def _picks(row: pl.Expr, profiles: int, seed: int) -> pl.Expr:
    """Profile index per line; ~10% point past the snapshot (unmatched IDs)."""
    return _below(row, seed, 1, profiles + profiles // 9 + 1)


# An ID factory turns a frame with the line index `row` and profile index `idx` into the
# `user` column; it may run Python (AES) on the chunk.
IdFactory = Callable[[pl.DataFrame, int, bytes], pl.Series]


def email_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    """40% AES-GCM, 30% SHA-256 hex, 10% SHA-256 Base64, 15% plain, 5% upper-case plain."""
    r = _uniform(pl.col("row"), seed, 2)
    email = _email(pl.col("idx"))
    digest_hex = sha256_hex(email)
    ids = frame.select(
        pl.when(r < 0.4).then(pl.lit(None, pl.String))
        .when(r < 0.7).then(digest_hex)
        .when(r < 0.8).then(digest_hex.str.decode("hex").bin.encode("base64"))
        .when(r > 0.95).then(email.str.to_uppercase())
        .otherwise(email)
        .alias("user"),
        encrypt=r < 0.4,
        email=email,
    )
    positions = ids.get_column("encrypt").arg_true()
    if positions.len() == 0:
        return ids.get_column("user")
    row = pl.col("row")
    nonce = frame.get_column("row").gather(positions).to_frame().select(
        hi=_u64(row, seed, 7), lo=_u64(row, seed, 8) % (1 << 32))
    plain = ids.get_column("email").gather(positions).to_list()
    tokens = _encrypt_batch(plain, nonce["hi"].to_list(), nonce["lo"].to_list(), key)
    return ids.get_column("user").scatter(positions, tokens)


def _encrypt_batch(values: list[str], hi: list[int], lo: list[int], key: bytes) -> pl.Series:
    """AES-GCM tokens (Base64 of nonce || ciphertext || tag) for a batch of values.

    The 12-byte nonce of a row is its random (hi, lo) pair; Base64 runs column-wise.
    """
    aead = AESGCM(key)
    raw = []
    for value, h, low in zip(values, hi, lo, strict=True):
        nonce = h.to_bytes(8, "little") + low.to_bytes(4, "little")
        raw.append(nonce + aead.encrypt(nonce, value.encode(), None))
    return pl.Series(raw, dtype=pl.Binary).bin.encode("base64")


def phone_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    # IDs cannot hold spaces (the line format is space separated).
    local = (pl.col("idx") + 600_000_000).cast(pl.String)  # a French mobile's national number
    national = _uniform(pl.col("row"), seed, 2) < 0.5
    return frame.select(
        pl.when(national).then(pl.format("0{}", local)).otherwise(pl.format("+33{}", local))
        .alias("user")
    ).get_column("user")


def ecid_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    return frame.select(_ecid(pl.col("idx")).alias("user")).get_column("user")


# --------------------------------------------------------------------------------------------
# Segment lines
# --------------------------------------------------------------------------------------------


def _segment_table() -> tuple[list[str], list[str]]:
    """Added lists (10 per size 1..3; size 1 listed twice) and the matching removal suffix."""
    added, removed = [], []
    for size in (1, 2, 3):
        subsets = list(combinations(SEGMENTS, size))
        for combo in (subsets * 2)[:10]:
            added.append(",".join(map(str, combo)))
            removed.append(str(next(s for s in SEGMENTS if s not in combo)))
    return added, removed


_ADDED, _REMOVED = _segment_table()


def segment_lines(frame: pl.DataFrame, seed: int, bad_ratio: float,
                  removals: bool = True) -> pl.Series:
    """`USER SEGS[ REMOVED]` per row of `frame` (columns `row`, `user`); ~bad_ratio bad lines.
    Without `removals` (full deliveries: current members only) no line removes a segment."""
    row = pl.col("row")
    r_bad = _uniform(row, seed, 3)
    combo = _below(row, seed, 4, len(_ADDED))
    added = pl.lit(pl.Series(_ADDED)).gather(combo)
    removal = pl.lit(pl.Series(_REMOVED)).gather(combo)
    with_removal = (_uniform(row, seed, 5) < 0.1) & removals
    good = pl.concat_str(
        pl.col("user"), pl.lit(" "), added,
        pl.when(with_removal).then(pl.lit(" ") + removal).otherwise(pl.lit("")),
    )
    line = (
        pl.when(r_bad < bad_ratio / 2).then(pl.col("user") + " 111,abc")
        .when(r_bad < bad_ratio)
        .then(pl.format("not-an-id-{} 112", _below(row, seed, 6, 10**6)))
        .otherwise(good)
    )
    return frame.select(line.alias("line")).get_column("line")


@dataclass(frozen=True)
class _FeedLines:
    """The lines of one delivery, produced on demand for a row range."""

    profiles: int
    count: int
    seed: int
    key: bytes
    make_ids: IdFactory
    bad_ratio: float
    full_day: int | None = None  # a full delivery of this day (which lines it lacks)
    many_segments: bool = False  # email workload: 1-4 of 30 segments, ~70% matched

    def chunk(self, start: int, stop: int) -> pl.Series:
        frame = pl.DataFrame({"row": pl.int_range(start, stop, eager=True, dtype=pl.Int64)})
        if self.full_day is not None:
            frame = frame.filter(pl.col("row") % MISSING_EVERY != self.full_day % MISSING_EVERY)
        picks = _email_picks if self.many_segments else _picks
        frame = frame.with_columns(idx=picks(pl.col("row"), self.profiles, self.seed))
        frame = frame.with_columns(user=self.make_ids(frame, self.seed, self.key))
        if self.many_segments:
            return email_segment_lines(frame, self.seed, self.bad_ratio)
        return segment_lines(frame, self.seed, self.bad_ratio,
                             removals=self.full_day is None)

    def chunks(self, start: int, stop: int) -> Iterator[pl.Series]:
        for lo in range(start, stop, CHUNK_ROWS):
            chunk = self.chunk(lo, min(lo + CHUNK_ROWS, stop))
            if chunk.len():
                yield chunk


# --------------------------------------------------------------------------------------------
# Email workloads: one feed per encoding, 30 segments
# --------------------------------------------------------------------------------------------

EMAIL_SEGMENTS = tuple(range(1001, 1031))  # all 30 mapped to traits 9001..9030 in benchmarks
EMAIL_FEEDS = (("encrypted", "encrypted", 0.4), ("hashed", "sha256", 0.4),
               ("plain", "plain", 0.2))  # (feed, id_encoding, share of lines)
MATCH_RATIO = 0.7


def email_feeds(spec: GenerateSpec) -> list[tuple[str, str, int]]:
    """(feed name, id_encoding, lines) of an email workload."""
    if spec.workload == "email":
        return [(name, enc, max(round(spec.lines * share), 1))
                for name, enc, share in EMAIL_FEEDS]
    if spec.workload == "nightly":
        return [(f"{EMAIL_FEEDS[i % 3][0]}{i + 1:02d}", EMAIL_FEEDS[i % 3][1], spec.lines)
                for i in range(spec.feeds)]
    raise ValueError(f"unknown workload {spec.workload!r}")


def _generate_email(out: Path, spec: GenerateSpec, key: bytes) -> dict:
    snap = out / "profiles" / "snapshot.parquet"
    snap.parent.mkdir(parents=True, exist_ok=True)
    # ~5% of profiles suppressed (3.5% opted out, 1.5% blacklisted).
    profile_frame(spec.profiles, spec.seed, 0.035, 0.015).write_parquet(snap)
    factories = {"encrypted": encrypted_email_ids, "sha256": hashed_email_ids,
                 "plain": plain_email_ids}
    feeds, written, encodings = {}, {}, {}
    for n, (name, encoding, lines) in enumerate(email_feeds(spec)):
        folder = out / "feeds" / name
        feeds[name], encodings[name], written[name] = str(folder), encoding, []
        for d in range(spec.deliveries):
            ts = BASE_TS_MS + d * DAY_MS + n * 1000
            feed_lines = _FeedLines(spec.profiles, lines, spec.seed * 1000 + d * 10 + n, key,
                                    factories[encoding], spec.bad_ratio, many_segments=True)
            root = f"ftp_5000_{7000 + n}_iter_{ts}"
            written[name] += write_delivery(folder, root, feed_lines, spec.files)
    return {"profiles": str(snap), "feeds": feeds, "encodings": encodings, "files": written,
            "key_env": KEY_ENV, "key_hex": key.hex(),
            "segments": list(EMAIL_SEGMENTS)}


def _email_picks(row: pl.Expr, profiles: int, seed: int) -> pl.Expr:
    """Profile index per line; ~30% point past the snapshot (unmatched IDs)."""
    return _below(row, seed, 1, max(round(profiles / MATCH_RATIO), 1))


def _varied_email(frame_seed: int) -> pl.Expr:
    """The profile's email, 5% of them upper-case (normalization has work to do)."""
    upper = _uniform(pl.col("row"), frame_seed, 9) < 0.05
    email = _email(pl.col("idx"))
    return pl.when(upper).then(email.str.to_uppercase()).otherwise(email)


def encrypted_email_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    emails = frame.select(_varied_email(seed)).to_series()
    nonce = frame.select(hi=_u64(pl.col("row"), seed, 7),
                         lo=_u64(pl.col("row"), seed, 8) % (1 << 32))
    return _encrypt_batch(emails.to_list(), nonce["hi"].to_list(), nonce["lo"].to_list(), key)


def hashed_email_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    return frame.select(sha256_hex(_email(pl.col("idx")))).to_series()


def plain_email_ids(frame: pl.DataFrame, seed: int, key: bytes) -> pl.Series:
    return frame.select(_varied_email(seed)).to_series()


def _combo_table() -> tuple[list[str], list[str], list[int], list[int]]:
    """Every set of 1-4 of the 30 segments as `a,b,..`, a removal outside it per set, and the
    (offset, count) of each size in the table."""
    added, removed, offsets, counts = [], [], [], []
    for size in (1, 2, 3, 4):
        offsets.append(len(added))
        subsets = list(combinations(EMAIL_SEGMENTS, size))
        counts.append(len(subsets))
        for combo in subsets:
            added.append(",".join(map(str, combo)))
            after = [s for s in EMAIL_SEGMENTS if s not in combo]
            removed.append(str(after[(combo[-1] - EMAIL_SEGMENTS[0]) % len(after)]))
    return added, removed, offsets, counts


_COMBOS: tuple[list[str], list[str], list[int], list[int]] | None = None


def email_segment_lines(frame: pl.DataFrame, seed: int, bad_ratio: float) -> pl.Series:
    """`USER SEGS[ REMOVED]`: 1-4 segments (size uniform), ~10% with a removal."""
    global _COMBOS
    if _COMBOS is None:
        _COMBOS = _combo_table()
    added_t, removed_t, offsets, counts = _COMBOS
    row = pl.col("row")
    size = _below(row, seed, 10, 4)
    offset = pl.lit(pl.Series(offsets, dtype=pl.Int64)).gather(size)
    count = pl.lit(pl.Series(counts, dtype=pl.Int64)).gather(size)
    combo = offset + (_u64(row, seed, 4) % count.cast(pl.UInt64)).cast(pl.Int64)
    frame = frame.with_columns(
        _added=pl.lit(pl.Series(added_t)).gather(combo),
        _removal=pl.lit(pl.Series(removed_t)).gather(combo))
    r_bad = _uniform(row, seed, 3)
    good = pl.concat_str(
        pl.col("user"), pl.lit(" "), pl.col("_added"),
        pl.when(_uniform(row, seed, 5) < 0.1).then(pl.lit(" ") + pl.col("_removal"))
        .otherwise(pl.lit("")),
    )
    line = (
        pl.when(r_bad < bad_ratio / 2).then(pl.col("user") + " 1001,abc")
        .when(r_bad < bad_ratio)
        .then(pl.format("not-an-id-{} 1002", _below(row, seed, 6, 10**6)))
        .otherwise(good)
    )
    return frame.select(line.alias("line")).get_column("line")


def write_delivery(folder: Path, root: str, lines: _FeedLines, files: int) -> list[str]:
    """Split gzip files named like AAM's outbound files, then the `.info` last."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-lines.count // files)
    entries, names = [], []
    for n in range(files):
        start, stop = n * per_file, min((n + 1) * per_file, lines.count)
        name = f"{root}-{n + 1}.sync.gz" if files > 1 else f"{root}.sync.gz"
        path = folder / name
        count = _write_gzip(path, lines.chunks(start, stop)) if stop > start else _empty(path)
        size, md5 = _size_md5(path)
        entries.append(InfoEntry(name, size, count, n + 1, md5))
        names.append(name)
    (folder / f"{root}.info").write_text(render_info(entries, root))
    return names


def _write_gzip(path: Path, chunks: Iterator[pl.Series]) -> int:
    """Stream chunks of lines into one gzip member (no name, mtime 0); returns the line count.

    zlib releases the GIL: chunk k is compressed on a worker thread while chunk k+1 is
    generated, and at most one chunk waits, so memory stays at about two chunks.
    """
    count = 0
    with (open(path, "wb") as raw,
          gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL,
                        mtime=0) as gz,
          ThreadPoolExecutor(max_workers=1) as pool):
        pending: Future | None = None
        for chunk in chunks:
            data = (chunk.str.join("\n").item() + "\n").encode()
            count += chunk.len()
            del chunk
            if pending is not None:
                pending.result()
            pending = pool.submit(gz.write, data)
        if pending is not None:
            pending.result()
    return count


def _empty(path: Path) -> int:
    path.write_bytes(gzip.compress(b"", mtime=0))
    return 0


def _size_md5(path: Path) -> tuple[int, str]:
    md5 = hashlib.md5()  # noqa: S324 - AAM's control files carry md5
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            md5.update(block)
    return path.stat().st_size, md5.hexdigest()
