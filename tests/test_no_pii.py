"""No input ID, address, decrypted value, hash or key ever reaches logs, console or report.

Runs the CLI at --debug over deliveries that succeed, partly fail and fail (bad lines, bad
UTF-8, tampered tokens, a wrong key, a reject threshold crossed, a no-profile contacts file
on S3), in process and as a real subprocess, and greps everything it printed or logged for
every sensitive value of the scenario. Quarantine (raw lines by design) and the published
files are the only places such values may be written.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.formats import InfoEntry, render_info
from tests.factories import write_snapshot
from tests.test_resolution_e2e import cbc, gcm, sha, tampered

REPO = Path(__file__).parents[1]
ROOT1 = "ftp_1234_5678_iter_1486140844000"
ROOT2 = "ftp_1234_5678_iter_1486227244000"
KEY_GCM = hashlib.sha256(b"no-pii gcm key").digest()
KEY_CBC = hashlib.sha256(b"no-pii cbc key").digest()[:16]
KEY_WRONG = hashlib.sha256(b"no-pii wrong key").digest()
IV = hashlib.sha256(b"no-pii fixed iv").digest()[:16]

ECID_MATCHED = "73019284756473829101928374655647382910"
ECID_UNKNOWN = "61829374650192837465019283746501928374"
PROFILES = [
    {"profile_id": "PX1", "email": "Quentin.Private@Example.com", "ecid": ECID_MATCHED},
    {"profile_id": "PX2", "phone": "06 87 65 43 21"},
    {"profile_id": "PX3", "email": "rosalind.secret@example.net"},
    {"profile_id": "PX4", "email": "optout.person@example.org", "opt_out": True},
    {"profile_id": "PX5", "phone": "+33643219876"},
    {"profile_id": "PX6", "email": "hashed.hex@example.com"},
    {"profile_id": "PX7", "phone": "0634251607"},
]


@dataclass
class Scenario:
    """Where the deliveries, config and state are, and every value that must stay hidden."""

    folder: Path
    config: Path
    env: dict[str, str]
    secrets: set[str] = field(default_factory=set)


def _user_ids(lines: list[bytes]) -> set[str]:
    ids = set()
    for line in lines:
        user_id = line.decode("utf-8", errors="replace").split(" ")[0].strip()
        if len(user_id) >= 6:
            ids.add(user_id)
    return ids


def _put(folder: Path, root: str, splits: list[list[bytes]]) -> None:
    """Like factories.delivery_files, but lines are bytes (so a line may be bad UTF-8)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for n, lines in enumerate(splits, start=1):
        data = gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0)
        name = f"{root}-{n}.sync.gz"
        (folder / name).write_bytes(data)
        entries.append(InfoEntry(name, len(data), len(lines), n, hashlib.md5(data).hexdigest()))
    (folder / f"{root}.info").write_text(render_info(entries, root))


def _hashes(value: str) -> set[str]:
    digest = sha(value)
    return {digest.hex(), base64.b64encode(digest).decode()}


def build(folder: Path, contacts_bucket: str) -> Scenario:
    """Three feeds: mixed auto (one good, one failing delivery), AES-CBC fixed IV, wrong key."""
    enc_plain = {  # plaintexts of encrypted IDs and their normalized forms
        "  Rosalind.Secret@Example.NET": "rosalind.secret@example.net",
        "06 43 21 98 76": "+33643219876",
        "Unmatched.Contact@Example.io": "unmatched.contact@example.io",
        "07 58 69 70 81": "+33758697081",
        "not a real address at all": "not a real address at all",
    }
    mixed_good = [
        f"{ECID_MATCHED} 111,112",
        "QUENTIN.private@example.COM 113",
        "0687654321 111",
        f"{sha('hashed.hex@example.com').hex()} 112",
        f"{base64.b64encode(sha('+33634251607')).decode()} 113",
        f"{gcm('  Rosalind.Secret@Example.NET', KEY_GCM)} 111 112",
        f"{gcm('06 43 21 98 76', KEY_GCM)} 112",
        f"{gcm('Unmatched.Contact@Example.io', KEY_GCM)} 111",
        f"{gcm('07 58 69 70 81', KEY_GCM)} 113",
        f"{gcm('not a real address at all', KEY_GCM)} 111",
        "optout.person@example.org 111",
        f"{ECID_UNKNOWN} 112",
        f"{tampered(gcm('tampered.token@example.com', KEY_GCM))} 111",
        "leaky.format.error@example.com",  # no segments
        "invalid-user-qwxz 111",
        "too.many@fields.example 1 2 3",
    ]
    mixed_bad = ["garbage-id-plmk 111", "another-garbage-zzq 111", "third.one@nowhere 111,112",
                 f"{sha('only.good@example.com').hex()} 111"]
    cbc_lines = [f"{cbc('Rosalind.Secret@Example.NET', KEY_CBC, IV)} 111",
                 f"{cbc('06 87 65 43 21', KEY_CBC, IV)} 112",
                 f"{cbc('cbc.unmatched@example.com', KEY_CBC, IV)} 113",
                 f"{tampered(cbc('cbc.tampered@example.com', KEY_CBC, IV))} 111"]
    wrong_lines = [f"{gcm(p, KEY_GCM)} 111" for p in ("wrong.key.one@example.com",
                                                      "wrong.key.two@example.com")]
    enc_plain.update({
        "Rosalind.Secret@Example.NET": "rosalind.secret@example.net",
        "06 87 65 43 21": "+33687654321",
        "cbc.unmatched@example.com": "cbc.unmatched@example.com",
        "cbc.tampered@example.com": "cbc.tampered@example.com",
        "tampered.token@example.com": "tampered.token@example.com",
        "wrong.key.one@example.com": "wrong.key.one@example.com",
        "wrong.key.two@example.com": "wrong.key.two@example.com",
    })
    bad_utf8 = b"bad.utf8.\xff\xfe@example.com 111"

    def encode(lines: list[str]) -> list[bytes]:
        return [line.encode() for line in lines]

    _put(folder / "in/mixed", ROOT1, [encode(mixed_good[:8]), encode(mixed_good[8:]) + [bad_utf8]])
    _put(folder / "in/mixed", ROOT2, [encode(mixed_bad)])
    _put(folder / "in/cbc", ROOT1, [encode(cbc_lines)])
    _put(folder / "in/wrong", ROOT1, [encode(wrong_lines)])
    write_snapshot(folder / "profiles/snapshot.parquet", PROFILES)

    config = folder / "pipeline.toml"
    config.write_text(f"""
[state]
location = "state"
[profiles]
snapshot = "profiles/snapshot.parquet"
default_country = "FR"
[[feeds]]
name = "mixed"
source = "in/mixed"
id_type = ["ecid", "declared"]
id_kind = ["email", "phone"]
id_encoding = "auto"
decryption = "aes-gcm"
key_env = "PII_TEST_GCM_KEY"
max_reject_ratio = 0.5
[[feeds]]
name = "cbc"
source = "in/cbc"
id_kind = ["email", "phone"]
id_encoding = "encrypted"
decryption = "aes-cbc"
key_env = "PII_TEST_CBC_KEY"
iv_env = "PII_TEST_CBC_IV"
max_reject_ratio = 0.5
[[feeds]]
name = "wrong"
source = "in/wrong"
id_kind = "email"
id_encoding = "encrypted"
decryption = "aes-gcm"
key_env = "PII_TEST_WRONG_KEY"
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "out/campaign"
[[destinations]]
name = "ec"
kind = "aam_inbound"
target = "out/ec"
dpid = 777
segments = {{ "111" = 1, "112" = 2 }}
[[destinations]]
name = "contacts"
kind = "no_profile_contacts"
target = "s3://{contacts_bucket}/contacts/"
sse = "AES256"
""")
    env = {"PII_TEST_GCM_KEY": KEY_GCM.hex(),
           "PII_TEST_CBC_KEY": base64.b64encode(KEY_CBC).decode(),
           "PII_TEST_CBC_IV": IV.hex(), "PII_TEST_WRONG_KEY": KEY_WRONG.hex()}

    secrets: set[str] = set()
    all_lines = encode(mixed_good + mixed_bad + cbc_lines + wrong_lines) + [bad_utf8]
    secrets |= _user_ids(all_lines)
    for raw, normalized in enc_plain.items():
        secrets |= {raw.strip(), normalized} | _hashes(normalized)
    for profile in PROFILES:
        for col in ("email", "phone", "ecid"):
            if profile.get(col):
                secrets.add(profile[col].strip())
    normalized_inputs = ["quentin.private@example.com", "+33687654321", "+33634251607",
                         "hashed.hex@example.com", "optout.person@example.org", ECID_MATCHED,
                         ECID_UNKNOWN, "only.good@example.com", "+33643219876"]
    for value in normalized_inputs:
        secrets |= {value} | _hashes(value)
    for key in (KEY_GCM, KEY_CBC, KEY_WRONG, IV):
        secrets |= {key.hex(), base64.b64encode(key).decode(),
                    base64.urlsafe_b64encode(key).decode().rstrip("=")}
    return Scenario(folder, config, {**os.environ, **env}, secrets)


def leaks(scenario: Scenario, *texts: str) -> list[str]:
    """Secrets found in any text, case-insensitively (hex digests may change case)."""
    haystack = "\n".join(texts).lower()
    return sorted(s for s in scenario.secrets if s.lower() in haystack)


def state_texts(folder: Path) -> list[str]:
    """Ledger, run reports and lock of the state store; quarantine holds raw lines by design."""
    state = folder / "state"
    return [p.read_text(errors="replace") for p in state.rglob("*")
            if p.is_file() and "quarantine" not in p.parts]


def check_outputs_carry_values(scenario: Scenario, bucket: str) -> None:
    """Guard against a vacuous pass: the values do exist where they belong."""
    import boto3

    quarantined = "".join(p.read_text(errors="replace")
                          for p in (scenario.folder / "state/quarantine").rglob("*.csv"))
    assert "invalid-user-qwxz" in quarantined and "garbage-id-plmk" in quarantined
    key = f"contacts/mixed/{ROOT1}.csv"
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    assert "unmatched.contact@example.io" in body and "+33758697081" in body


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_in_process_debug_logs_console_and_json_carry_no_pii(
        tmp_path, make_bucket, capsys, caplog, monkeypatch, restore_logging):
    bucket = make_bucket()
    scenario = build(tmp_path, bucket)
    setup = cli._setup_logging

    def setup_and_capture(debug: bool, quiet: bool) -> None:
        setup(debug, quiet)  # replaces the root handlers: put caplog's back
        logging.getLogger().addHandler(caplog.handler)

    monkeypatch.setattr(cli, "_setup_logging", setup_and_capture)
    caplog.set_level(logging.DEBUG)
    argv = ["run", "--config", str(scenario.config), "--debug"]

    code = cli.main(argv, env=scenario.env)
    human = capsys.readouterr()
    code_json = cli.main([*argv, "--json", "--force"], env=scenario.env)
    as_json = capsys.readouterr()
    cli.main(["status", "--config", str(scenario.config), "--debug"], env=scenario.env)
    status = capsys.readouterr()

    assert code == code_json == 3  # partial: some deliveries failed
    report = json.loads(as_json.out)
    assert report["deliveries_by_status"] == {"processed": 2, "failed": 2}
    assert report["totals"]["decrypt_failures"] == 3  # cbc tampered + 2 under the wrong key
    assert logging.getLogger().level == logging.DEBUG  # --debug took effect
    assert any(r.name.startswith("pipeline.") for r in caplog.records)  # and logs were captured
    check_outputs_carry_values(scenario, bucket)
    records = [f"{r.getMessage()} {r.args!r} {r.exc_text or ''}" for r in caplog.records]
    assert leaks(scenario, human.out, human.err, as_json.out, as_json.err, status.out,
                 status.err, caplog.text, *records, *state_texts(tmp_path)) == []


def test_subprocess_debug_output_carries_no_pii(tmp_path, make_bucket):
    bucket = make_bucket()
    scenario = build(tmp_path, bucket)
    outputs = []
    for extra in ([], ["--json", "--force"]):
        proc = subprocess.run(
            [sys.executable, "run_pipeline.py", "run", "--config", str(scenario.config),
             "--debug", *extra],
            capture_output=True, text=True, cwd=REPO, env=scenario.env, check=False,
            timeout=120,
        )
        assert proc.returncode == 3, proc.stderr[-2000:]
        assert " DEBUG " in proc.stderr or " INFO " in proc.stderr
        outputs += [proc.stdout, proc.stderr]
    assert json.loads(outputs[2])["deliveries_by_status"] == {"processed": 2, "failed": 2}
    check_outputs_carry_values(scenario, bucket)
    assert leaks(scenario, *outputs, *state_texts(tmp_path)) == []


@pytest.mark.parametrize("value", [
    KEY_GCM.hex()[:40],                       # valid hex, wrong length
    KEY_GCM.hex() + "zz",                     # neither hex nor Base64
    base64.b64encode(KEY_GCM[:20]).decode(),  # Base64 of 20 bytes
], ids=["short-hex", "not-hex", "base64-20-bytes"])
def test_bad_key_is_refused_without_echoing_it(tmp_path, make_bucket, capsys, value,
                                               restore_logging):
    scenario = build(tmp_path, make_bucket())
    env = {**scenario.env, "PII_TEST_GCM_KEY": value}
    code = cli.main(["run", "--config", str(scenario.config), "--debug"], env=env)
    out = capsys.readouterr()
    assert code == 2
    assert "PII_TEST_GCM_KEY" in out.err
    assert value.lower() not in (out.out + out.err).lower()
    assert leaks(scenario, out.out, out.err) == []
