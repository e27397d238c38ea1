"""Campaign's own snapshot column names (SPEC §4): `[profiles] columns` and `match_column`."""

from __future__ import annotations

import json
from pathlib import Path
from unittest.mock import ANY

import polars as pl
import pytest

from pipeline.cli import main
from pipeline.config import PROFILE_COLUMNS, load_config
from pipeline.errors import ConfigError
from pipeline.tables import load_schema
from tests.factories import delivery_files

ROOT = "ftp_1234_5678_iter_1486140844000"
E1, E2 = "1" * 38, "2" * 38
DELIVERIES = {
    "emails": ["Alice@Example.com 111,112", "bob@example.com 111", "carol@example.com 112",
               "dave@example.com 111", "nobody@example.com 111", "bad-line"],
    "phones": ["0612345678 111", "+33699999999 112", "0612345679 111 112"],
    "loyalty": ["L-001 111", "L-002 112", "L-003 111", "L-404 111", "crm_id-only 112"],
    "visitors": [f"{E1} 111", f"{E2} 112 111"],
}
EXPORT = "audience,profile_id\nVIP,1\nVIP,2\nVIP,3\nVIP,5\nVIP,99\nChurn,4\n"
# profile 2 blacklisted (iBlackList = 1), 3 opted out; "crm_id-only" sits in a decoy column
PRODUCT = pl.DataFrame({
    "profile_id": [1, 2, 3, 4, 5],
    "email": ["alice@example.com", "bob@example.com", "carol@example.com", "dave@example.com",
              None],
    "phone": ["06 12 34 56 78", None, "0612345679", None, "+33699999999"],
    "country": ["FR", None, "FR", None, None],
    "ecid": [E1, None, None, E2, None],
    "crm_id": ["L-001", "L-002", "L-003", None, "L-005"],
    "opt_out": [False, False, True, False, None],
    "blacklisted": [False, True, False, False, False],
})
CAMPAIGN_NAMES = {"profile_id": "iRecipientId", "email": "sEmail", "phone": "sMobilePhone",
                  "country": "sCountryCode", "ecid": "sVisitorId", "opt_out": "bOptOut",
                  "blacklisted": "iBlackList"}


def campaign_snapshot() -> pl.DataFrame:
    """The same recipients as Campaign exports them: its names, 0/1 integers, a loyalty key,
    and decoy columns under product names (read only if the mapping were ignored)."""
    renamed = PRODUCT.drop("crm_id").rename(CAMPAIGN_NAMES).with_columns(
        pl.col("iBlackList").cast(pl.Int32))
    return renamed.with_columns(
        sLoyaltyId=PRODUCT["crm_id"],
        email=pl.lit("decoy@example.com"),
        crm_id=pl.lit("crm_id-only"),
    )


def write_setup(tmp: Path, snapshot: pl.DataFrame, columns: str, match: str) -> Path:
    (tmp / "profiles").mkdir(parents=True)
    snapshot.write_parquet(tmp / "profiles" / "snapshot.parquet")
    for feed, lines in DELIVERIES.items():
        folder = tmp / "in" / feed
        folder.mkdir(parents=True)
        for name, data in delivery_files(ROOT, [lines]).items():
            (folder / name).write_bytes(data)
    (tmp / "in" / "export").mkdir()
    (tmp / "in" / "export" / "audiences_1486140900.csv").write_text(EXPORT)
    config = tmp / "pipeline.toml"
    config.write_text(f"""
[state]
location = "state"
[profiles]
snapshot = "profiles/snapshot.parquet"
default_country = "FR"
{columns}
[[feeds]]
name = "emails"
source = "in/emails"
max_reject_ratio = 0.5
[[feeds]]
name = "phones"
source = "in/phones"
id_kind = "phone"
[[feeds]]
name = "loyalty"
source = "in/loyalty"
id_kind = "crm"
{match}
[[feeds]]
name = "visitors"
source = "in/visitors"
id_type = "ecid"
[[feeds]]
name = "export"
kind = "campaign_export"
source = "in/export"
max_reject_ratio = 0.5
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out/campaign"
[[destinations]]
name = "ec-email"
kind = "aam_inbound"
target = "out/ec-email"
dpid = 12345
segments = {{ "111" = 9001, "112" = 9002 }}
audiences = {{ "VIP" = 9101, "Churn" = 9102 }}
[[destinations]]
name = "ec-profile"
kind = "aam_inbound"
target = "out/ec-profile"
dpid = 12346
id = "profile_id"
segments = {{ "111" = 9001, "112" = 9002 }}
""")
    return config


def outputs(tmp: Path) -> dict[str, bytes]:
    return {str(p.relative_to(tmp / "out")): p.read_bytes()
            for p in sorted((tmp / "out").rglob("*")) if p.is_file()}


def run(config: Path, capsys) -> tuple[int, dict]:
    code = main(["run", "--config", str(config), "--json"], env={})
    return code, json.loads(capsys.readouterr().out)


def test_campaign_names_give_the_same_bytes_as_product_names(tmp_path, capsys):
    product = write_setup(tmp_path / "product", PRODUCT, "", "")
    campaign = write_setup(
        tmp_path / "campaign", campaign_snapshot(),
        "columns = { " + ", ".join(f'{k} = "{v}"' for k, v in CAMPAIGN_NAMES.items()) + " }",
        'match_column = "sLoyaltyId"')

    code, expected = run(product, capsys)
    assert code == 0
    assert run(campaign, capsys) == (0, {**expected, "run_id": ANY})  # same counts and names

    assert outputs(tmp_path / "campaign") == outputs(tmp_path / "product")
    assert len(outputs(tmp_path / "product")) >= 8  # every destination wrote something
    totals = expected["totals"]
    assert totals["matched"] == 17 and totals["suppressed"] == 7  # the mapping was exercised
    loyalty = next(d for d in expected["deliveries"] if d["feed"] == "loyalty")
    assert (loyalty["matched"], loyalty["unmatched"]) == (3, 2)  # decoy crm_id never matched


def test_missing_mapped_column_is_one_line_naming_both_names(tmp_path, capsys):
    config = write_setup(tmp_path, campaign_snapshot().drop("sEmail"),
                         'columns = { profile_id = "iRecipientId", email = "sEmail" }', "")
    assert main(["run", "--config", str(config)], env={}) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    # The step that failed first (issue 11 item 14), then the snapshot's own message.
    assert err.startswith("error: feed emails, delivery ftp_1234_5678_iter_1486140844000: "
                          "profile snapshot ")
    assert err.endswith("column 'sEmail' (profiles.columns.email) is missing")


def test_missing_match_column_names_the_feed_key(tmp_path, capsys):
    config = write_setup(tmp_path, campaign_snapshot().drop("sLoyaltyId"),
                         'columns = { profile_id = "iRecipientId" }',
                         'match_column = "sLoyaltyId"')
    assert main(["run", "--config", str(config)], env={}) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("column 'sLoyaltyId' (feeds.loyalty.match_column) is missing")


def test_wrong_type_of_mapped_column_names_both(tmp_path, capsys):
    snapshot = campaign_snapshot().with_columns(pl.col("iBlackList").cast(pl.Float64))
    config = write_setup(tmp_path, snapshot,
                         'columns = { profile_id = "iRecipientId", blacklisted = "iBlackList" }',
                         "")
    assert main(["run", "--config", str(config)], env={}) == 1
    assert "column 'iBlackList' (blacklisted) has type Float64" in capsys.readouterr().err


BASE = """
[state]
location = "state"
[profiles]
snapshot = "profiles/"
{columns}
[[feeds]]
name = "f"
source = "in"
{feed}
[[destinations]]
name = "d"
kind = "campaign_list"
target = "out"
"""


@pytest.mark.parametrize(("columns", "feed", "message"), [
    ('columns = { mail = "sEmail" }', "", "profiles.columns.mail: unknown column, expected one "
     "of profile_id, email"),
    ('columns = { email = 3 }', "", "profiles.columns.email: must be a snapshot column name"),
    ('columns = "sEmail"', "", "profiles.columns: must be a table"),
    ("", 'match_column = "sLoyaltyId"', "feeds.f.match_column: only for feeds with id_kind"),
    ("", 'id_kind = "crm"\nmatch_column = ""', "feeds.f.match_column: must be a snapshot"),
])
def test_config_refuses_bad_column_names(tmp_path, columns, feed, message):
    path = tmp_path / "c.toml"
    path.write_text(BASE.format(columns=columns, feed=feed))
    with pytest.raises(ConfigError, match=message):
        load_config(path, {})


def test_match_column_equal_to_crm_id_column_is_the_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(BASE.format(columns='columns = { crm_id = "sCrm" }',
                                feed='id_kind = "crm"\nmatch_column = "sCrm"'))
    config = load_config(path, {})
    assert config.feeds[0].match_column is None and config.crm_matches == {}


def test_product_names_are_the_profiles_schema():
    assert list(PROFILE_COLUMNS) == list(load_schema("profiles")["columns"])
