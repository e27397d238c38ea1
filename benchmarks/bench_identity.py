"""Rows/s of the identity expressions on 1M rows holding 500k distinct values.

Run: .venv/bin/python benchmarks/bench_identity.py [--rows N]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import polars as pl

from pipeline.identity import (
    decrypt_expr,
    encrypt_value,
    normalize_email,
    normalize_phone,
    parse_incoming_hash,
    sha256_hex,
)


def _column(rows: int, make: Callable[[int], str]) -> pl.Series:
    """`rows` values of which half are distinct, in shuffled order."""
    distinct = max(rows // 2, 1)
    values = pl.Series("v", [make(i) for i in range(distinct)], dtype=pl.String)
    index = (pl.int_range(rows, eager=True) % distinct).shuffle(seed=1)
    return values.gather(index)


def _measure(label: str, column: pl.Series, expr: pl.Expr) -> None:
    frame = column.to_frame()
    start = time.perf_counter()
    out = frame.select(expr.alias("out"))["out"]
    seconds = time.perf_counter() - start
    print(
        f"{label:<26} rows={len(frame):>9,} distinct={column.n_unique():>9,} "
        f"seconds={seconds:6.2f} rows/s={len(frame) / seconds:>12,.0f} "
        f"nulls={out.null_count():,}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    rows = parser.parse_args().rows
    key, iv = os.urandom(32), os.urandom(16)

    emails = _column(rows, lambda i: f" User.{i}@Example.COM ")
    phones = _column(
        rows,
        lambda i: (
            f"06 {i // 10**6 % 100:02d} {i // 10**4 % 100:02d} {i // 100 % 100:02d} {i % 100:02d}"
        ),
    )
    hashes = sha256_hex(pl.col("v")).alias("v")
    hex_hashes = emails.to_frame().select(hashes)["v"]
    gcm = _column(rows, lambda i: encrypt_value(f"user.{i}@example.com", "aes-gcm", key))
    cbc = _column(rows, lambda i: encrypt_value(f"user.{i}@example.com", "aes-cbc", key))
    cbc_fixed = _column(rows, lambda i: encrypt_value(f"u{i}@example.com", "aes-cbc", key, iv=iv))

    v = pl.col("v")
    _measure("sha256_hex", emails, sha256_hex(v))
    _measure("normalize_email+sha256", emails, sha256_hex(normalize_email(v)))
    _measure("parse_incoming_hash", hex_hashes, parse_incoming_hash(v))
    _measure("normalize_phone FR", phones, normalize_phone(v, "FR"))
    _measure("decrypt aes-gcm", gcm, decrypt_expr(v, "aes-gcm", key))
    _measure("decrypt aes-cbc (iv prefix)", cbc, decrypt_expr(v, "aes-cbc", key))
    _measure("decrypt aes-cbc (fixed iv)", cbc_fixed, decrypt_expr(v, "aes-cbc", key, iv))


if __name__ == "__main__":
    main()
