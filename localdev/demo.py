"""`demo`: zero set-up end to end run on moto's S3 server and a local SFTP server."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import boto3
import polars as pl

from localdev.generate import BASE_TS_MS, DAY_MS, GenerateSpec, generate
from localdev.pgp_keys import Party, make_party
from localdev.servers import moto_s3_server, sftp_server
from pipeline.config import load_config
from pipeline.console import print_report
from pipeline.context import RunOptions
from pipeline.formats import InfoEntry, parse_info, render_info
from pipeline.report import RunReport
from pipeline.run import execute
from pipeline.stores import StoreOptions, open_store

log = logging.getLogger(__name__)
BUCKETS = ("aam-outbound", "crm", "aam-inbound", "campaign-exports")
EXPORTS = "s3://campaign-exports/audiences/"
DAY_S = 86_400
AWS_VARS = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")

CONFIG = """\
# Written by `run_pipeline.py demo`: an SFTP email feed, S3 phone and ECID feeds (the ECID
# partner encrypts and signs its files with OpenPGP), a Campaign audience export feed, a profile
# snapshot on S3, and the three kinds of destination (contacts encrypted to a PGP key).
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
pgp_secret_key_file = "{keys}/pipeline.sec.asc"   # files arrive as .sync.gz.pgp
pgp_passphrase_env = "{passphrase_env}"
pgp_signer_key_file = "{keys}/partner.pub.asc"    # each must be signed by the partner

[[feeds]]
name = "campaign-audiences"
kind = "campaign_export"      # Campaign target lists -> shared audiences, sent as diffs
source = "{exports}"

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
audiences = {{ "loyal" = 9101, "churn-risk" = 9102 }}
gzip = true

[[destinations]]
name = "no-profile-contacts"
kind = "no_profile_contacts"
target = "{sftp_url}/contacts"
known_hosts = "{known_hosts}"
identity_file = "{identity_file}"
pgp_recipient_key_file = "{keys}/contacts-reader.pub.asc"   # PII: written as .csv.pgp
"""
PASSPHRASE_ENV = "DEMO_PGP_PASSPHRASE"  # noqa: S105 - the variable's name, not a secret


def run_demo(output: str, lines: int = 2000, as_json: bool = False,
             keep: bool = False) -> int:
    """Two nightly runs: the first processes everything, the second only what is new (a
    changed Campaign audience, published as a diff; the next `full` ECID delivery, whose
    missing members are published as leavers) and skips what is done."""
    out = Path(output).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = generate(out / "generated", GenerateSpec(lines=lines, profiles=lines, files=3,
                                                    deliveries=2, full_feeds=("ecid",)))
    passphrase = os.urandom(12).hex()
    keys = _pgp_keys(out / "keys", passphrase)
    _seal_feed(Path(data["feeds"]["ecid"]), keys["partner"], keys["pipeline"])
    env = {data["key_env"]: data["key_hex"], PASSPHRASE_ENV: passphrase}
    with moto_s3_server() as endpoint, sftp_server(out / "sftp") as sftp:
        _aws_env(endpoint)
        s3 = boto3.client("s3")
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)
        sftp_opts = StoreOptions(known_hosts=sftp.known_hosts, identity_file=sftp.identity_file)
        _upload(data["feeds"]["email"], f"{sftp.url}/outbound", sftp_opts, day=0)
        _upload(data["feeds"]["phone"], "s3://aam-outbound/phones/", StoreOptions(), day=0)
        _upload(data["feeds"]["ecid"], "s3://aam-outbound/ecids/", StoreOptions(), day=0)
        _upload(str(Path(data["profiles"]).parent), "s3://crm/profiles/", StoreOptions())
        _put_export(lines, day=0)
        config_path = out / "demo.toml"
        config_path.write_text(CONFIG.format(
            out=out, sftp_url=sftp.url, known_hosts=sftp.known_hosts,
            identity_file=sftp.identity_file, key_env=data["key_env"], exports=EXPORTS,
            keys=out / "keys", passphrase_env=PASSPHRASE_ENV))
        env_path = _env_file(out, {**env, **{k: os.environ[k] for k in AWS_VARS}})
        config = load_config(config_path, env)
        first = execute(config, RunOptions())
        _put_export(lines, day=1)  # the next night: Campaign's audiences changed
        _upload(data["feeds"]["ecid"], "s3://aam-outbound/ecids/", StoreOptions(), day=1)
        second = execute(config, RunOptions())
        _download("s3://aam-inbound/acme/", out / "experience-cloud")
        if as_json:
            print(json.dumps({"first_run": first.to_dict(), "second_run": second.to_dict()},
                             indent=1))
        else:
            _print_runs(first, second, out, config_path, env_path)
        if keep:
            _serve_until_interrupted(config_path, env_path)
    for party in keys.values():
        party.close()  # stop the demo homes' gpg-agents
    return max(first.exit_code(), second.exit_code())


def _pgp_keys(folder: Path, passphrase: str) -> dict[str, Party]:
    """The pipeline's key pair (passphrase-protected), the ECID partner's signing key and the
    key of whoever reads the contacts; each in its own GnuPG home under `folder`, exported
    next to it as `<name>.pub.asc` / `<name>.sec.asc`."""
    folder.mkdir(parents=True, mode=0o700)
    return {"pipeline": make_party(folder, "pipeline", passphrase=passphrase),
            "partner": make_party(folder, "partner"),
            "contacts-reader": make_party(folder, "contacts-reader")}


def _seal_feed(folder: Path, partner: Party, pipeline: Party) -> None:
    """What the partner does before upload: `gpg --encrypt --sign` every delivery file to the
    pipeline's key, and list the encrypted files (sizes, md5s) in the `.info`."""
    for info_path in sorted(folder.rglob("*.info")):
        info = parse_info(info_path.read_text())
        entries = []
        for entry in info.files:
            plain = info_path.parent / entry.file_name
            sealed = plain.with_name(plain.name + ".pgp")
            partner.encrypt_file(plain, sealed, to=pipeline, sign=True)
            plain.unlink()
            data = sealed.read_bytes()
            entries.append(InfoEntry(sealed.name, len(data), entry.line_count, entry.sequence,
                                     hashlib.md5(data).hexdigest()))  # noqa: S324 - AAM's md5
        info_path.write_text(render_info(entries, info_path.name.removesuffix(".info")))


def _put_export(profiles: int, day: int) -> None:
    """A Campaign target-list export: the full current membership of two audiences. On day 1
    the audiences shift, so the second run publishes joiners (d_sid) and leavers (d_unsid)."""
    ids = pl.int_range(0, profiles, eager=True)
    loyal = ids.filter((ids % 3 == 0) & (ids < profiles * (0.4 + 0.1 * day)))
    churn = ids.filter((ids % 5 == day) & (ids < profiles // 2))
    rows = pl.concat([
        pl.DataFrame({"audience": "loyal", "id": loyal}),
        pl.DataFrame({"audience": "churn-risk", "id": churn}),
    ]).select("audience", profile_id=pl.format("P{}", pl.col("id").cast(pl.String)
                                                .str.zfill(8)))
    stamp = BASE_TS_MS // 1000 + (day + 1) * DAY_S
    store = open_store(EXPORTS)
    try:
        store.write_bytes(f"audiences_{stamp}.csv", rows.write_csv().encode())
    finally:
        store.close()


def _print_runs(first: RunReport, second: RunReport, out: Path, config_path: Path,
                env_path: Path) -> None:
    print("First run (every delivery and the day-1 audience export):")
    print_report(first)
    print("\nSecond run (next night: AAM deliveries already done are skipped; the next full "
          "ECID delivery mirrors segment membership; the changed Campaign audience goes out "
          "as a diff):")
    print_report(second)
    for d in second.deliveries:
        if d.feed == "aam-ecids" and d.status == "processed":
            print(f"  {d.delivery}: full delivery, {d.leavers} (profile, segment) pairs left "
                  "since the last one: published as removals (Campaign `remove` rows, "
                  "AAM d_unsid)")
    for d in second.deliveries:
        if d.feed == "campaign-audiences" and d.status == "processed":
            print(f"  {d.delivery}: {d.matched - d.suppressed} current members, "
                  f"{d.rows_written.get('experience-cloud', 0)} AAM inbound lines "
                  "(d_sid for joiners, d_unsid for leavers)")
    print(f"\nOutputs:\n  Campaign import lists:     {out / 'campaign'}\n"
          f"  AAM inbound files (S3):    s3://aam-inbound/acme/ (copied to "
          f"{out / 'experience-cloud'})\n"
          f"  No-profile contacts (SFTP): {out / 'sftp' / 'contacts'} (PGP: read them with\n"
          f"    gpg --homedir {out / 'keys' / 'contacts-reader'} --decrypt FILE.csv.pgp)\n"
          f"  PGP keys (demo only):      {out / 'keys'} (the ECID feed arrives encrypted and "
          f"signed)\n"
          f"  Ledger, reports, quarantine: {out / 'state'}\n"
          f"  Config used:               {config_path}\n"
          f"\nRerun by hand (the demo's servers stop when it ends; `demo --keep` keeps them):\n"
          f"  set -a; . {env_path}; set +a     # demo endpoint, credentials and key\n"
          f"  python run_pipeline.py run --config {config_path}\n"
          f"  python run_pipeline.py status --config {config_path}", file=sys.stdout)


def _env_file(out: Path, values: dict[str, str]) -> Path:
    """Endpoint, demo credentials and the demo key for a rerun by hand (owner-only file)."""
    path = out / "demo.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in sorted(values.items()))
    return path


def _serve_until_interrupted(config_path: Path, env_path: Path) -> None:
    print(f"\nServers are up (Ctrl-C stops them). In another shell:\n"
          f"  set -a; . {env_path}; set +a\n"
          f"  python run_pipeline.py run --config {config_path}", file=sys.stdout, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def _aws_env(endpoint: str) -> None:
    # The demo is its own process: pointing boto3's standard chain at moto is the point.
    os.environ.update(dict(zip(AWS_VARS, (endpoint, "demo", "demo", "us-east-1"), strict=True)))


def _upload(local_dir: str, url: str, options: StoreOptions, day: int | None = None) -> None:
    """Every file of a folder, or only those of the deliveries of one generated day."""
    store = open_store(url, options)
    try:
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file() and (day is None or _day_of(path.name) == day):
                store.put_file(str(path), path.relative_to(local_dir).as_posix())
    finally:
        store.close()


def _day_of(name: str) -> int | None:
    """Day (0, 1, …) of a generated delivery file, from the 13-digit timestamp in its name."""
    stamp = re.search(r"_([0-9]{13})", name)
    return (int(stamp.group(1)) - BASE_TS_MS) // DAY_MS if stamp else None


def _download(url: str, local_dir: Path) -> None:
    store = open_store(url)
    try:
        for entry in store.list(""):
            target = local_dir / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(store.read_bytes(entry.path))
    finally:
        store.close()
