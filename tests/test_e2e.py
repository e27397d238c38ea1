"""End to end: a split gzip delivery on SFTP (real sshd) or S3 (moto) -> golden outputs."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import boto3
import pytest

from pipeline.cli import main
from pipeline.stores import StoreOptions, open_store
from tests.factories import delivery_files, put_all, write_snapshot

GOLDEN = Path(__file__).parent / "golden"
ROOT = "ftp_1234_5678_iter_1486140844000"
SPLITS = [
    ["alice@example.com 111,112", "BOB@Example.com 113", "carol@example.com 111 112",
     "bad-line-without-segments", ""],
    ["alice@example.com  112", "dave@nowhere.org 111", "not-an-email 111",
     "erin@example.com 111,abc"],
    ["frank@example.com 111,112", "bob@example.com 999"],
]
PROFILES = [
    {"profile_id": "P1", "email": "Alice@Example.com"},
    {"profile_id": "P2", "email": "bob@example.com"},
    {"profile_id": "P3", "email": " carol@example.com"},
    {"profile_id": "P4", "email": "frank@example.com", "opt_out": True},
    {"profile_id": "P5", "email": "erin@example.com"},
]


def _config(tmp: Path, source: str, source_opts: str, inbound: str) -> Path:
    path = tmp / "pipeline.toml"
    path.write_text(f"""
[state]
location = "{tmp}/state"
[profiles]
snapshot = "{tmp}/profiles/snapshot.parquet"
default_country = "FR"
[[feeds]]
name = "emails"
source = "{source}"
{source_opts}
id_kind = "email"
id_encoding = "plain"
max_reject_ratio = 0.5
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp}/out/campaign"
[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{inbound}"
dpid = 12345
id = "email_sha256"
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
gzip = true
""")
    return path


@pytest.fixture
def sftp_source(sftp_server, tmp_path):
    folder = f"{sftp_server.url}/e2e-{tmp_path.name}"
    opts = StoreOptions(known_hosts=sftp_server.known_hosts,
                        identity_file=sftp_server.identity_file)
    extra = (f'known_hosts = "{sftp_server.known_hosts}"\n'
             f'identity_file = "{sftp_server.identity_file}"')
    return folder, opts, extra


@pytest.fixture
def s3_source(make_bucket):
    return f"s3://{make_bucket()}/outbound/", StoreOptions(), ""


@pytest.mark.parametrize("where", ["sftp", "s3"])
def test_delivery_flows_to_golden_outputs(where, request, tmp_path, make_bucket, capsys):
    source, opts, extra = request.getfixturevalue(f"{where}_source")
    store = open_store(source, opts)
    put_all(store, delivery_files(ROOT, SPLITS), folder="date=2017-02-03")
    store.close()
    write_snapshot(tmp_path / "profiles" / "snapshot.parquet", PROFILES)
    inbound_bucket = make_bucket()
    config = _config(tmp_path, source, extra, f"s3://{inbound_bucket}/acme/")

    assert main(["run", "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    delivery = report["deliveries"][0]
    assert delivery["status"] == "processed"
    assert {k: delivery[k] for k in report["totals"]} == {
        "records_received": 10, "format_errors": 2, "invalid_ids": 1, "decrypt_failures": 0,
        "matched": 6, "unmatched": 1, "suppressed": 1,
    }
    campaign = tmp_path / "out/campaign/emails" / f"{ROOT}.csv"
    assert campaign.read_text() == (GOLDEN / "e2e_campaign.csv").read_text()
    key = "acme/date=2017-02-03/ftp_dpm_12345_1486140844.sync.712060001.gz"
    body = boto3.client("s3").get_object(Bucket=inbound_bucket, Key=key)["Body"].read()
    assert gzip.decompress(body).decode() == (GOLDEN / "e2e_inbound.sync").read_text()
    quarantine = (tmp_path / "state/quarantine/emails" / f"{ROOT}.csv").read_text().splitlines()
    assert quarantine[0] == "file,line_no,reason,line"
    assert [row.split(",")[1:3] for row in quarantine[1:]] == [
        ["4", "no_segments"], ["3", "invalid_id"], ["4", "bad_segment"]]
