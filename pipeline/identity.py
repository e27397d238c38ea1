"""Identity rules of SPEC §3: normalization, SHA-256 keys, incoming hashes, keys and decryption.

Everything is an expression factory or a batch helper. Python runs per row only where no
vectorized form exists (phone parsing, AES), and then once per distinct value of a batch.
"""

from __future__ import annotations

import base64
import binascii
import multiprocessing
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

import phonenumbers
import polars as pl
import polars_hash as plh
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from pipeline.errors import ConfigError

KINDS = ("ecid", "email", "phone", "crm")
ALGORITHMS = ("aes-gcm", "aes-cbc")
KEY_SIZES = (16, 24, 32)

_NULL_STR = pl.lit(None, dtype=pl.String)
# One '@', a non-empty local part, a domain of 2+ non-empty dot-separated labels; no
# whitespace or control character anywhere (Rust regex: \s and \p{Cc} are Unicode-aware).
_EMAIL = r"^[^@\s\p{Cc}]+@[^@.\s\p{Cc}]+(?:\.[^@.\s\p{Cc}]+)+$"
_ECID = r"^[0-9]{38}$"  # [0-9], not \d: \d would also accept non-ASCII digits
_HEX64 = r"^[0-9A-Fa-f]{64}$"
_B64_DIGEST = r"^[A-Za-z0-9+/]{43}=$"  # the only standard Base64 shape of 32 bytes
_GCM_NONCE, _GCM_TAG, _BLOCK = 12, 16, 16


def sha256_hex(expr: pl.Expr) -> pl.Expr:
    """SHA-256 of the UTF-8 string as lowercase hex; null stays null (never `pl.Expr.hash`)."""
    return plh.CryptographicHashingNameSpace(expr).sha2_256()


def normalize_email(expr: pl.Expr) -> pl.Expr:
    """Trim, lowercase, then NFC; null unless the result is a plausible address.

    NFC makes a decomposed "é" (e + U+0301) and the composed one meet on one key; it runs
    after lowercasing because case mapping may emit decomposed sequences.
    """
    # NFC leaves ASCII as it is and costs ~10x the rest, so only non-ASCII values go through
    # it; each row takes one of the two masked paths (a masked row is a null: free). Written
    # so no subexpression repeats: polars does not share them inside when/then.
    text = expr.cast(pl.String)
    ascii_only = text.str.len_bytes() == text.str.len_chars()
    plain = pl.when(ascii_only).then(text).str.strip_chars().str.to_lowercase()
    other = pl.when(~ascii_only).then(text).str.strip_chars().str.to_lowercase()
    return pl.coalesce(plain, other.str.normalize("NFC")).str.extract(_EMAIL, 0)


def normalize_ecid(expr: pl.Expr) -> pl.Expr:
    """Strip; exactly 38 ASCII digits, else null."""
    return _stripped(expr).str.extract(_ECID, 0)


def normalize_crm(expr: pl.Expr) -> pl.Expr:
    """Strip; empty is null; otherwise compared exactly (case kept)."""
    value = _stripped(expr)
    return pl.when(value.str.len_bytes() > 0).then(value).otherwise(_NULL_STR)


def _stripped(expr: pl.Expr) -> pl.Expr:
    # The cast lets integer, categorical or all-null columns through; a no-op on strings.
    return expr.cast(pl.String).str.strip_chars()


def normalize_phone(expr: pl.Expr, default_country: pl.Expr | str | None,
                    known: pl.DataFrame | None = None) -> pl.Expr:
    """E.164 via `phonenumbers` with a default region; null if unparsable, impossible or invalid.

    `known` (number, region, e164) holds results computed before, e.g. on the profile side
    (see `known_phones`): pairs found there skip `phonenumbers`, with the very same result.

    `default_country` is an ISO-3166 alpha-2 literal, a per-row expression (a null region
    accepts only international `+...` numbers), or None. Parsing runs once per distinct
    (number, region) pair of each batch; `phonenumbers` costs ~27 µs a pair (1M rows with
    500k distinct: ~65k rows/s on one core), so keep the input deduplicated where possible.
    """
    if isinstance(default_country, str):
        region = default_country.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(f"default_country {default_country!r} is not a known region")
        country: pl.Expr = pl.lit(region, dtype=pl.String)
    elif default_country is None:
        country = _NULL_STR
    else:
        country = _stripped(default_country).str.to_uppercase()
    # The struct is named after its first field, so the result keeps the input's name.
    pairs = pl.struct(_stripped(expr), country.alias("__default_region__"))

    def parse(batch: pl.Series) -> pl.Series:
        return _map_unique(batch, _e164_all) if known is None else _e164_known(batch, known)

    # Not marked elementwise although it is: the streaming engine would then call it per
    # morsel, from several threads at once, each below the size worth a process pool. One
    # call per frame dedups across the whole frame and parses in one pool batch.
    return pairs.map_batches(parse, return_dtype=pl.String, is_elementwise=False)


def known_phones(numbers: pl.Expr, regions: pl.Expr, e164: pl.Expr) -> list[pl.Expr]:
    """Columns of a `known` table for `normalize_phone` from already-normalized phones."""
    return [_stripped(numbers).alias("number"),
            _stripped(regions).str.to_uppercase().alias("region"), e164.alias("e164")]


def _e164_known(pairs: pl.Series, known: pl.DataFrame) -> pl.Series:
    """Look pairs up in `known` first: by (number, region), and a `+...` number equal to a
    known E.164 result is that result whatever the region (phonenumbers ignores it then).
    Only the distinct pairs found in neither way are parsed."""
    asked = pairs.struct.unnest()
    asked.columns = ["number", "region"]
    exact = asked.join(known, on=["number", "region"], how="left", maintain_order="left",
                       nulls_equal=True, validate="m:1")["e164"]
    plus = asked.join(known.select(number="e164", e164_plus="e164").unique(), on="number",
                      how="left", maintain_order="left")["e164_plus"]
    found = exact.fill_null(plus).alias(pairs.name)
    missing = found.is_null() & asked["number"].is_not_null()
    if not missing.any():
        return found
    return found.scatter(missing.arg_true(), _map_unique(pairs.filter(missing), _e164_all))


PARALLEL_MIN = 50_000  # distinct numbers worth a process pool (~1 s of parsing)


def _e164_all(pairs: pl.Series) -> list[str | None]:
    rows = list(pairs.struct.unnest().iter_rows())
    workers = min(os.cpu_count() or 1, 8)
    if len(rows) < PARALLEL_MIN or workers < 2:
        return _e164_rows(rows)
    # phonenumbers is pure Python, so threads would queue on the GIL: use processes.
    # "spawn" starts clean interpreters (no inherited polars threads or locks).
    size = -(-len(rows) // workers)
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [e164 for part in pool.map(_e164_rows, chunks) for e164 in part]


def _e164_rows(rows: list[tuple[str | None, str | None]]) -> list[str | None]:
    return [_e164(number, region) for number, region in rows]


def _e164(number: str | None, region: str | None) -> str | None:
    if not number:
        return None
    try:
        parsed = phonenumbers.parse(number, region)
    except phonenumbers.NumberParseException:
        return None
    if not (phonenumbers.is_possible_number(parsed) and phonenumbers.is_valid_number(parsed)):
        return None
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


# Fewest bytes a valid ID of each kind has, even before normalization ("a@b.c", 38 digits).
_MIN_ID_BYTES = {"ecid": 38, "email": 5, "phone": 1, "crm": 1}


def min_id_bytes(kinds: Sequence[str]) -> int:
    """Fewest bytes a valid ID of any of `kinds` has: shorter plaintexts are never an ID."""
    return min(_MIN_ID_BYTES[kind] for kind in kinds)


def normalize(kind: str, expr: pl.Expr, default_country: pl.Expr | str | None = None,
              known_phones: pl.DataFrame | None = None) -> pl.Expr:
    """Normalize a plain ID of `kind` (ecid | email | phone | crm); invalid IDs become null."""
    if kind == "phone":
        return normalize_phone(expr, default_country, known_phones)
    factories = {"ecid": normalize_ecid, "email": normalize_email, "crm": normalize_crm}
    if kind not in factories:
        raise ConfigError(f"id kind {kind!r} must be one of {', '.join(KINDS)}")
    return factories[kind](expr)


def parse_incoming_hash(expr: pl.Expr) -> pl.Expr:
    """An incoming SHA-256 as lowercase hex: 64 hex chars (any case) or 44-char Base64.

    Base64 must be the standard alphabet with its '=' and canonical (what every encoder
    writes); URL-safe or unpadded digests are not hash-shaped. Surrounding whitespace is
    ignored. Anything else is null.
    """
    value = _stripped(expr)
    from_hex = value.str.extract(_HEX64, 0).str.to_lowercase()
    from_b64 = value.str.extract(_B64_DIGEST, 0).str.decode("base64", strict=False)
    return pl.coalesce(from_hex, from_b64.bin.encode("hex"))


def load_key(value: str, *, name: str = "key") -> bytes:
    """Key bytes from hex or Base64 of 16/24/32 bytes; valid hex of those lengths wins.

    The error names `name` (the env variable), never the value.
    """
    return _decode_secret(value, KEY_SIZES, f"{name} must be hex or Base64 of 16, 24 or 32 bytes")


def _decode_secret(value: str, sizes: Sequence[int], message: str) -> bytes:
    text = value.strip()
    if len(text) in {2 * size for size in sizes} and re.fullmatch(r"[0-9A-Fa-f]+", text):
        return bytes.fromhex(text)
    raw = _b64decode(text)
    if raw is None or len(raw) not in sizes:
        raise ConfigError(message)  # no `from`: the cause could echo the secret
    return raw


def _b64decode(text: str) -> bytes | None:
    """Standard or URL-safe Base64, padding optional; None if it is not Base64."""
    text = text.strip().replace("-", "+").replace("_", "/")
    if not text.endswith("="):
        if len(text) % 4 == 1:
            return None
        text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _decryptor(algorithm: str, key: bytes, iv: bytes | None) -> Callable[[bytes], bytes | None]:
    """Checks key, IV and algorithm once; returns a function raw -> plaintext | None."""
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"decryption {algorithm!r} must be one of {', '.join(ALGORITHMS)}")
    if len(key) not in KEY_SIZES:
        raise ConfigError("decryption key must be 16, 24 or 32 bytes")
    if iv is not None and (algorithm != "aes-cbc" or len(iv) != _BLOCK):
        raise ConfigError("a fixed IV applies to aes-cbc only and must be 16 bytes")
    if algorithm == "aes-gcm":
        aead = AESGCM(key)

        def gcm(raw: bytes) -> bytes | None:
            if len(raw) < _GCM_NONCE + _GCM_TAG:
                return None
            try:
                return aead.decrypt(raw[:_GCM_NONCE], raw[_GCM_NONCE:], None)
            except InvalidTag:
                return None

        return gcm
    aes = algorithms.AES(key)

    def cbc(raw: bytes) -> bytes | None:
        block_iv, body = (iv, raw) if iv is not None else (raw[:_BLOCK], raw[_BLOCK:])
        if not body or len(body) % _BLOCK:
            return None
        decryptor = Cipher(aes, modes.CBC(block_iv)).decryptor()
        padded = decryptor.update(body) + decryptor.finalize()
        pad = padded[-1]
        if not 1 <= pad <= _BLOCK or padded[-pad:] != bytes([pad]) * pad:
            return None
        return padded[:-pad]

    return cbc


def decrypt_values(
    values: Sequence[str | None] | pl.Series, algorithm: str, key: bytes, iv: bytes | None = None,
    min_plain: int = 0,
) -> pl.Series:
    """Decrypt Base64 tokens (SPEC §3 formats) to UTF-8 strings.

    Null where a token is null, is not Base64, fails to authenticate or unpad, or is not
    UTF-8, or (with `min_plain`) is too short to hold that many bytes of plaintext: such
    tokens are not even tried. Raises ConfigError for an unknown algorithm or a bad key/IV.
    Tokens carry a random nonce/IV, so they are nearly all distinct: deduplicating first
    (unique + replace_strict) cost more than it saved (~1.4M tokens/s for aes-gcm without).
    """
    decrypt = _decryptor(algorithm, key, iv)
    series = values if isinstance(values, pl.Series) else pl.Series("", values, dtype=pl.String)
    raw = _b64_bytes(series.cast(pl.String))
    tried = raw.is_not_null() & (raw.bin.size() >= _overhead(algorithm, iv) + min_plain)
    tokens = raw.filter(tried).to_list()
    if algorithm == "aes-gcm":
        plains = _utf8_all(_gcm_all(AESGCM(key), tokens))
    else:
        plains = pl.Series([_utf8(decrypt(token)) for token in tokens], dtype=pl.String)
    out = pl.repeat(None, len(series), dtype=pl.String, eager=True).alias(series.name)
    return out.scatter(tried.arg_true(), plains) if len(plains) else out


def _gcm_all(aead: AESGCM, tokens: list[bytes]) -> list[bytes | None]:
    """AES-GCM over tokens already known to hold nonce + tag: one tight loop, no call per
    token besides the decryption itself (the AES-GCM ingest's only per-row Python; it holds
    the GIL, so it is kept to the bare call: UTF-8 is checked on the whole column after)."""
    out: list[bytes | None] = []
    append, decrypt = out.append, aead.decrypt
    for raw in tokens:
        try:
            append(decrypt(raw[:_GCM_NONCE], raw[_GCM_NONCE:], None))
        except InvalidTag:
            append(None)
    return out


def _utf8_all(plains: list[bytes | None]) -> pl.Series:
    """Plaintexts as strings, null where not UTF-8: checked by Arrow for the whole column;
    only a column holding a bad value is decoded value by value."""
    try:
        return pl.Series(plains, dtype=pl.Binary).cast(pl.String)
    except pl.exceptions.ComputeError:
        return pl.Series([_utf8(plain) for plain in plains], dtype=pl.String)


def _overhead(algorithm: str, iv: bytes | None) -> int:
    """Smallest token of an empty plaintext: GCM nonce + tag; CBC (IV prefix +) one pad byte."""
    if algorithm == "aes-gcm":
        return _GCM_NONCE + _GCM_TAG
    return (0 if iv is not None else _BLOCK) + 1


def _b64_bytes(tokens: pl.Series) -> pl.Series:
    """Vectorized `_b64decode`, except that non-canonical trailing bits are refused too.

    Tokens are nearly always canonical standard Base64, which decodes as it is (the decoder
    wants the padding and no blank; such a token is left alone by the clean-up below): only
    the others go through the clean-up, which cost three times the decoding.
    """
    direct = tokens.str.decode("base64", strict=False)
    retry = direct.is_null() & tokens.is_not_null()
    if not retry.any():
        return direct
    return direct.scatter(retry.arg_true(), _b64_cleaned(tokens.filter(retry)))


def _b64_cleaned(tokens: pl.Series) -> pl.Series:
    """URL-safe alphabet, surrounding blanks and missing padding accepted."""
    text = tokens.str.strip_chars().str.replace_all("-", "+", literal=True)
    text = text.str.replace_all("_", "/", literal=True)
    padded = text.str.pad_end((text.str.len_chars() + 3) // 4 * 4, "=")
    return padded.str.decode("base64", strict=False)


def _utf8(plain: bytes | None) -> str | None:
    try:
        return plain.decode("utf-8") if plain is not None else None
    except UnicodeDecodeError:
        return None


def decrypt_expr(expr: pl.Expr, algorithm: str, key: bytes, iv: bytes | None = None,
                 min_plain: int = 0) -> pl.Expr:
    """`decrypt_values` as an expression; key, IV and algorithm are checked right away."""
    _decryptor(algorithm, key, iv)
    return expr.map_batches(
        lambda batch: decrypt_values(batch, algorithm, key, iv, min_plain),
        return_dtype=pl.String,
        is_elementwise=True,
    )


def encrypt_value(
    plain: str,
    algorithm: str,
    key: bytes,
    iv: bytes | None = None,
    nonce: bytes | None = None,
) -> str:
    """Standard Base64 token that `decrypt_values` reads (tests, generator, demo).

    `nonce` is the per-token random part: the GCM nonce (12 bytes) or the CBC IV written as a
    prefix (16 bytes); random when omitted. `iv` is the fixed CBC IV: no prefix is written.
    """
    _decryptor(algorithm, key, iv)  # same checks as decryption
    size = _GCM_NONCE if algorithm == "aes-gcm" else _BLOCK
    if nonce is not None and len(nonce) != size:
        raise ConfigError(f"{algorithm} nonce must be {size} bytes")
    data = plain.encode("utf-8")
    if algorithm == "aes-gcm":
        nonce = nonce if nonce is not None else os.urandom(_GCM_NONCE)
        return base64.b64encode(nonce + AESGCM(key).encrypt(nonce, data, None)).decode("ascii")
    if iv is not None and nonce is not None:
        raise ConfigError("aes-cbc takes a fixed iv or a per-token nonce, not both")
    block_iv = iv if iv is not None else (nonce if nonce is not None else os.urandom(_BLOCK))
    pad = _BLOCK - len(data) % _BLOCK
    encryptor = Cipher(algorithms.AES(key), modes.CBC(block_iv)).encryptor()
    body = encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()
    return base64.b64encode(body if iv is not None else block_iv + body).decode("ascii")


def _map_unique(series: pl.Series, func: Callable[[pl.Series], list[str | None]]) -> pl.Series:
    """Run `func` on the distinct values of `series` only and spread its results to every row."""
    uniques = series.unique()
    mapped = pl.Series(func(uniques), dtype=pl.String)
    return series.replace_strict(uniques, mapped, default=None, return_dtype=pl.String)
