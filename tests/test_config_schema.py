"""schemas/config.schema.json (for editors: TOML completion and checks) agrees with
pipeline/config.py: it describes every key config.py accepts, and snippets that one accepts
or refuses, the other does too (except the checks only the code can make, listed as such)."""

from __future__ import annotations

import ast
import copy
import json
import re
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pipeline.config import PROFILE_COLUMNS, parse_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_FILE = ROOT / "schemas" / "config.schema.json"
SCHEMA = json.loads(SCHEMA_FILE.read_text())
# Section of the config file whose keys a `_known(raw, where, {...})` call checks, for calls
# whose `where` is not a literal (parse_config passes "" / "state" / "profiles").
SECTION_OF_FUNCTION = {"_feed": "feeds[]", "_destination": "destinations[]"}


def allowed_keys() -> dict[str, set[str]]:
    """Section ("" is the top level) -> keys config.py accepts, read from its `_known` calls."""
    source = (ROOT / "pipeline" / "config.py").read_text()
    sections: dict[str, set[str]] = {}
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef):
            continue
        for call in ast.walk(func):
            if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "_known"):
                continue
            where, keys = call.args[1], call.args[2]
            if isinstance(where, ast.Constant) and isinstance(where.value, str):
                section = where.value
            else:
                section = SECTION_OF_FUNCTION.get(func.name, "")
                assert section, (f"config.py:{call.lineno}: a _known(...) call in {func.name}(); "
                                 "tell this test which section it checks (SECTION_OF_FUNCTION)")
            assert isinstance(keys, ast.Set) and all(
                isinstance(k, ast.Constant) for k in keys.elts
            ), f"config.py:{call.lineno}: _known(...) keys must be a literal set for this test"
            sections.setdefault(section, set()).update(
                str(k.value) for k in keys.elts if isinstance(k, ast.Constant))
    return sections


def schema_node(section: str) -> dict[str, Any]:
    """The object schema of a section: "" (top), "state", "feeds[]", "profiles.columns"..."""
    node: dict[str, Any] = SCHEMA
    for part in filter(None, section.split(".")):
        node = node.get("properties", {}).get(part.removesuffix("[]"), {})
        if part.endswith("[]"):
            node = node.get("items", {})
        if "$ref" in node:
            node = SCHEMA["$defs"][node["$ref"].rsplit("/", 1)[1]]
    return node


def test_profile_columns_in_the_schema_are_config_pys() -> None:
    assert set(schema_node("profiles.columns")["properties"]) == set(PROFILE_COLUMNS)


def test_schema_is_valid_draft_2020_12() -> None:
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_key_config_py_accepts_is_in_the_schema_and_no_other() -> None:
    sections = allowed_keys()
    assert {"", "state", "profiles", "feeds[]", "destinations[]"} <= sections.keys()
    assert {"name", "source", "id_encoding", "key_env"} <= sections["feeds[]"]
    problems = []
    for section, keys in sorted(sections.items()):
        node = schema_node(section)
        described = set(node.get("properties", {}))
        label = section or "top level"
        for key in sorted(keys - described):
            problems.append(f"config.py accepts [{label}] {key} but {SCHEMA_FILE.name} does not "
                            f"describe it: add it (with a description) to that section")
        for key in sorted(described - keys):
            problems.append(f"{SCHEMA_FILE.name} describes [{label}] {key} but config.py "
                            "refuses it")
        if node.get("additionalProperties") is not False:
            problems.append(f"{SCHEMA_FILE.name} [{label}]: set additionalProperties to false "
                            "(config.py refuses unknown keys)")
        for key in sorted(described):
            if not node["properties"][key].get("description"):
                problems.append(f"{SCHEMA_FILE.name} [{label}] {key}: no description (editors "
                                "show it on completion)")
    assert not problems, "\n".join(problems)


# --- Snippets both must accept or refuse ---

KEY_HEX = "11" * 32
ENV = {"K": KEY_HEX, "IV": "22" * 16}
BASE: dict[str, Any] = {
    "state": {"location": "state"},
    "profiles": {"snapshot": "profiles/snapshot.parquet"},
    "feeds": [{"name": "emails", "source": "s3://aam/outbound"}],
    "destinations": [{"name": "crm", "kind": "campaign_list", "target": "out"}],
}
SFTP = {"known_hosts": "known_hosts", "identity_file": "id_ed25519"}
INBOUND = {"name": "ec", "kind": "aam_inbound", "target": "s3://in/acme", "dpid": 7,
           "segments": {"111": 9001}}
F, D = ("feeds", 0), ("destinations", 0)
DROP = object()

# (case, {path: value (DROP removes the key)}, schema accepts, parse_config accepts)
CASES: list[tuple[str, dict[tuple[Any, ...], Any], bool, bool]] = [
    ("minimal", {}, True, True),
    ("encrypted feed", {(*F, "id_encoding"): "encrypted", (*F, "decryption"): "aes-gcm",
                        (*F, "key_env"): "K"}, True, True),
    ("aes-cbc with fixed IV", {(*F, "id_encoding"): "auto", (*F, "decryption"): "aes-cbc",
                               (*F, "key_env"): "K", (*F, "iv_env"): "IV"}, True, True),
    ("mixed ID kinds", {(*F, "id_kind"): ["email", "phone"], (*F, "id_type"): ["declared"]},
     True, True),
    ("ECID feed", {(*F, "id_type"): "ecid"}, True, True),
    ("every optional feed key", {(*F, "kind"): "aam_segments", (*F, "default_country"): "fr",
                                 (*F, "max_reject_ratio"): 0, (*F, "require_info"): False,
                                 (*F, "max_removal_ratio"): 1,
                                 (*F, "membership_retention_days"): 1}, True, True),
    ("SFTP everywhere", {("state", "location"): "sftp://u@h:22/state",
                         ("state", "known_hosts"): "known_hosts",
                         ("state", "identity_file"): "id_ed25519",
                         (*F, "source"): "sftp://u@h/out", **{(*F, k): v for k, v in SFTP.items()}},
     True, True),
    ("campaign list options", {(*D, "format"): "parquet", (*D, "segments"): [111, "112"]},
     True, True),
    ("AAM inbound", {D: {**INBOUND, "id": "profile_id", "max_lines_per_file": 1, "gzip": True}},
     True, True),
    ("export feed to audiences", {(*F, "kind"): "campaign_export",
                                  D: {**INBOUND, "segments": DROP, "audiences": {"vip": 9100}}},
     True, True),
    ("contacts on S3 with sse", {D: {"name": "c", "kind": "no_profile_contacts",
                                     "target": "s3://secure/c", "sse": "aws:kms"}}, True, True),
    ("contacts on SFTP", {D: {"name": "c", "kind": "no_profile_contacts",
                              "target": "sftp://u@h/c", **SFTP}}, True, True),
    ("Campaign column names", {("profiles", "columns"): {
        "profile_id": "iRecipientId", "email": "sEmail", "phone": "sMobilePhone",
        "blacklisted": "iBlackList"}}, True, True),
    ("crm feed reconciling on its own column", {(*F, "id_kind"): ["crm"],
                                                (*F, "match_column"): "sLoyaltyId"}, True, True),
    ("file URL and profiles country", {("state", "location"): "file:///tmp/state",
                                       ("profiles", "default_country"): "FR"}, True, True),
    # refused by both
    ("unknown top-level key", {("extra",): 1}, False, False),
    ("unknown feed key", {(*F, "id_kinds"): "email"}, False, False),
    ("unknown destination key", {(*D, "dpuuid"): "x"}, False, False),
    ("unknown state key", {("state", "sse"): "AES256"}, False, False),
    ("no [state]", {("state",): DROP}, False, False),
    ("no snapshot", {("profiles", "snapshot"): DROP}, False, False),
    ("feed without source", {(*F, "source"): DROP}, False, False),
    ("destination without kind", {(*D, "kind"): DROP}, False, False),
    ("unknown encoding", {(*F, "id_encoding"): "base64"}, False, False),
    ("unknown feed kind", {(*F, "kind"): "bogus"}, False, False),
    ("unknown format", {(*D, "format"): "xml"}, False, False),
    ("empty id_type list", {(*F, "id_type"): []}, False, False),
    ("encrypted without decryption", {(*F, "id_encoding"): "encrypted", (*F, "key_env"): "K"},
     False, False),
    ("encrypted without key_env", {(*F, "id_encoding"): "encrypted",
                                   (*F, "decryption"): "aes-gcm"}, False, False),
    ("IV with aes-gcm", {(*F, "id_encoding"): "encrypted", (*F, "decryption"): "aes-gcm",
                         (*F, "key_env"): "K", (*F, "iv_env"): "IV"}, False, False),
    ("hashed ECIDs", {(*F, "id_type"): ["ecid"], (*F, "id_encoding"): "sha256"}, False, False),
    ("ratio above 1", {(*F, "max_reject_ratio"): 1.5}, False, False),
    ("ratio as text", {(*F, "max_removal_ratio"): "0.1"}, False, False),
    ("ratio as bool", {(*F, "max_reject_ratio"): True}, False, False),
    ("retention 0 days", {(*F, "membership_retention_days"): 0}, False, False),
    ("require_info as text", {(*F, "require_info"): "yes"}, False, False),
    ("three-letter country", {("profiles", "default_country"): "FRA"}, False, False),
    ("inbound without dpid", {D: {**INBOUND, "dpid": DROP}}, False, False),
    ("inbound dpid 0", {D: {**INBOUND, "dpid": 0}}, False, False),
    ("inbound without segments", {D: {**INBOUND, "segments": DROP}}, False, False),
    ("trait ID 0", {D: {**INBOUND, "segments": {"111": 0}}}, False, False),
    ("segment ID not a number", {(*D, "segments"): ["x"]}, False, False),
    ("zero lines per file", {(*D, "max_lines_per_file"): 0}, False, False),
    ("gzip as 1", {(*D, "gzip"): 1}, False, False),
    ("unknown sse", {(*D, "sse"): "aes"}, False, False),
    ("contacts on S3 without sse", {D: {"name": "c", "kind": "no_profile_contacts",
                                        "target": "s3://b/c"}}, False, False),
    ("contacts on a local path", {D: {"name": "c", "kind": "no_profile_contacts",
                                      "target": "out"}}, False, False),
    ("SFTP without host keys", {(*F, "source"): "sftp://u@h/out"}, False, False),
    ("SFTP URL without user", {(*F, "source"): "sftp://h/out", **{(*F, k): v
                                                                 for k, v in SFTP.items()}},
     False, False),
    ("unsupported scheme", {(*D, "target"): "https://x/y"}, False, False),
    ("blank location", {("state", "location"): "  "}, False, False),
    ("unknown product column", {("profiles", "columns"): {"mail": "sEmail"}}, False, False),
    ("blank snapshot column", {("profiles", "columns"): {"email": " "}}, False, False),
    ("match_column on an email feed", {(*F, "match_column"): "sLoyaltyId"}, False, False),
    ("match_column on an export feed", {(*F, "kind"): "campaign_export", (*F, "id_kind"): "crm",
                                        (*F, "match_column"): "x",
                                        D: {**INBOUND, "audiences": {"vip": 1}}}, False, False),
    ("feed name with a slash", {(*F, "name"): "a/b"}, False, False),
    ("destination name with ..", {(*D, "name"): "a..b"}, False, False),
    ("dpid above 2^31-1", {D: {**INBOUND, "dpid": 2**31}}, False, False),
    ("trait ID above 2^31-1", {D: {**INBOUND, "segments": {"111": 2**31}}}, False, False),
    ("segment ID above 2^32-1", {(*D, "segments"): [2**32]}, False, False),
    # what only the code can check: the environment, files, names across tables
    ("key variable not set", {(*F, "id_encoding"): "encrypted", (*F, "decryption"): "aes-gcm",
                              (*F, "key_env"): "UNSET"}, True, False),
    ("host key file missing", {(*F, "source"): "sftp://u@h/out", (*F, "known_hosts"): "nope",
                               (*F, "identity_file"): "id_ed25519"}, True, False),
    ("duplicate feed names", {("feeds", 1): {"name": "emails", "source": "in"}}, True, False),
    ("export feed without audiences", {(*F, "kind"): "campaign_export"}, True, False),
    ("target inside the state folder", {(*D, "target"): "state/out"}, True, False),
]


def variant(changes: dict[tuple[Any, ...], Any]) -> dict[str, Any]:
    config = copy.deepcopy(BASE)
    for path, value in changes.items():
        *parents, last = path
        node: Any = config
        for part in parents:
            node = node[part]
        if value is DROP:
            del node[last]
        elif isinstance(node, list) and last == len(node):
            node.append(value)
        else:
            node[last] = {k: v for k, v in value.items() if v is not DROP} \
                if isinstance(value, dict) else value
    return config


def code_accepts(config: dict[str, Any], base_dir: Path) -> bool:
    try:
        parse_config(config, ENV, base_dir=base_dir)
    except ConfigError:
        return False
    return True


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("config")
    for name in SFTP.values():
        (folder / name).write_text("x")
    return folder


@pytest.mark.parametrize("case, changes, schema_ok, code_ok", CASES, ids=[c[0] for c in CASES])
def test_schema_and_config_validation_agree(case: str, changes: dict[tuple[Any, ...], Any],
                                            schema_ok: bool, code_ok: bool,
                                            base_dir: Path) -> None:
    config = variant(changes)
    errors = [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)]
    assert (not errors) == schema_ok, errors or "schema accepts it"
    assert code_accepts(config, base_dir) == code_ok


def test_readme_example_config_matches_the_schema() -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[state]" in b]
    assert blocks
    for block in blocks:
        config = tomllib.loads(block)
        errors = [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)]
        assert not errors


def test_demo_config_matches_the_schema() -> None:
    from localdev.demo import CONFIG

    fields = {name: f"/x/{name}" for name in re.findall(r"(?<!\{)\{(\w+)\}(?!\})", CONFIG)}
    fields["sftp_url"] = "sftp://demo@127.0.0.1:2222/x"
    config = tomllib.loads(CONFIG.format(**fields))
    errors = [e.message for e in jsonschema.Draft202012Validator(SCHEMA).iter_errors(config)]
    assert config["feeds"] and not errors
