"""Synthetic data: AAM deliveries (split gzip + .info) and a Campaign profile snapshot.

Deterministic for a seed. The ID mix follows production feeds: an email feed with 40%
encrypted (AES-GCM), 40% SHA-256 and 20% plain IDs, a phone feed and an ECID feed, ~1% bad
lines, ~10% IDs without a profile and a few opted-out/blacklisted profiles.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.formats import InfoEntry, render_info
from pipeline.identity import encrypt_value

BASE_TS_MS = 1_764_000_000_000  # 2025-11-24T16:00:00Z: fixed so names are reproducible
DAY_MS = 86_400_000
SEGMENTS = (111, 112, 113, 114, 115)
KEY_ENV = "DEMO_DECLARED_ID_KEY"


@dataclass(frozen=True)
class GenerateSpec:
    lines: int = 10_000  # lines of the email feed; phone and ECID feeds get a tenth each
    profiles: int = 5_000
    files: int = 2  # split files per delivery
    deliveries: int = 1  # per feed, one per day
    seed: int = 1
    bad_ratio: float = 0.01


def demo_key(seed: int) -> bytes:
    return hashlib.sha256(f"demo-key-{seed}".encode()).digest()


def generate(output: str | Path, spec: GenerateSpec) -> dict:
    out = Path(output)
    key = demo_key(spec.seed)
    profiles = profile_frame(spec.profiles, spec.seed)
    snap = out / "profiles" / "snapshot.parquet"
    snap.parent.mkdir(parents=True, exist_ok=True)
    profiles.write_parquet(snap)
    feeds = {
        "email": (spec.lines, email_ids),
        "phone": (max(spec.lines // 10, 1), phone_ids),
        "ecid": (max(spec.lines // 10, 1), ecid_ids),
    }
    written: dict[str, list[str]] = {}
    for feed, (n, make_ids) in feeds.items():
        written[feed] = []
        for d in range(spec.deliveries):
            seed = spec.seed * 1000 + d * 10 + len(written)
            ids = make_ids(profiles, n, seed, key)
            lines = segment_lines(ids, seed, spec.bad_ratio)
            ts = BASE_TS_MS + d * DAY_MS + len(written) * 1000
            root = f"ftp_5000_{6000 + len(written)}_iter_{ts}"
            written[feed] += write_delivery(out / "feeds" / feed, root, lines, spec.files)
    return {
        "profiles": str(snap),
        "feeds": {k: str(out / "feeds" / k) for k in feeds},
        "files": written,
        "key_env": KEY_ENV,
        "key_hex": key.hex(),
    }


def profile_frame(n: int, seed: int) -> pl.DataFrame:
    rng = random.Random(seed)
    i = pl.int_range(0, n, eager=True)
    flags = [rng.random() for _ in range(n)]
    return pl.DataFrame({"i": i}).select(
        profile_id=pl.format("P{}", pl.col("i").cast(pl.String).str.zfill(8)),
        email=pl.format("user{}@example{}.com", pl.col("i"), pl.col("i") % 7),
        phone=pl.format("0{}", pl.col("i") + 600_000_000),
        country=pl.lit("FR"),
        ecid=pl.format("{}", (pl.col("i") + 10**17).cast(pl.String).str.zfill(38)),
        crm_id=pl.format("CRM{}", pl.col("i")),
        opt_out=pl.Series([f < 0.03 for f in flags]),
        blacklisted=pl.Series([0.03 <= f < 0.04 for f in flags]),
    )


def _picks(profiles: pl.DataFrame, n: int, seed: int) -> list[int]:
    """Profile indexes for n lines; ~10% point past the snapshot (unmatched IDs)."""
    rng = random.Random(seed)
    size = profiles.height
    return [rng.randrange(size + size // 9 + 1) for _ in range(n)]


def email_ids(profiles: pl.DataFrame, n: int, seed: int, key: bytes) -> list[str]:
    rng = random.Random(seed + 1)
    out = []
    for idx in _picks(profiles, n, seed):
        email = f"user{idx}@example{idx % 7}.com"
        r = rng.random()
        if r < 0.4:
            nonce = rng.randbytes(12)
            out.append(encrypt_value(email, "aes-gcm", key, nonce=nonce))
        elif r < 0.8:
            digest = hashlib.sha256(email.encode()).digest()
            out.append(digest.hex() if r < 0.7 else base64.b64encode(digest).decode())
        else:
            out.append(email.upper() if r > 0.95 else email)
    return out


def phone_ids(profiles: pl.DataFrame, n: int, seed: int, key: bytes) -> list[str]:
    rng = random.Random(seed + 2)
    out = []
    for idx in _picks(profiles, n, seed):
        local = str(600_000_000 + idx)  # national significant number of a French mobile
        # IDs cannot hold spaces (the line format is space separated).
        out.append(f"0{local}" if rng.random() < 0.5 else f"+33{local}")
    return out


def ecid_ids(profiles: pl.DataFrame, n: int, seed: int, key: bytes) -> list[str]:
    return [str(idx + 10**17).zfill(38) for idx in _picks(profiles, n, seed)]


def segment_lines(ids: list[str], seed: int, bad_ratio: float) -> list[str]:
    rng = random.Random(seed + 3)
    lines = []
    for user in ids:
        r = rng.random()
        if r < bad_ratio / 2:
            lines.append(f"{user} 111,abc")
        elif r < bad_ratio:
            lines.append(f"not-an-id-{rng.randrange(10**6)} 112")
        else:
            added = sorted(rng.sample(SEGMENTS, rng.randint(1, 3)))
            line = f"{user} {','.join(map(str, added))}"
            if rng.random() < 0.1:
                removed = [s for s in SEGMENTS if s not in added][:1]
                line += f" {','.join(map(str, removed))}"
            lines.append(line)
    return lines


def write_delivery(folder: Path, root: str, lines: list[str], files: int) -> list[str]:
    """Split gzip files named like AAM's outbound files, then the `.info` last."""
    folder.mkdir(parents=True, exist_ok=True)
    per_file = -(-len(lines) // files)
    entries, names = [], []
    for n in range(files):
        chunk = lines[n * per_file:(n + 1) * per_file]
        name = f"{root}-{n + 1}.sync.gz" if files > 1 else f"{root}.sync.gz"
        data = gzip.compress(("\n".join(chunk) + "\n").encode() if chunk else b"", mtime=0)
        (folder / name).write_bytes(data)
        md5 = hashlib.md5(data).hexdigest()  # noqa: S324
        entries.append(InfoEntry(name, len(data), len(chunk), n + 1, md5))
        names.append(name)
    (folder / f"{root}.info").write_text(render_info(entries, root))
    return names


def env_for(result: dict) -> dict[str, str]:
    return {**os.environ, result["key_env"]: result["key_hex"]}


__all__ = ["GenerateSpec", "generate", "json"]
