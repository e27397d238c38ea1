"""Config validation: bad configs are refused with one line naming the key (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import ConfigError

KEY = "00112233445566778899aabbccddeeff"
BASE = """
[state]
location = "./state"
[profiles]
snapshot = "./profiles/"
default_country = "FR"
[[feeds]]
name = "f"
source = "./in"
{feed}
[[destinations]]
name = "d"
{dest}
"""
FEED = 'id_kind = "email"\nid_encoding = "encrypted"\ndecryption = "aes-gcm"\nkey_env = "K"'
DEST = 'kind = "aam_inbound"\ntarget = "./out"\ndpid = 1\nsegments = { "111" = 9001 }'


def write(tmp_path: Path, feed: str = FEED, dest: str = DEST, text: str | None = None) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text if text is not None else BASE.format(feed=feed, dest=dest))
    return path


def test_valid_config_loads(tmp_path):
    config = load_config(write(tmp_path), {"K": KEY})
    feed = config.feeds[0]
    assert feed.key == bytes.fromhex(KEY)
    assert KEY not in repr(feed)  # secrets never in repr
    assert config.destinations[0].traits == {111: 9001}
    assert Path(config.state.url).is_absolute()
    assert (feed.max_removal_ratio, feed.membership_retention_days) == (0.5, 35)
    feed = load_config(write(tmp_path, FEED + "\nmax_removal_ratio = 1\n"
                                          "membership_retention_days = 7"), {"K": KEY}).feeds[0]
    assert (feed.max_removal_ratio, feed.membership_retention_days) == (1.0, 7)


@pytest.mark.parametrize(("feed", "dest", "env", "message"), [
    (FEED + '\nid_typo = "x"', DEST, {"K": KEY}, "feeds[0].id_typo: unknown key"),
    (FEED.replace('"email"', '"fax"'), DEST, {"K": KEY}, "feeds.f.id_kind: must be one of"),
    (FEED, DEST, {}, "feeds.f.key_env: environment variable K is not set"),
    (FEED, DEST, {"K": "abc"}, "feeds.f.key_env: environment variable K must hold"),
    (FEED.replace('decryption = "aes-gcm"', ""), DEST, {"K": KEY},
     "feeds.f.decryption: required"),
    (FEED + "\nmax_reject_ratio = 2", DEST, {"K": KEY}, "feeds.f.max_reject_ratio"),
    (FEED + "\nmax_removal_ratio = -0.1", DEST, {"K": KEY},
     "feeds.f.max_removal_ratio: must be between 0 and 1"),
    (FEED + "\nmembership_retention_days = 0", DEST, {"K": KEY},
     "feeds.f.membership_retention_days: must be a positive integer"),
    (FEED, DEST.replace("dpid = 1", 'dpid = "x"'), {"K": KEY}, "destinations.d.dpid: wrong type"),
    (FEED, DEST.replace('"111" = 9001', '"abc" = 9001'), {"K": KEY},
     "destinations.d.segments: key 'abc'"),
    (FEED, 'kind = "no_profile_contacts"\ntarget = "./plain-disk"', {"K": KEY},
     "destinations.d.target: no_profile_contacts must go to SFTP or S3"),
    (FEED, 'kind = "no_profile_contacts"\ntarget = "s3://b/p"', {"K": KEY},
     "destinations.d.sse: required"),
    (FEED.replace('id_kind = "email"', 'id_kind = "email"\nsource2 = 1'), DEST, {"K": KEY},
     "feeds[0].source2: unknown key"),
])
def test_bad_config_names_the_key(tmp_path, feed, dest, env, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, feed, dest), env)
    assert message in str(info.value)
    assert KEY not in str(info.value) and "abc" not in str(info.value).replace("'abc'", "")


def test_sftp_source_requires_known_hosts(tmp_path):
    text = BASE.format(feed=FEED, dest=DEST).replace(
        'source = "./in"', 'source = "sftp://u@127.0.0.1:2222/in"')
    with pytest.raises(ConfigError, match=r"feeds\.f\.known_hosts: required"):
        load_config(write(tmp_path, text=text), {"K": KEY})


def test_not_toml(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, text="[state\n"), {})


def test_cli_bad_config_exit_2_one_line(tmp_path, capsys):
    path = write(tmp_path, FEED + '\nid_typo = "x"')
    assert main(["run", "--config", str(path)], env={"K": KEY}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: feeds[0].id_typo: unknown key"]


def test_cli_bad_config_subprocess_no_traceback(tmp_path):
    path = write(tmp_path, FEED)  # K is not set in the child's environment
    proc = subprocess.run(
        [sys.executable, "run_pipeline.py", "run", "--config", str(path), "--json"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
        env={"PATH": "/usr/bin:/bin"}, check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == "error: feeds.f.key_env: environment variable K is not set"


def test_cli_usage_error_exit_2(capsys):
    assert main(["run"]) == 2  # --config missing
    assert main(["backfill", "--config", "x", "--from", "2024-13-01", "--to", "2024-01-01"]) == 2


def test_export_feed_needs_audiences_destination(tmp_path):
    feed = 'kind = "campaign_export"'
    with pytest.raises(ConfigError, match=r"feeds\.f\.kind: campaign_export needs an aam_inbound"):
        load_config(write(tmp_path, feed, DEST), {})
    ok = DEST + '\naudiences = { "vip" = 9100 }'
    assert load_config(write(tmp_path, feed, ok), {}).feeds[0].kind == "campaign_export"


def test_mixed_id_kinds(tmp_path):
    feed = 'id_type = ["declared", "ecid"]\nid_kind = ["phone", "email"]'
    config = load_config(write(tmp_path, feed, DEST), {})
    assert config.feeds[0].kinds == ("ecid", "email", "phone")
    with pytest.raises(ConfigError, match=r"feeds\.f\.id_kind: must be one of"):
        load_config(write(tmp_path, 'id_kind = ["email", "fax"]', DEST), {})
