"""`demo`: zero set-up end to end run on moto's S3 server and a local SFTP server."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import boto3

from localdev.generate import GenerateSpec, generate
from localdev.servers import moto_s3_server, sftp_server
from pipeline.config import load_config
from pipeline.console import print_report
from pipeline.context import RunOptions
from pipeline.run import execute
from pipeline.stores import StoreOptions, open_store

log = logging.getLogger(__name__)
BUCKETS = ("aam-outbound", "crm", "aam-inbound")

CONFIG = """\
# Written by `run_pipeline.py demo`: an SFTP email feed, S3 phone and ECID feeds,
# a profile snapshot on S3, and the three kinds of destination.
[state]
location = "{out}/state"

[profiles]
snapshot = "s3://crm/profiles/"
default_country = "FR"

[[feeds]]
name = "aam-emails"
source = "{sftp_url}/outbound"
known_hosts = "{known_hosts}"
identity_file = "{identity_file}"
id_type = "declared"
id_kind = "email"
id_encoding = "auto"          # encrypted, SHA-256 and plain emails mixed per row
decryption = "aes-gcm"
key_env = "{key_env}"

[[feeds]]
name = "aam-phones"
source = "s3://aam-outbound/phones/"
id_type = "declared"
id_kind = "phone"
id_encoding = "plain"

[[feeds]]
name = "aam-ecids"
source = "s3://aam-outbound/ecids/"
id_type = "ecid"

[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{out}/campaign"
format = "csv"

[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "s3://aam-inbound/acme/"
dpid = 12345
id = "email_sha256"
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
gzip = true

[[destinations]]
name = "no-profile-contacts"
kind = "no_profile_contacts"
target = "{sftp_url}/contacts"
known_hosts = "{known_hosts}"
identity_file = "{identity_file}"
"""


def run_demo(output: str, lines: int = 2000, as_json: bool = False) -> int:
    out = Path(output).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = generate(out / "generated", GenerateSpec(lines=lines, profiles=lines, files=3))
    env = {data["key_env"]: data["key_hex"]}
    with moto_s3_server() as endpoint, sftp_server(out / "sftp") as sftp:
        _aws_env(endpoint)
        s3 = boto3.client("s3")
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)
        sftp_opts = StoreOptions(known_hosts=sftp.known_hosts, identity_file=sftp.identity_file)
        _upload(data["feeds"]["email"], f"{sftp.url}/outbound", sftp_opts)
        _upload(data["feeds"]["phone"], "s3://aam-outbound/phones/", StoreOptions())
        _upload(data["feeds"]["ecid"], "s3://aam-outbound/ecids/", StoreOptions())
        _upload(str(Path(data["profiles"]).parent), "s3://crm/profiles/", StoreOptions())
        config_path = out / "demo.toml"
        config_path.write_text(CONFIG.format(
            out=out, sftp_url=sftp.url, known_hosts=sftp.known_hosts,
            identity_file=sftp.identity_file, key_env=data["key_env"]))
        config = load_config(config_path, env)
        report = execute(config, RunOptions())
        _download("s3://aam-inbound/acme/", out / "experience-cloud")
    if as_json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        print_report(report)
        print(f"\nOutputs:\n  Campaign import lists:     {out / 'campaign'}\n"
              f"  AAM inbound files (S3):    s3://aam-inbound/acme/ (copied to "
              f"{out / 'experience-cloud'})\n"
              f"  No-profile contacts (SFTP): {out / 'sftp' / 'contacts'}\n"
              f"  Ledger, reports, quarantine: {out / 'state'}\n"
              f"  Config used:               {config_path}", file=sys.stdout)
    return report.exit_code()


def _aws_env(endpoint: str) -> None:
    # The demo is its own process: pointing boto3's standard chain at moto is the point.
    os.environ.update({
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "demo",
        "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1",
    })


def _upload(local_dir: str, url: str, options: StoreOptions) -> None:
    store = open_store(url, options)
    try:
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                store.put_file(str(path), path.relative_to(local_dir).as_posix())
    finally:
        store.close()


def _download(url: str, local_dir: Path) -> None:
    store = open_store(url)
    try:
        for entry in store.list(""):
            target = local_dir / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(entry.path))
    finally:
        store.close()
