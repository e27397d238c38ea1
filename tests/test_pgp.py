"""PGP-encrypted deliveries and outputs (SPEC §12), against the real `gpg` on both sides.

Keys are generated in throwaway GnuPG homes; partners encrypt with `gpg --encrypt [--sign]`,
and outputs are read back with `gpg --decrypt`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest

from localdev.pgp_keys import Party, make_party
from pipeline.cli import main
from pipeline.formats import InfoEntry, render_info
from pipeline.pgp import Decryptor, Keyring
from pipeline.stages.ingest import find_deliveries, read_chunks
from pipeline.stores import StoreOptions, open_store
from tests.factories import put_all, write_snapshot

ROOT = "ftp_1234_5678_iter_1486140844000"
SPLITS = [
    ["alice@example.com 111,112", "BOB@Example.com 113", "carol@example.com 111 112",
     "bad-line-without-segments", ""],
    ["alice@example.com  112", "dave@nowhere.org 111", "not-an-email 111"],
    ["frank@example.com 111,112", "bob@example.com 999"],
]
PROFILES = [
    {"profile_id": "P1", "email": "Alice@Example.com"},
    {"profile_id": "P2", "email": "bob@example.com"},
    {"profile_id": "P3", "email": " carol@example.com"},
    {"profile_id": "P4", "email": "frank@example.com", "opt_out": True},
]
PASSPHRASE_ENV = "PIPELINE_PGP_PASSPHRASE"
ENV = {PASSPHRASE_ENV: "correct horse"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """us: the pipeline's key (and `locked`, one with a passphrase: unlocking it costs a
    deliberately slow KDF per file, so only a few tests use it); partner: signs what it sends;
    other: a stranger's key; recipient: who reads our encrypted outputs."""
    folder = tmp_path_factory.mktemp("keys")
    parties = {"locked": make_party(folder, "locked", passphrase=ENV[PASSPHRASE_ENV])}
    for name in ("us", "partner", "other", "recipient"):
        parties[name] = make_party(folder, name)
    yield parties
    for party in parties.values():
        party.close()


def split_texts() -> list[bytes]:
    return ["".join(line + "\n" for line in lines).encode() for lines in SPLITS]


def delivery(texts: list[bytes], seal=None) -> dict[str, bytes]:
    """`<root>-N.sync` files (split 1 gzip'd) and the `.info` listing their stored bytes;
    with `seal(n, data) -> (suffix, bytes)`, each file as the partner encrypted it."""
    files, entries = {}, []
    for n, text in enumerate(texts, start=1):
        data, name = text, f"{ROOT}-{n}.sync"
        if n == 1:
            data, name = gzip.compress(text, mtime=0), name + ".gz"
        if seal is not None:
            suffix, data = seal(n, data)
            name += suffix
        files[name] = data
        entries.append(InfoEntry(name, len(data), text.count(b"\n"), n,
                                 hashlib.md5(data).hexdigest()))
    files[f"{ROOT}.info"] = render_info(entries, ROOT).encode()
    return files


def partner_sealed(keys: dict[str, Party], sign: bool, to: str = "us", signer: str = "partner"):
    def seal(n: int, data: bytes) -> tuple[str, bytes]:
        # split 2 uses `.gpg`, the others `.pgp`: both are AAM's spellings
        return (".gpg" if n == 2 else ".pgp"), keys[signer].encrypt(data, keys[to], sign=sign)
    return seal


def config(tmp: Path, source: str, source_opts: str, feed_pgp: str = "",
           dest_pgp: str = "") -> Path:
    path = tmp / "pipeline.toml"
    path.write_text(f"""
[state]
location = "{tmp}/state"
[profiles]
snapshot = "{tmp}/profiles/snapshot.parquet"
[[feeds]]
name = "emails"
source = "{source}"
{source_opts}
id_kind = "email"
max_reject_ratio = 0.5
{feed_pgp}
[[destinations]]
name = "campaign"
kind = "campaign_list"
target = "{tmp}/out/campaign"
{dest_pgp}
[[destinations]]
name = "experience-cloud"
kind = "aam_inbound"
target = "{tmp}/out/inbound"
dpid = 12345
segments = {{ "111" = 9001, "112" = 9002, "113" = 9003 }}
{dest_pgp}
""")
    return path


def feed_keys(keys: dict[str, Party], signer: bool = True, locked: bool = False) -> str:
    if locked:
        text = (f'pgp_secret_key_file = "{keys["locked"].secret}"\n'
                f'pgp_passphrase_env = "{PASSPHRASE_ENV}"\n')
    else:
        text = f'pgp_secret_key_file = "{keys["us"].secret}"\n'

    if signer:
        text += f'pgp_signer_key_file = "{keys["partner"].public}"\n'
    return text


def run(path: Path, capsys, env=ENV) -> tuple[int, dict]:
    code = main(["run", "--config", str(path), "--json"], env=env)
    return code, json.loads(capsys.readouterr().out)


def published(tmp: Path) -> dict[str, bytes]:
    out = tmp / "out"
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()} if out.exists() else {}


@pytest.fixture
def sftp_feed(sftp_server, tmp_path):
    url = f"{sftp_server.url}/pgp-{tmp_path.name}"
    opts = StoreOptions(known_hosts=sftp_server.known_hosts,
                        identity_file=sftp_server.identity_file)
    extra = (f'known_hosts = "{sftp_server.known_hosts}"\n'
             f'identity_file = "{sftp_server.identity_file}"')
    return url, opts, extra


@pytest.fixture
def s3_feed(make_bucket):
    return f"s3://{make_bucket()}/outbound", StoreOptions(), ""


@pytest.mark.parametrize(("where", "sign"), [("sftp", True), ("s3", False)],
                         ids=["sftp-encrypt-sign", "s3-encrypt"])
def test_encrypted_delivery_gives_the_plaintext_outputs(where, sign, keys, request, tmp_path,
                                                        capsys):
    """The same delivery, plain and as a partner encrypted it: same rows and counts; our
    encrypted outputs decrypt with `gpg --decrypt` to the plaintext run's bytes."""
    url, opts, extra = request.getfixturevalue(f"{where}_feed")
    plain_dir, pgp_dir = tmp_path / "plain", tmp_path / "pgp"
    store = open_store(url, opts)
    put_all(store, delivery(split_texts()), folder="plain/date=2017-02-03")
    # the signed delivery goes to a passphrase-protected key, the other to a plain one
    put_all(store, delivery(split_texts(), partner_sealed(keys, sign, to="locked" if sign
                                                          else "us")),
            folder="pgp/date=2017-02-03")
    store.close()
    for folder in (plain_dir, pgp_dir):
        write_snapshot(folder / "profiles" / "snapshot.parquet", PROFILES)
    dest = f'pgp_recipient_key_file = "{keys["recipient"].public}"'

    code, plain = run(config(plain_dir, f"{url}/plain", extra), capsys)
    assert code == 0
    code, encrypted = run(config(pgp_dir, f"{url}/pgp", extra,
                                 feed_keys(keys, signer=sign, locked=sign), dest), capsys)
    assert code == 0

    assert encrypted["totals"] == plain["totals"]
    assert encrypted["totals"]["records_received"] == 9
    assert encrypted["deliveries"][0]["rows_written"] == plain["deliveries"][0]["rows_written"]
    want, got = published(plain_dir), published(pgp_dir)
    outputs = [p for p in want if not p.split("/")[1] == "_manifests"]
    assert len(outputs) == 2 and all(p + ".pgp" in got for p in outputs)
    for path in outputs:
        sealed = got[path + ".pgp"]
        assert sealed != want[path] and keys["recipient"].decrypt(sealed) == want[path]
    manifest = json.loads(got[f"campaign/_manifests/emails/{ROOT}.json"])
    name = f"emails/{ROOT}.csv.pgp"
    assert manifest["files"] == {name: hashlib.md5(got[f"campaign/{name}"]).hexdigest()}


def test_outputs_use_aes256_with_mdc(keys, tmp_path, capsys):
    """What GnuPG 2.2 reads: AES-256 in the classic integrity-protected packet (no AEAD)."""
    feed = tmp_path / "feed"
    put_all(open_store(str(feed)), delivery(split_texts()))
    write_snapshot(tmp_path / "profiles" / "snapshot.parquet", PROFILES)
    dest = f'pgp_recipient_key_file = "{keys["recipient"].public}"'
    assert run(config(tmp_path, str(feed), "", dest_pgp=dest), capsys)[0] == 0
    sealed = (tmp_path / f"out/campaign/emails/{ROOT}.csv.pgp").read_bytes()
    packets = keys["recipient"].gpg("--list-packets", "--verbose", data=sealed).decode()
    assert "encrypted data packet" in packets and "mdc_method: 2" in packets
    status = keys["recipient"].gpg("--status-fd", "1", "--decrypt", data=sealed).decode()
    assert "DECRYPTION_INFO 2 9" in status  # MDC (2), cipher AES256 (9)
    # a rerun replaces its own encrypted files: new ciphertext (a new session key), same text
    code = main(["run", "--config", str(tmp_path / "pipeline.toml"), "--force"], env=ENV)
    again = (tmp_path / f"out/campaign/emails/{ROOT}.csv.pgp").read_bytes()
    assert code == 0 and again != sealed
    assert keys["recipient"].decrypt(again) == keys["recipient"].decrypt(sealed)


def _good(keys, to="us"):
    return delivery(split_texts(), partner_sealed(keys, sign=True, to=to))


def _damaged(keys, how):
    files = _good(keys)
    name = f"{ROOT}-2.sync.gpg"
    data = files[name]
    data = data[: len(data) // 2] if how == "truncated" else \
        data[:-12] + bytes([data[-12] ^ 0x55]) + data[-11:]
    files[name] = data
    entries = [InfoEntry(n, len(d), t.count(b"\n"), i, hashlib.md5(d).hexdigest())
               for i, ((n, d), t) in enumerate(zip(
                   [(k, v) for k, v in files.items() if not k.endswith(".info")],
                   split_texts(), strict=True), start=1)]
    files[f"{ROOT}.info"] = render_info(entries, ROOT).encode()  # as the partner listed it
    return files


# case -> (files as delivered, feed keys, env, reason expected)
FAILURES = {
    "wrong-secret-key": (lambda k: delivery(split_texts(), partner_sealed(k, True, to="other")),
                         True, ENV, "decryption failed: no secret key"),
    "missing-key": (_good, False, ENV, "the feed has no pgp_secret_key_file"),
    "wrong-passphrase": (lambda k: _good(k, to="locked"), "locked", {PASSPHRASE_ENV: "wrong"},
                         "wrong or missing passphrase"),
    "truncated": (lambda k: _damaged(k, "truncated"), True, ENV,
                  "corrupt or truncated PGP data"),
    "corrupt": (lambda k: _damaged(k, "corrupt"), True, ENV, "corrupt or truncated PGP data"),
    "unsigned": (lambda k: delivery(split_texts(), partner_sealed(k, sign=False)), True, ENV,
                 "missing required signature"),
    "signed-by-another-key": (
        lambda k: delivery(split_texts(), partner_sealed(k, True, signer="other")), True, ENV,
        "signature is not by the key in pgp_signer_key_file"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_bad_pgp_delivery_fails_alone_then_is_published_once_fixed(case, keys, tmp_path,
                                                                   capsys):
    files, with_keys, env, reason = FAILURES[case]
    feed = tmp_path / "feed"
    put_all(open_store(str(feed)), files(keys))
    write_snapshot(tmp_path / "profiles" / "snapshot.parquet", PROFILES)
    locked = with_keys == "locked"
    feed_pgp = feed_keys(keys, locked=locked) if with_keys else ""

    code = main(["run", "--config", str(config(tmp_path, str(feed), "", feed_pgp)), "--json"],
                env=env)
    out, err = capsys.readouterr()
    rep = json.loads(out)["deliveries"][0]
    assert code == 1 and rep["status"] == "failed"  # as any failed delivery: exit 1 alone
    assert reason in rep["reason"] and "\n" not in rep["reason"]
    for party in keys.values():  # no key material, key ID or user ID in reason or logs
        for secret in (party.fingerprint, party.fingerprint[-16:], party.uid.split("<")[1]):
            assert secret not in rep["reason"] and secret not in err
    assert "BEGIN PGP" not in err and published(tmp_path) == {}

    # the partner resends / the operator fixes the config
    put_all(open_store(str(feed)), _good(keys, to="locked" if locked else "us"))
    code, report = run(config(tmp_path, str(feed), "", feed_keys(keys, locked=locked)), capsys)
    assert code == 0 and report["deliveries"][0]["status"] == "processed"
    assert report["totals"]["records_received"] == 9
    assert f"campaign/emails/{ROOT}.csv" in published(tmp_path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("pgp_secret_key_file", "missing.asc", "feeds.emails.pgp_secret_key_file: key file not found"),
    ("pgp_secret_key_file", "garbage.asc",
     "feeds.emails.pgp_secret_key_file: no OpenPGP key found in"),
    ("pgp_secret_key_file", "public", "feeds.emails.pgp_secret_key_file: "),
    ("pgp_signer_key_file", "garbage.asc",
     "feeds.emails.pgp_signer_key_file: no OpenPGP key found in"),
    ("pgp_passphrase_env", "NOT_SET_ANYWHERE",
     "feeds.emails.pgp_passphrase_env: environment variable NOT_SET_ANYWHERE is not set"),
])
def test_bad_feed_key_config_exits_2_naming_the_key(key, value, message, keys, tmp_path,
                                                      capsys):
    (tmp_path / "garbage.asc").write_text("not a key\n")
    if value == "public":
        value, message = str(keys["us"].public), message + f"{keys['us'].public} holds no secret"
    feed = {"pgp_secret_key_file": str(keys["us"].secret), key: value}
    text = "\n".join(f'{k} = "{v}"' for k, v in feed.items())
    code = main(["run", "--config", str(config(tmp_path, str(tmp_path / "feed"), "", text))],
                env=ENV)
    # Only the error line: an INFO line of a run-folder cleanup may precede it.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO " not in line]
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {message}")
    assert not (tmp_path / "state").exists()


def test_gzip_and_pgp_on_aam_inbound_is_a_config_error(keys, tmp_path, capsys):
    dest = f'pgp_recipient_key_file = "{keys["recipient"].public}"\ngzip = true'
    path = config(tmp_path, str(tmp_path / "feed"), "", dest_pgp=dest)
    assert main(["run", "--config", str(path)], env=ENV) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: destinations.experience-cloud.gzip: must be false when "
                   "pgp_recipient_key_file is set (AAM refuses PGP files that are also gzip'd)")


def test_decryption_streams_in_bounded_memory_without_plaintext_on_disk(keys, tmp_path):
    """96 MB of plaintext read through gpg's pipes: Python holds a few blocks at a time and
    no file under the work folders grows while the chunks come (the 1 GB run is in
    benchmarks/)."""
    lines = 1_200_000
    plain = b"%064x 111,112 113\n" % (2**255) * lines
    name = f"{ROOT}-1.sync.pgp"
    sealed = keys["partner"].encrypt(plain, keys["us"], sign=True)
    del plain
    feed = open_store(str(tmp_path / "feed"))
    put_all(feed, {name: sealed, f"{ROOT}.info": render_info(
        [InfoEntry(name, len(sealed), lines, 1, hashlib.md5(sealed).hexdigest())],
        ROOT).encode()})
    work = tmp_path / "work"
    ring = Keyring(work, "ring")
    try:
        ring.import_key(str(keys["us"].secret), "k", secret=True)
        signers = frozenset(ring.import_key(str(keys["partner"].public), "s"))
        found = find_deliveries(feed, "emails")
        tracemalloc.start()
        rows, on_disk = 0, []
        for chunk in read_chunks(feed, found[0], chunk_bytes=4 << 20,
                                 decryptor=Decryptor(ring, None, signers)):
            rows += chunk.height
            on_disk.append(sum(p.stat().st_size for p in tmp_path.rglob("*")
                               if p.is_file() and "feed" not in p.parts))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        ring.close()
    assert rows == lines and len(on_disk) > 10
    assert max(on_disk) < 100_000  # keyring files only: nothing of the 96 MB
    assert peak < 40 << 20, f"peak {peak >> 20} MB"
