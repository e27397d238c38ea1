"""Config validation: bad configs are refused with one line naming the key (exit 2)."""

from __future__ import annotations

import json
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


# -- Limits and safety rules (README "Limits and safety rules") ------------------------------

SEG = 'kind = "aam_inbound"\ntarget = "./out"\ndpid = 1\nsegments = {{ "{seg}" = {trait} }}'


@pytest.mark.parametrize(("dest", "message"), [
    (SEG.format(seg=2**32, trait=1), "destinations.d.segments: segment ID 4294967296 out of "
                                     "range (1..4294967295)"),
    (SEG.format(seg=1, trait=2**63), "destinations.d.segments.1: trait ID 9223372036854775808 "
                                     "out of range (1..2147483647)"),
    (SEG.format(seg=1, trait=2**31), "destinations.d.segments.1: trait ID 2147483648 out of "
                                     "range (1..2147483647)"),
    (SEG.format(seg=1, trait=1).replace("dpid = 1", "dpid = 12345678901234567890123"),
     "destinations.d.dpid: 12345678901234567890123 out of range (1..2147483647)"),
    (SEG.format(seg=1, trait=1) + '\naudiences = { "vip" = 2147483648 }',
     "destinations.d.audiences.vip: trait ID 2147483648 out of range"),
    ('kind = "campaign_list"\ntarget = "./out"\nsegments = [111, 4294967296]',
     "destinations.d.segments: segment ID 4294967296 out of range (1..4294967295)"),
])
def test_id_ranges_are_checked_at_load(tmp_path, dest, message):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, FEED, dest), {"K": KEY})
    assert message in str(info.value)


def test_id_range_limits_are_accepted(tmp_path):
    config = load_config(write(tmp_path, FEED, SEG.format(seg=2**32 - 1, trait=2**31 - 1)
                               .replace("dpid = 1", f"dpid = {2**31 - 1}")), {"K": KEY})
    assert config.destinations[0].traits == {2**32 - 1: 2**31 - 1}


def test_id_ranges_exit_2_naming_the_key(tmp_path, capsys):
    path = write(tmp_path, FEED, SEG.format(seg=2**32, trait=1))
    assert main(["run", "--config", str(path)], env={"K": KEY}) == 2
    assert capsys.readouterr().err.strip() == ("error: destinations.d.segments: segment ID "
                                               "4294967296 out of range (1..4294967295)")


@pytest.mark.parametrize("name", ["../../../escaped", "..", "a/b", ".hidden", "-x", "a..b",
                                  "", "a b", "a\nb", "é", "x" * 101])
@pytest.mark.parametrize("table", ["feeds", "destinations"])
def test_names_are_plain_identifiers(tmp_path, table, name):
    text = BASE.format(feed=FEED, dest=DEST)
    old = 'name = "f"' if table == "feeds" else 'name = "d"'
    text = text.replace(old, f"name = {json.dumps(name)}")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text=text), {"K": KEY})
    assert str(info.value).startswith(f"{table}[0].name: must be a plain name")


@pytest.mark.parametrize("name", ["a", "aam-segments", "Feed_1.v2", "0", "x" * 100])
def test_plain_names_are_accepted(tmp_path, name):
    text = BASE.format(feed=FEED, dest=DEST).replace('name = "f"', f'name = "{name}"')
    assert load_config(write(tmp_path, text=text), {"K": KEY}).feeds[0].name == name


def test_escaping_names_write_nothing_outside(tmp_path, capsys):
    """The probe: a feed and a destination named ../../../escaped are refused (exit 2)."""
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    text = BASE.format(feed=FEED, dest=DEST).replace('name = "f"', 'name = "../../../escaped"')
    assert main(["run", "--config", str(write(work, text=text))], env={"K": KEY}) == 2
    assert "feeds[0].name: must be a plain name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c", "c.toml"]


def _overlap(tmp_path, state="./state", source="./in", target="./out", target2=None):
    text = BASE.format(feed=FEED, dest=DEST).replace('location = "./state"',
                                                     f'location = "{state}"')
    text = text.replace('source = "./in"', f'source = "{source}"')
    text = text.replace('target = "./out"', f'target = "{target}"')
    if target2 is not None:
        text += ('[[destinations]]\nname = "d2"\nkind = "campaign_list"\n'
                 f'target = "{target2}"\n')
    return write(tmp_path, text=text)


@pytest.mark.parametrize(("where", "message"), [
    ({"target": "./in"}, "destinations.d.target: overlaps feeds.f.source"),
    ({"target": "./in/out"}, "destinations.d.target: overlaps feeds.f.source"),
    ({"target": "."}, "destinations.d.target: overlaps feeds.f.source"),
    ({"target": "./in/../in/x/.."}, "destinations.d.target: overlaps feeds.f.source"),
    ({"source": "s3://b/feed/", "target": "s3://b/feed/out"},
     "destinations.d.target: overlaps feeds.f.source"),
    ({"source": "s3://b/feed", "target": "s3://b"},
     "destinations.d.target: overlaps feeds.f.source"),
    ({"state": "./in/state"}, "state.location: overlaps feeds.f.source"),
    ({"state": "./in"}, "state.location: overlaps feeds.f.source"),
    ({"source": "s3://b/in", "state": "s3://b/in/state/"}, "state.location: overlaps feeds.f"),
    ({"target": "./state/out"}, "destinations.d.target: overlaps state.location"),
    ({"target2": "./out"}, "destinations.d2.target: overlaps destinations.d.target"),
    ({"target2": "./out/campaign"}, "destinations.d2.target: overlaps destinations.d.target"),
    ({"target": "./profiles/out"}, "destinations.d.target: overlaps profiles.snapshot"),
    ({"state": "./profiles/state"}, "state.location: overlaps profiles.snapshot"),
])
def test_overlapping_locations_are_refused(tmp_path, where, message):
    with pytest.raises(ConfigError) as info:
        load_config(_overlap(tmp_path, **where), {"K": KEY})
    assert message in str(info.value)


@pytest.mark.parametrize("where", [
    {"target": "./input"},  # a name prefix is not a folder prefix
    {"source": "s3://b/in", "target": "s3://b/inbound"},
    {"source": "s3://b/in", "target": "s3://other/in"},
    {"source": "s3://b/in", "target": "./in"},  # another scheme
    {"target2": "./out2"},
])
def test_separate_locations_are_accepted(tmp_path, where):
    load_config(_overlap(tmp_path, **where), {"K": KEY})


def test_overlap_through_a_local_symlink_is_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    with pytest.raises(ConfigError, match=r"destinations\.d\.target: overlaps feeds\.f\.source"):
        load_config(_overlap(tmp_path, target="./alias/out"), {"K": KEY})


def test_sftp_overlap_compares_host_port_and_path_not_user(tmp_path):
    (tmp_path / "kh").write_text("")
    (tmp_path / "id").write_text("")
    creds = 'known_hosts = "kh"\nidentity_file = "id"\n'
    text = BASE.format(feed=FEED + "\n" + creds, dest=DEST + "\n" + creds)
    text = text.replace('source = "./in"', 'source = "sftp://aam@Host.example:2222/out/"')

    def load(target: str) -> None:
        load_config(write(tmp_path, text=text.replace('target = "./out"', f'target = "{target}"')),
                    {"K": KEY})

    with pytest.raises(ConfigError, match=r"destinations\.d\.target: overlaps feeds\.f\.source"):
        load("sftp://other@host.example:2222/out/in")
    load("sftp://aam@host.example:2223/out/in")  # another port: another server
    load("sftp://aam@host.example:2222/outbound")
