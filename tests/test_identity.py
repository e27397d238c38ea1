"""Identity rules (SPEC §3): golden vectors, crypto round trips, key loading, properties."""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import random
from pathlib import Path

import polars as pl
import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_series_equal

from pipeline.errors import ConfigError
from pipeline.identity import (
    decrypt_expr,
    decrypt_values,
    encrypt_value,
    load_key,
    normalize,
    normalize_crm,
    normalize_ecid,
    normalize_email,
    normalize_phone,
    parse_incoming_hash,
    sha256_hex,
)

GOLDEN = Path(__file__).parent / "golden" / "identity_vectors.csv"
with GOLDEN.open(encoding="utf-8", newline="") as _f:
    VECTORS = list(csv.DictReader(_f))


def _eval(expr: pl.Expr, values: list[str | None], **columns: list[str | None]) -> list:
    frame = pl.DataFrame({"v": values, **columns}, schema_overrides={"v": pl.String})
    return frame.select(expr.alias("out"))["out"].to_list()


def _key_of(kind: str, expr: pl.Expr, country: pl.Expr | str | None) -> tuple[pl.Expr, pl.Expr]:
    if kind == "sha256":
        parsed = parse_incoming_hash(expr)
        return parsed, parsed  # a hash is the key itself, never hashed again
    normalized = normalize(kind, expr, country)
    return normalized, sha256_hex(normalized)


# --- golden vectors -------------------------------------------------------------------------


def test_golden_file_is_self_consistent() -> None:
    """The expected hashes were written with hashlib; re-check them the same independent way."""
    assert {row["kind"] for row in VECTORS} == {"email", "phone", "ecid", "crm", "sha256"}
    for row in VECTORS:
        if not row["normalized"]:
            assert row["sha256"] == ""
        elif row["kind"] == "sha256":
            assert row["sha256"] == row["normalized"]
        else:
            assert row["sha256"] == hashlib.sha256(row["normalized"].encode()).hexdigest()


@pytest.mark.parametrize(
    "row", VECTORS, ids=[f"{i}-{r['kind']}" for i, r in enumerate(VECTORS, start=2)]
)
def test_golden_vector(row: dict[str, str]) -> None:
    country = row["default_country"] or None
    normalized, key = _key_of(row["kind"], pl.col("v"), country)
    expected_norm = row["normalized"] or None
    expected_key = row["sha256"] or None
    assert _eval(normalized, [row["input"]]) == [expected_norm]
    assert _eval(key, [row["input"]]) == [expected_key]


@pytest.mark.parametrize("kind", ["email", "phone", "ecid", "crm", "sha256"])
def test_golden_vectors_as_one_shuffled_batch(kind: str) -> None:
    """Per-unique evaluation must map every row back to its own result, nulls included."""
    rows = [r for r in VECTORS if r["kind"] == kind] * 3
    random.Random(7).shuffle(rows)
    inputs = [r["input"] for r in rows] + [None]
    countries = [r["default_country"] or None for r in rows] + ["FR"]
    _, key = _key_of(kind, pl.col("v"), pl.col("c"))
    assert _eval(key, inputs, c=countries) == [r["sha256"] or None for r in rows] + [None]


def test_normalize_keeps_column_name_and_nulls() -> None:
    frame = pl.DataFrame({"phone": ["06 12 34 56 78", None], "email": [None, "A@B.CO"]})
    out = frame.select(normalize_phone(pl.col("phone"), "FR"), normalize_email(pl.col("email")))
    assert out.to_dict(as_series=False) == {
        "phone": ["+33612345678", None],
        "email": [None, "a@b.co"],
    }


def test_non_string_and_empty_inputs() -> None:
    frame = pl.DataFrame(
        {"crm": [42, None], "country": ["FR", "US"], "none": [None, None]},
        schema_overrides={"country": pl.Categorical},
    )
    out = frame.select(
        normalize_crm(pl.col("crm")),
        normalize_phone(pl.lit("0612345678"), pl.col("country")).alias("phone"),
        normalize_email(pl.col("none")).alias("email"),
        parse_incoming_hash(pl.col("none")).is_not_null().alias("hashed"),
    )
    assert out.to_dict(as_series=False) == {
        "crm": ["42", None],
        "phone": ["+33612345678", None],
        "email": [None, None],
        "hashed": [False, False],
    }
    empty = frame.clear().select(normalize_phone(pl.col("crm").cast(pl.String), "FR"))
    assert empty.schema == pl.Schema({"crm": pl.String}) and empty.height == 0


def test_phone_region_per_row_null_region_needs_international_form() -> None:
    out = _eval(
        normalize_phone(pl.col("v"), pl.col("c")),
        ["0612345678"] * 3 + ["+33612345678"],
        c=["FR", "fr", None, None],
    )
    assert out == ["+33612345678", "+33612345678", None, "+33612345678"]


def test_unknown_kind_and_region_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="id kind"):
        normalize("passport", pl.col("v"))
    with pytest.raises(ConfigError, match="default_country"):
        normalize_phone(pl.col("v"), "XX")


def test_hash_shape_detection() -> None:
    digest = hashlib.sha256(b"x").digest()
    values = [
        digest.hex().upper(),
        base64.b64encode(digest).decode(),
        "abc",
        None,
        base64.b64encode(digest[:31]).decode(),
    ]
    hashed = parse_incoming_hash(pl.col("v")).is_not_null()
    assert _eval(hashed, values) == [True, True, False, False, False]


# --- decryption: an independent implementation built on `cryptography` directly ------------


def _gcm(key: bytes, plain: bytes, nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plain, None)


def _cbc(key: bytes, plain: bytes, iv: bytes, *, pad: bool = True) -> bytes:
    padder = padding.PKCS7(128).padder()
    data = padder.update(plain) + padder.finalize() if pad else plain
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _b64(raw: bytes, *, urlsafe: bool = False, padded: bool = True) -> str:
    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    return text if padded else text.rstrip("=")


PLAINS = ["alice@example.com", "José@exemple.fr", "+33612345678", "a", "x" * 16, "y" * 40]


@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("urlsafe", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_gcm_round_trip(key_size: int, urlsafe: bool, padded: bool) -> None:
    key = os.urandom(key_size)
    tokens = [_b64(_gcm(key, p.encode()), urlsafe=urlsafe, padded=padded) for p in PLAINS]
    assert decrypt_values(tokens, "aes-gcm", key).to_list() == PLAINS


@pytest.mark.parametrize("key_size", [16, 24, 32])
@pytest.mark.parametrize("fixed_iv", [False, True])
def test_cbc_round_trip(key_size: int, fixed_iv: bool) -> None:
    key, iv = os.urandom(key_size), os.urandom(16)
    if fixed_iv:
        tokens = [_b64(_cbc(key, p.encode(), iv)) for p in PLAINS]
    else:
        tokens = [_b64(iv + _cbc(key, p.encode(), iv), urlsafe=True) for p in PLAINS]
    assert decrypt_values(tokens, "aes-cbc", key, iv if fixed_iv else None).to_list() == PLAINS


@pytest.mark.parametrize(("algorithm", "fixed_iv"),
                         [("aes-gcm", False), ("aes-cbc", False), ("aes-cbc", True)])
def test_min_plain_skips_only_tokens_too_short(algorithm: str, fixed_iv: bool) -> None:
    key, iv = os.urandom(32), os.urandom(16)
    plains = ["a", "abcd", "a@b.c", "alice@example.com", "x" * 15, "x" * 16]

    def token(plain: str) -> str:
        if algorithm == "aes-gcm":
            return _b64(_gcm(key, plain.encode()))
        body = _cbc(key, plain.encode(), iv)
        return _b64(body if fixed_iv else iv + body)

    tokens = [token(p) for p in plains]
    fixed = iv if fixed_iv else None
    assert decrypt_values(tokens, algorithm, key, fixed).to_list() == plains
    # A token is skipped when it cannot hold min_plain bytes: GCM tokens have the exact
    # length of their plaintext, CBC ones a whole number of blocks (a 16-byte body holds 15).
    least = 5 if algorithm == "aes-gcm" else 16
    expected = [p if len(p) >= least else None for p in plains]
    assert decrypt_values(tokens, algorithm, key, fixed, min_plain=least).to_list() == expected
    if algorithm == "aes-cbc":
        assert decrypt_values(tokens, algorithm, key, fixed, min_plain=15).to_list() == plains


def test_normalize_email_nfc_applies_to_non_ascii_rows_only() -> None:
    decomposed, composed = "jose\u0301@exemple.fr", "jos\u00e9@exemple.fr"
    values = pl.Series("id", [" Bob@X.org ", decomposed, composed.upper(), None, "JOSE\u0301@x.fr"])
    out = pl.select(normalize_email(pl.lit(values))).to_series().to_list()
    assert out == ["bob@x.org", composed, composed, None, "jos\u00e9@x.fr"]


def _flip(raw: bytes, index: int) -> bytes:
    return raw[:index] + bytes([raw[index] ^ 1]) + raw[index + 1 :]


KEY = bytes(range(32))
IV = bytes(range(16, 32))
GCM_TOKEN = _gcm(KEY, b"alice@example.com", b"\x01" * 12)
CBC_TOKEN = IV + _cbc(KEY, b"alice@example.com", IV)


@pytest.mark.parametrize(
    ("algorithm", "token"),
    [
        ("aes-gcm", _b64(_flip(GCM_TOKEN, 14))),  # ciphertext bit: tag check fails
        ("aes-gcm", _b64(_flip(GCM_TOKEN, len(GCM_TOKEN) - 1))),  # tag bit
        ("aes-gcm", _b64(_flip(GCM_TOKEN, 0))),  # nonce bit
        ("aes-gcm", _b64(GCM_TOKEN[:27])),  # shorter than nonce + tag
        ("aes-gcm", _b64(_gcm(bytes(32), b"alice@example.com"))),  # other key
        ("aes-gcm", _b64(_gcm(KEY, b"\xff\xfe invalid utf-8"))),
        ("aes-cbc", _b64(IV + _cbc(KEY, b"x" * 16, IV, pad=False))),  # last byte 0x78: bad pad
        ("aes-cbc", _b64(IV + _cbc(KEY, b"x" * 15 + b"\x00", IV, pad=False))),
        ("aes-cbc", _b64(IV + _cbc(KEY, b"x" * 14 + b"\x01\x02", IV, pad=False))),
        ("aes-cbc", _b64(CBC_TOKEN[:-1])),  # not whole blocks
        ("aes-cbc", _b64(IV)),  # IV only, no ciphertext
        ("aes-cbc", _b64(IV + _cbc(bytes(32), b"alice@example.com", IV))),  # other key
        ("aes-cbc", _b64(IV + _cbc(KEY, b"\xc3\x28", IV))),  # invalid utf-8
        ("aes-gcm", "not base64 at all!"),
        ("aes-gcm", _b64(GCM_TOKEN)[:-3] + "*"),
        ("aes-gcm", _b64(GCM_TOKEN, padded=False) + "A"),  # length 1 mod 4
        ("aes-cbc", "@@@@"),
        ("aes-gcm", ""),
        ("aes-cbc", None),
    ],
)
def test_decrypt_failures_are_null(algorithm: str, token: str | None) -> None:
    assert decrypt_values([token], algorithm, KEY).to_list() == [None]


def test_decrypt_keeps_order_duplicates_and_name() -> None:
    good = _b64(GCM_TOKEN)
    series = pl.Series("id", [good, None, "bad", good, good])
    expected = pl.Series("id", ["alice@example.com", None, None] + ["alice@example.com"] * 2)
    assert_series_equal(decrypt_values(series, "aes-gcm", KEY), expected)


def test_decrypt_expr_in_lazy_frame() -> None:
    frame = pl.LazyFrame({"id": [_b64(CBC_TOKEN), "zz", None]})
    out = frame.select(decrypt_expr(pl.col("id"), "aes-cbc", KEY)).collect()
    assert out["id"].to_list() == ["alice@example.com", None, None]


def test_decrypt_of_all_null_column() -> None:
    out = decrypt_values(pl.Series("id", [None, None]), "aes-gcm", KEY)
    assert out.dtype == pl.String and out.to_list() == [None, None]


@pytest.mark.parametrize(
    ("algorithm", "key", "iv"),
    [
        ("aes-ecb", KEY, None),
        ("aes-gcm", b"short", None),
        ("aes-cbc", KEY, b"1234"),
        ("aes-gcm", KEY, IV),
    ],
)
def test_bad_decryption_settings_are_config_errors(
    algorithm: str, key: bytes, iv: bytes | None
) -> None:
    with pytest.raises(ConfigError):
        decrypt_values(["x"], algorithm, key, iv)
    with pytest.raises(ConfigError):
        decrypt_expr(pl.col("x"), algorithm, key, iv)


def test_encrypt_value_matches_independent_implementation() -> None:
    nonce = b"\x01" * 12
    assert encrypt_value("alice@example.com", "aes-gcm", KEY, nonce=nonce) == _b64(GCM_TOKEN)
    assert encrypt_value("alice@example.com", "aes-cbc", KEY, nonce=IV) == _b64(CBC_TOKEN)
    fixed = encrypt_value("alice@example.com", "aes-cbc", KEY, iv=IV)
    assert fixed == _b64(_cbc(KEY, b"alice@example.com", IV))
    random_token = encrypt_value("alice@example.com", "aes-gcm", KEY)
    assert decrypt_values([random_token], "aes-gcm", KEY).to_list() == ["alice@example.com"]
    with pytest.raises(ConfigError):
        encrypt_value("x", "aes-cbc", KEY, iv=IV, nonce=IV)
    with pytest.raises(ConfigError, match="12 bytes"):
        encrypt_value("x", "aes-gcm", KEY, nonce=IV)


# --- key material ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 24, 32])
def test_load_key_hex_and_base64(size: int) -> None:
    raw = os.urandom(size)
    assert load_key(raw.hex()) == raw
    assert load_key(raw.hex().upper() + "\n") == raw
    assert load_key(base64.b64encode(raw).decode()) == raw
    assert load_key(_b64(raw, urlsafe=True, padded=False)) == raw


def test_load_key_prefers_hex_when_both_read() -> None:
    text = "0123456789abcdef" * 2  # 32 chars: hex of 16 bytes, also Base64 of 24 bytes
    assert len(base64.b64decode(text)) == 24
    assert load_key(text) == bytes.fromhex(text)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "secret-passphrase",
        "ab" * 20,  # hex of 20 bytes, and Base64 of 30
        base64.b64encode(b"k" * 20).decode(),
        base64.b64encode(b"k" * 64).decode(),
        "0x" + "ab" * 16,
        "zz" * 16 + "!",
    ],
)
def test_load_key_rejects_without_echoing(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_key(value, name="DECLARED_ID_KEY")
    message = str(info.value)
    assert "DECLARED_ID_KEY must be hex or Base64 of 16, 24 or 32 bytes" in message
    assert not value or value not in message
    assert info.value.__cause__ is None and info.value.__context__ is None


# --- properties -----------------------------------------------------------------------------

WS = st.text(alphabet=" \t\r\n\u00a0\u3000", max_size=3)
LABEL = st.text(min_size=1, max_size=12)
LOOSE_EMAILS = st.builds(lambda a, b, c: f"{a}@{b}.{c}", LABEL, LABEL, LABEL)


@settings(max_examples=300, deadline=None)
@given(st.one_of(LOOSE_EMAILS, st.emails(), st.text()))
def test_normalize_email_is_idempotent(value: str) -> None:
    once = _eval(normalize_email(pl.col("v")), [value])[0]
    if once is not None:
        assert _eval(normalize_email(pl.col("v")), [once]) == [once]


@settings(max_examples=200, deadline=None)
@given(st.emails(), WS, WS)
def test_normalize_email_ignores_case_and_outer_whitespace(email: str, left: str, right: str):
    variants = [email, email.upper(), email.lower(), f"{left}{email.swapcase()}{right}"]
    out = _eval(normalize_email(pl.col("v")), variants)
    assert out[0] is not None and out == [out[0]] * 4


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.text()), max_size=20))
def test_sha256_hex_is_64_lowercase_hex_and_standard(values: list[str | None]) -> None:
    out = _eval(sha256_hex(pl.col("v")), values)
    for value, digest in zip(values, out, strict=True):
        if value is None:
            assert digest is None
        else:
            assert digest == hashlib.sha256(value.encode()).hexdigest()
            assert len(digest) == 64 and set(digest) <= set("0123456789abcdef")


@settings(max_examples=100, deadline=None)
@given(st.from_regex(r"[0-9]{38}", fullmatch=True), st.text(min_size=1, max_size=20), WS, WS)
def test_outer_whitespace_never_matters(ecid: str, crm: str, left: str, right: str) -> None:
    assert _eval(normalize_ecid(pl.col("v")), [f"{left}{ecid}{right}"]) == [ecid]
    crm_once = _eval(normalize_crm(pl.col("v")), [crm])[0]
    assert _eval(normalize_crm(pl.col("v")), [f"{left}{crm}{right}"]) == [crm_once]


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=32, max_size=32), WS)
def test_every_hash_form_gives_the_same_hex(digest: bytes, ws: str) -> None:
    forms = [digest.hex(), digest.hex().upper(), base64.b64encode(digest).decode() + ws]
    assert _eval(parse_incoming_hash(pl.col("v")), forms) == [digest.hex()] * 3


@settings(max_examples=100, deadline=None)
@given(st.text(), st.sampled_from(["aes-gcm", "aes-cbc"]), st.sampled_from([16, 24, 32]))
def test_encrypt_then_decrypt_is_identity(plain: str, algorithm: str, key_size: int) -> None:
    key = os.urandom(key_size)
    token = encrypt_value(plain, algorithm, key)
    assert decrypt_values([token], algorithm, key).to_list() == [plain]


def test_a_bad_token_among_good_ones_nulls_only_itself() -> None:
    # Canonical tokens decode as they are, the others after a clean-up; plaintexts are
    # checked for UTF-8 as a column: one bad value must not spoil the rest.
    good = [_b64(_gcm(KEY, p.encode())) for p in PLAINS]
    tokens = [good[0], f" {good[1]}\t", _b64(_gcm(KEY, b"\xff\xfe")), good[2],
              _b64(_gcm(KEY, PLAINS[3].encode()), urlsafe=True, padded=False), None, good[4]]
    expected = [PLAINS[0], PLAINS[1], None, PLAINS[2], PLAINS[3], None, PLAINS[4]]
    assert decrypt_values(tokens, "aes-gcm", KEY).to_list() == expected
